"""Helpers shared by the tests: waiting on Redis state instead of sleeping, CLI processes,
and the handler ledger that test apps write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio as aioredis

from asyncstreams.embedded import EmbeddedRedis

from .apps import ledger
from .capabilities import server_binary

ROOT = Path(__file__).resolve().parent.parent


def own_server(*args: str) -> EmbeddedRedis:
    """A redis-server of the test's own (not yet started), of the binary the suite runs."""
    return EmbeddedRedis(args, binary=server_binary())


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll `check` until it is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await anyio.sleep(0.02)


def wait_for(check: Callable[[], bool], *, timeout: float = 10.0, what: str = "condition") -> None:
    """`eventually` for sync tests: poll `check` until it is true; fail naming `what` after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


async def pending_count(client: aioredis.Redis, stream: str, group: str) -> int:
    summary = await client.xpending(stream, group)
    return int(summary["pending"])


async def drained(client: aioredis.Redis, stream: str, group: str) -> bool:
    """True when the group has read every entry of the stream and none is pending."""
    info = await client.xinfo_stream(stream)
    groups = {g["name"]: g for g in await client.xinfo_groups(stream)}
    group_info = groups[group]
    return bool(
        group_info["pending"] == 0 and group_info["last-delivered-id"] == info["last-generated-id"]
    )


async def wait_drained(
    client: aioredis.Redis, stream: str, group: str, *, timeout: float = 20.0
) -> None:
    await eventually(
        lambda: drained(client, stream, group), timeout=timeout, what=f"{stream} drained"
    )


async def fill(client: aioredis.Redis, stream: str, count: int, **extra: str) -> list[str]:
    """XADD `count` entries {"n": i, **extra} in pipelined chunks; returns their ids."""
    ids: list[str] = []
    for start in range(0, count, 1000):
        async with client.pipeline(transaction=False) as pipe:
            for n in range(start, min(count, start + 1000)):
                pipe.xadd(stream, {"n": str(n), **extra})
            ids += await pipe.execute()
    return ids


@dataclass
class Run:
    """One handler run recorded by a test app: entry id, pid, start and end times."""

    id: str
    pid: int
    start: float
    end: float | None
    fields: dict[str, str]


def read_ledger(path: Path) -> list[Run]:
    runs: dict[tuple[str, int, float], Run] = {}
    for record in ledger.read(path):
        key = (record["id"], record["pid"], record["start"])
        if record["event"] == "start":
            runs[key] = Run(record["id"], record["pid"], record["start"], None, record["fields"])
        else:
            runs[key].end = record["end"]
    return list(runs.values())


class CliProcess:
    """`python -m asyncstreams run ...` as a real child process, its stderr kept in a file."""

    def __init__(
        self,
        args: list[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path,
        cwd: Path = ROOT,
    ) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "asyncstreams", *args],
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"process exited ({self.process.returncode}) before printing {text!r}:\n"
                    + self.output()
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} after {timeout} s:\n{self.output()}")
            time.sleep(0.02)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def stop(self) -> None:
        """Make sure the process is gone (used in finally blocks)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


def app_env(**settings: Any) -> dict[str, str]:
    """Environment for tests/apps/ledger_app.py."""
    return {f"LEDGER_APP_{key.upper()}": str(value) for key, value in settings.items()}


async def deliver(
    client: aioredis.Redis, stream: str, group: str, consumer: str, count: int = 100
) -> list[str]:
    """XREADGROUP `>` as `consumer` and never ack, as a consumer that crashed would.

    Creates the group at "0" (and the stream) when missing; returns the ids delivered.
    """
    if not await client.exists(stream) or group not in {
        g["name"] for g in await client.xinfo_groups(stream)
    }:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    reply = await client.xreadgroup(group, consumer, {stream: ">"}, count=count)
    return [entry_id for _, entries in reply for entry_id, _ in entries]


async def pending_entries(
    client: aioredis.Redis, stream: str, group: str
) -> dict[str, tuple[str, int]]:
    """The group's pending entries: id -> (consumer, delivery counter), from XPENDING."""
    rows = await client.xpending_range(stream, group, "-", "+", 1000)
    return {row["message_id"]: (row["consumer"], row["times_delivered"]) for row in rows}


def command_calls(info: Mapping[str, Any], command: str) -> int:
    """How many times the server has run `command` ("xautoclaim", "client|unblock"), from its
    `INFO all` (INFO commandstats and the server's version in one reply).

    Redis 6 counts a subcommand under its command: there "client|unblock" is every CLIENT
    call (CLIENT ID, SETNAME and SETINFO of new connections too), so a count of at least
    one proves less than on Redis 7.
    """
    if "|" in command and int(str(info["redis_version"]).split(".")[0]) < 7:
        command = command.partition("|")[0]
    return int(info.get(f"cmdstat_{command}", {}).get("calls", 0))


async def calls(client: aioredis.Redis, command: str) -> int:
    """`command_calls` of the server `client` talks to (the suite runs one test at a time)."""
    return command_calls(await client.info("all"), command)


def blocked_reads(clients: Iterable[Mapping[str, Any]], name: str | None = None) -> set[str]:
    """Ids of the connections in a CLIENT LIST reply that are blocked in XREADGROUP now
    (`cmd=xreadgroup`, flag `b`); only those named `name` when it is given."""
    return {
        str(c["id"])
        for c in clients
        if c.get("cmd") == "xreadgroup"
        and "b" in str(c.get("flags", ""))
        and (name is None or c.get("name") == name)
    }


async def wait_blocked_reads(
    client: aioredis.Redis, count: int, *, name: str | None = None, timeout: float = 10.0
) -> set[str]:
    """Wait until at least `count` connections (named `name`, if given) are blocked in
    XREADGROUP, instead of sleeping until they probably are; returns their ids."""
    found: set[str] = set()

    async def enough() -> bool:
        nonlocal found
        found = blocked_reads(await client.client_list(), name)
        return len(found) >= count

    await eventually(enough, timeout=timeout, what=f"{count} reads blocked in XREADGROUP")
    return found
