"""`trim_acked_every`: consumers trim what every group has read and acked, one process per
interval, against a real redis-server."""

from __future__ import annotations

import logging

import msgspec
import pytest
import redis.asyncio as aioredis

from asyncstreams import App, ConfigurationError

from .conftest import Names
from .helpers import eventually, fill, wait_drained

pytestmark = pytest.mark.anyio


class Item(msgspec.Struct):
    n: int


async def test_only_entries_every_group_acked_are_trimmed(
    redis_url: str, names: Names, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    ids = await fill(client, names.stream, 30)
    # Two other groups, at different positions: "slow" read 20 and acked 10 of them (its
    # oldest pending is ids[10]); "late" read only 25 and acked them all.
    await client.xgroup_create(names.stream, "slow", id="0")
    await client.xreadgroup("slow", "s", {names.stream: ">"}, count=20)
    await client.xack(names.stream, "slow", *ids[:10])
    await client.xgroup_create(names.stream, "late", id="0")
    await client.xreadgroup("late", "l", {names.stream: ">"}, count=25)
    await client.xack(names.stream, "late", *ids[:25])

    apps = [App(redis_url), App(redis_url)]
    for app in apps:

        @app.consumer(names.stream, group=names.group, trim_acked_every=0.2)
        async def handle(item: Item) -> None:
            pass

    async def trimmed() -> bool:
        return int(await client.xlen(names.stream)) == 20

    with caplog.at_level(logging.INFO, logger="asyncstreams"):
        async with apps[0], apps[1]:
            await wait_drained(client, names.stream, names.group)
            await eventually(trimmed, what="the first 10 entries trimmed")
            lines = [r for r in caplog.records if "that every group has acked" in r.getMessage()]
            # Every entry our group acked, and "late" too, but "slow" holds ids[10] pending.
            assert [entry_id for entry_id, _ in await client.xrange(names.stream)] == ids[10:]
            # Held back by "slow": nothing more goes, however often the consumers try.
            await client.xack(names.stream, "slow", ids[10])
            await eventually(lambda: _equals(client.xlen(names.stream), 19), what="ids[10] trimmed")
    assert [entry_id for entry_id, _ in await client.xrange(names.stream)] == ids[11:]
    assert lines
    assert "held back by group slow: pending" in lines[0].getMessage()


async def _equals(value: object, expected: int) -> bool:
    return int(await value) == expected  # type: ignore[misc]


async def test_one_process_trims_a_stream_per_interval(
    redis_url: str, names: Names, client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await fill(client, names.stream, 5)
    apps = [App(redis_url) for _ in range(3)]
    for app in apps:

        @app.consumer(names.stream, group=names.group, trim_acked_every=30)
        async def handle(item: Item) -> None:
            pass

    with caplog.at_level(logging.DEBUG, logger="asyncstreams.recovery"):
        async with apps[0], apps[1], apps[2]:
            await wait_drained(client, names.stream, names.group)
            # Each consumer tries at its start; one takes the lock and trims.
            await eventually(
                lambda: _has_key(client, f"{names.stream}:trim-lock"), what="the trim lock"
            )
            ttl = await client.pttl(f"{names.stream}:trim-lock")
            assert 0 < ttl <= 30_000
    trims = [r for r in caplog.records if "that every group has acked" in r.getMessage()]
    assert len(trims) == 1


async def _has_key(client: aioredis.Redis, key: str) -> bool:
    return bool(await client.exists(key))


@pytest.mark.parametrize("value", [0, -1, float("inf"), True, "10"])
def test_trim_acked_every_must_be_seconds_above_zero(value: object) -> None:
    app = App("redis://127.0.0.1:1/0")
    with pytest.raises(ConfigurationError, match=r"trim_acked_every must be a number > 0"):
        app.consumer("s", group="g", trim_acked_every=value)  # type: ignore[arg-type]
