"""The examples, run for real: the FastAPI service in-process, the task queue app under the
CLI and the producer as subprocesses, all against the session's redis-server."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from asyncstreams import App
from examples.fastapi_service import create_service

from .conftest import Names
from .helpers import ROOT, CliProcess, eventually, pending_count

pytestmark = pytest.mark.anyio

HANDLED = re.compile(
    r"handled (\d+) tasks; latest: (.+) \(entry \d+-\d+, \d+\.\d ms after it was published\)"
)
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
ENQUEUED = re.compile(rf"Enqueued task with ID: ({UUID}), message ID: (\d+-\d+)")


@pytest.fixture
def sync_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True, protocol=2)
    try:
        yield client
    finally:
        client.close()


async def app_connections(client: aioredis.Redis) -> set[str]:
    """Ids of the connections an App of this process has open (they carry its client name)."""
    name = f"asyncstreams-{os.getpid()}"
    return {str(c["id"]) for c in await client.client_list() if c.get("name") == name}


def entries(reply: Any) -> list[tuple[str, dict[str, str]]]:
    """An XRANGE reply of a decoding client, typed (redis-py's annotation allows None)."""
    return cast("list[tuple[str, dict[str, str]]]", reply)


def handled_counts(output: str) -> list[int]:
    return [int(count) for count, _ in HANDLED.findall(output)]


def run_producer(redis_url: str, stream: str, count: int) -> list[tuple[str, str]]:
    """Run examples/producer.py; returns the (task id, entry id) pairs it printed."""
    command = [sys.executable, "examples/producer.py", "--url", redis_url, "--stream", stream]
    done = subprocess.run(
        [*command, "--count", str(count), "--interval", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return ENQUEUED.findall(done.stdout)


async def test_fastapi_service_handles_what_it_publishes(
    redis_url: str, names: Names, client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASYNCSTREAMS_URL", redis_url)
    api = create_service(stream=names.stream, group=names.group)
    worker = api.state.worker
    assert isinstance(worker, App)
    before = await app_connections(client)

    async with api.router.lifespan_context(api):
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            entry_ids = []
            for n in range(5):
                response = await http.post("/tasks", json={"data": f"task {n}"})
                assert response.status_code == 202, response.text
                entry_ids.append(response.json()["entry_id"])

            async def handled() -> int:
                response = await http.get("/stats")
                assert response.status_code == 200, response.text
                return int(response.json()["handled"])

            async def all_handled() -> bool:
                return await handled() >= 5

            await eventually(all_handled, what="5 tasks handled")
            assert await handled() == 5
            health = await http.get("/health")
            assert (health.status_code, health.json()) == (
                200,
                {"consuming": True, "failure": None},
            )
            live = await http.get("/ops/healthz")
            assert (live.status_code, live.json()) == (200, {"status": "alive", "running": True})
            ready = await http.get("/ops/readyz")
            assert (ready.status_code, ready.json()) == (200, {"status": "ready", "consumers": 1})

        async def nothing_pending() -> bool:
            return await pending_count(client, names.stream, names.group) == 0

        await eventually(nothing_pending, what="every handled entry acked")
        stored = entries(await client.xrange(names.stream))
        assert [entry_id for entry_id, _ in stored] == entry_ids
        running = await app_connections(client) - before
        assert running, "the App has no connection open while the service runs"

    # Leaving the lifespan stopped the consumers and closed the App's pool.
    async def closed() -> bool:
        return not await app_connections(client) & running

    await eventually(closed, what="the App's connections closed")
    assert await pending_count(client, names.stream, names.group) == 0


def test_task_queue_example_runs_until_sigterm(
    redis_url: str, names: Names, tmp_path: Path, sync_client: redis.Redis
) -> None:
    env = {"TASK_QUEUE_STREAM": names.stream, "TASK_QUEUE_INTERVAL": "0.02"}
    process = CliProcess(
        ["run", "examples.task_queue:app", "--url", redis_url],
        env=env,
        log_path=tmp_path / "task_queue.log",
    )
    try:
        process.wait_for_output("handled 5 tasks;")
        process.signal(signal.SIGTERM)
        assert process.wait() == 0, process.output()
    finally:
        process.stop()
    output = process.output()
    counts = handled_counts(output)
    assert counts == list(range(1, len(counts) + 1)), output
    assert len(counts) >= 5
    summary = re.search(r"stopped; (\d+) acked, 0 retried, 0 dead-lettered, 0 cancelled", output)
    assert summary is not None, output
    assert int(summary.group(1)) == counts[-1]
    assert sync_client.xpending(names.stream, "task_consumers")["pending"] == 0


def test_task_queue_example_handles_the_producers_and_the_guides_entries(
    redis_url: str, names: Names, tmp_path: Path, sync_client: redis.Redis
) -> None:
    # An entry exactly as the guide's own producer writes it: created_at is str(time.time()).
    sync_client.xadd(
        names.stream,
        {"task_id": "guide-1", "data": "from the guide", "created_at": str(time.time())},
    )
    env = {"TASK_QUEUE_STREAM": names.stream, "TASK_QUEUE_PRODUCE": "0"}
    process = CliProcess(
        ["run", "examples.task_queue:app", "--url", redis_url],
        env=env,
        log_path=tmp_path / "task_queue.log",
    )
    try:
        process.wait_for_output("handled 1 tasks; latest: from the guide")
        assert len(run_producer(redis_url, names.stream, 2)) == 2
        process.wait_for_output("handled 3 tasks;")
        process.signal(signal.SIGTERM)
        assert process.wait() == 0, process.output()
    finally:
        process.stop()
    output = process.output()
    assert [data for _, data in HANDLED.findall(output)] == [
        "from the guide",
        "Process this data: 0",
        "Process this data: 1",
    ]
    assert "publishing a task" not in output
    assert "stopped; 3 acked, 0 retried, 0 dead-lettered, 0 cancelled" in output


def test_producer_publishes_tasks(redis_url: str, names: Names, sync_client: redis.Redis) -> None:
    started = time.time()
    printed = run_producer(redis_url, names.stream, 3)
    assert len(printed) == 3
    stored = entries(sync_client.xrange(names.stream))
    assert [entry_id for entry_id, _ in stored] == [entry_id for _, entry_id in printed]
    for n, ((entry_id, fields), (task_id, _)) in enumerate(zip(stored, printed, strict=True)):
        assert set(fields) == {"task_id", "data", "created_at"}, entry_id
        assert fields["task_id"] == task_id
        assert fields["data"] == f"Process this data: {n}"
        assert started <= float(fields["created_at"]) <= time.time()


def test_the_example_test_of_the_task_queue_passes_as_a_user_runs_it() -> None:
    # examples/test_task_queue.py, the README's "Testing your handlers": pytest on that file
    # alone, in a fresh process, where asyncstreams' pytest plugin loads by its entry point
    # and the first TestApp starts the process's redis-server. Each test takes under a second.
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DISABLE_PLUGIN_AUTOLOAD"}
    options = ["-p", "no:cacheprovider", "-q", "-vv", "--durations=0"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "examples/test_task_queue.py", *options],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout, done.stdout
    calls = re.findall(r"^([\d.]+)s call +examples/test_task_queue\.py::", done.stdout, re.M)
    assert len(calls) == 2, done.stdout
    assert max(map(float, calls)) < 1.0, done.stdout


def test_the_readme_shows_the_example_test_as_it_is() -> None:
    source = (ROOT / "examples" / "test_task_queue.py").read_text()
    code = source[source.index('"""', 3) + 4 :].lstrip("\n")
    readme = (ROOT / "README.md").read_text()
    assert f"```python\n{code}```\n" in readme
