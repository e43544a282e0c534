"""Tests of examples/task_queue.py's handler, on a real Redis, as a user of asyncstreams
writes them (the README's "Testing your handlers"):

    pytest examples/test_task_queue.py

TestApp starts a private redis-server on first use (one per test process) and gives each
test a database of its own. pytest-asyncio runs these tests; with anyio's pytest plugin,
mark them `@pytest.mark.anyio` instead.
"""

from __future__ import annotations

import time

import pytest

from asyncstreams.testing import TestApp
from examples import task_queue
from examples.task_queue import STREAM, Task, app, process


@pytest.fixture(autouse=True)
def no_demo_producer(monkeypatch: pytest.MonkeyPatch) -> None:
    # The example's lifespan publishes a task every 0.2 s, to show something happening:
    # the tests publish their own.
    monkeypatch.setattr(task_queue, "PRODUCE", False)


@pytest.mark.asyncio
async def test_each_task_is_handled_once() -> None:
    tasks = [Task(task_id=f"t{n}", data=f"data {n}", created_at=time.time()) for n in range(3)]
    async with TestApp(app, record=True) as t:
        for task in tasks:
            await t.publish(STREAM, task)
        await t.drain()  # every task handled and acked
        assert [call.args[0] for call in t.calls(process)] == tasks
        assert await t.dead_letters(STREAM) == []


@pytest.mark.asyncio
async def test_an_entry_that_is_not_a_task_is_dead_lettered() -> None:
    async with TestApp(app, record=True) as t:
        await t.publish(STREAM, {"task_id": "t1", "data": "no created_at"})
        await t.drain()
        [dead] = await t.dead_letters(STREAM)
        assert dead.letter.reason == "undecodable"
        assert dead.fields == {b"task_id": b"t1", b"data": b"no created_at"}
        assert t.calls(process) == []  # the handler never saw it
