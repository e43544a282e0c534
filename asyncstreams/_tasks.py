"""Stopping tasks for sure."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

# How often a task that has not finished is cancelled again.
RECANCEL_INTERVAL = 0.1


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]], timeout: float
) -> set[asyncio.Task[Any]]:
    """Cancel `tasks` and wait up to `timeout` seconds for them to finish; returns the rest.

    A task that is still running after a while is cancelled again: on Python 3.11,
    `asyncio.wait_for` (which redis-py uses when it sends a command) swallows a cancellation
    that arrives as its inner future finishes (CPython gh-86296), so a single `cancel()` can
    be lost and a plain `gather` would wait forever.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_INTERVAL, remaining))
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: the task's owner has logged it already
    return pending


def first_failure(group: BaseExceptionGroup) -> BaseException:
    """The exception a task group failed with, not the cancellations that followed it."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_failure(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group
