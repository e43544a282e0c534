"""Keeping pending entries moving: retries, claims, renewals and forgotten consumers.

Everything here works from Redis' own bookkeeping, the group's pending entries list (PEL),
and its delivery counters, so the bounds hold across processes and restarts:

- Retries. An entry whose handler raised stays pending; when its backoff is over
  (retry_delay * 2**(deliveries-1), capped, with jitter) XCLAIM hands it back to this
  consumer, which counts a delivery, and it runs again.
- Own pending entries. At start, the entries a consumer of the same name left behind come
  first, before new ones. Later, entries pending on this consumer that it does not know of
  (delivered in a reply that never arrived: a connection cut mid-read) are claimed once idle
  for half of `claim_idle_ms`.
- Other consumers' entries. XAUTOCLAIM takes entries idle for `claim_idle_ms` (their
  consumer crashed or hangs). It scans up to 10 x COUNT PEL entries per call, so the scan
  is paced: a call every `claim_idle_ms / 2`, sooner only while it finds work.
- Renewal. Entries this consumer holds (queued, running, waiting for their XACK or their
  retry, or parked) get their idle time reset every `claim_idle_ms / 3` with XCLAIM ...
  JUSTID, which counts no delivery: a slow handler's entry, or one waiting out a long
  backoff, is never claimed away from a consumer that is alive.
- Forgotten consumers. Consumers of the group with nothing pending, idle for
  `delete_idle_consumers_after`, are deleted (XGROUP DELCONSUMER), so the unique names of
  past processes do not pile up. One with pending entries is never deleted: that would drop
  them from the PEL.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from . import _redis
from ._backoff import Backoff

if TYPE_CHECKING:
    from .consumer import Consumer

log = logging.getLogger("asyncstreams.recovery")

# How soon to go on with an XAUTOCLAIM scan that claimed nothing but has not wrapped around.
CLAIM_STEP = 0.1
# XPENDING page size when sweeping this consumer's own pending entries.
PAGE = 200


class Recovery:
    """The recovery work of one consumer, run by one task of its own."""

    def __init__(self, consumer: Consumer) -> None:
        options = consumer.options
        self._consumer = consumer
        self._client = consumer.client
        self._options = options
        self._group = options.group
        self._name = consumer.name
        self._where = consumer.where
        self.first_pass_done = asyncio.Event()
        self._claim_cursor = dict.fromkeys(options.streams, b"0-0")
        self._retry_interval = min(max(options.retry_delay / 4, 0.01), 0.5)
        self._claim_interval = max(options.claim_idle_ms / 2000, 0.05)
        self._renew_interval = max(options.claim_idle_ms / 3000, 0.05)
        after = options.delete_idle_consumers_after
        self._cleanup_interval = None if after is None else min(max(after / 2, 1.0), 300.0)
        # True while a step talks to Redis (a stop then lets it finish); False between steps.
        self.busy = False

    async def run(self) -> None:
        """Sweep, claim, renew and clean up on their own schedules until cancelled."""
        loop = asyncio.get_running_loop()
        backoff = Backoff()
        await self._retrying(lambda: self._sweep_own(first=True), backoff)
        self.first_pass_done.set()
        now = loop.time()
        due = {
            "retry": now,
            "own": now + self._claim_interval,
            "claim": now,
            "renew": now + self._renew_interval,
            "cleanup": now,
        }
        while not self._consumer.stopping:
            now = loop.time()
            if due["retry"] <= now:
                await self._retrying(self._retry_due, backoff)
                due["retry"] = loop.time() + self._retry_interval
            if due["own"] <= now:
                await self._retrying(lambda: self._sweep_own(first=False), backoff)
                due["own"] = loop.time() + self._claim_interval
            if due["claim"] <= now:
                more = await self._retrying(self._claim_others, backoff)
                due["claim"] = loop.time() + (CLAIM_STEP if more else self._claim_interval)
            if due["renew"] <= now:
                await self._retrying(self._renew, backoff)
                due["renew"] = loop.time() + self._renew_interval
            if self._cleanup_interval is not None and due["cleanup"] <= now:
                await self._retrying(self._forget_idle_consumers, backoff)
                due["cleanup"] = loop.time() + self._cleanup_interval
            await asyncio.sleep(max(0.0, min(due.values()) - loop.time()))

    async def _retrying(self, step: Callable[[], Awaitable[bool]], backoff: Backoff) -> bool:
        """Run `step` until it gets through what Redis may get over; returns its result."""
        while True:
            self.busy = True
            try:
                result = await step()
            except Exception as exc:
                self.busy = False  # a backoff may be cut short by a stop
                if not await self._consumer.recover(exc, backoff):
                    raise
                if self._consumer.stopping:
                    return False
                continue
            finally:
                self.busy = False
            backoff.reset()
            return bool(result)

    # -- this consumer's own pending entries ---------------------------------------------

    async def _retry_due(self) -> bool:
        """Claim back the entries whose handler raised and whose backoff is over."""
        consumer = self._consumer
        for stream in self._options.streams:
            due = consumer.failures.due_retries(stream, limit=consumer.room())
            if due:
                await self._take(stream, due, min_idle=0)
        return False

    async def _sweep_own(self, *, first: bool) -> bool:
        """Claim this consumer's pending entries that it does not hold: at start, what a
        consumer of the same name left behind; later, entries delivered in a reply that never
        arrived (idle for half of claim_idle_ms, and unknown here)."""
        consumer = self._consumer
        min_idle = 0 if first else self._options.claim_idle_ms // 2
        for stream in self._options.streams:
            start: bytes | str = "-"
            while not consumer.stopping:
                room = await consumer.wait_for_room() if first else consumer.room()
                if room < 1:
                    break
                page = await _redis.pending(
                    self._client,
                    stream,
                    self._group,
                    self._name,
                    min_idle_ms=min_idle,
                    start=start,
                    count=PAGE,
                )
                if not page:
                    break
                held = consumer.held(stream)
                lost = [
                    (p.id, p.deliveries)
                    for p in page
                    if p.id not in held and not consumer.failures.is_parked(stream, p.deliveries)
                ][:room]
                if lost:
                    await self._take(stream, lost, min_idle)
                if len(page) < PAGE:
                    break
                start = b"(" + page[-1].id
        return False

    async def _take(self, stream: str, due: list[tuple[bytes, int]], min_idle: int) -> None:
        """XCLAIM `due` (id, delivery count) entries to this consumer and run them."""
        ids = [entry_id for entry_id, _ in due]
        claimed = await _redis.claim(
            self._client, stream, self._group, self._name, ids, min_idle_ms=min_idle
        )
        got = {entry_id for entry_id, _ in claimed}
        if len(got) < len(ids):
            await self._drop_trimmed(stream, [i for i in ids if i not in got])
        deliveries = {entry_id: count + 1 for entry_id, count in due}
        await self._consumer.admit(
            stream, [(entry_id, flat, deliveries[entry_id]) for entry_id, flat in claimed]
        )

    async def _drop_trimmed(self, stream: str, ids: list[bytes]) -> None:
        """Pending entries deleted from the stream (MAXLEN, XTRIM, XDEL): count, log, XACK."""
        gone = await _redis.missing(self._client, stream, ids)
        if not gone:
            return
        # Redis 7 already dropped them from the PEL; Redis 6.2 keeps them until acked.
        await _redis.ack_one(self._client, stream, self._group, gone)
        self._count_trimmed(stream, len(gone))

    def _count_trimmed(self, stream: str, count: int) -> None:
        log.warning(
            "%s: %d pending entries of %s were deleted (trimmed) before they were handled; "
            "removed from the pending entries list",
            self._where,
            count,
            stream,
        )

    # -- other consumers' idle entries ---------------------------------------------------

    async def _claim_others(self) -> bool:
        """One paced XAUTOCLAIM step per stream; True if the scan should go on soon."""
        consumer = self._consumer
        more = False
        for stream in self._options.streams:
            room = min(consumer.room(), self._options.batch_size)
            if room < 1 or consumer.stopping:
                return more
            cursor, claimed, deleted = await _redis.autoclaim(
                self._client,
                stream,
                self._group,
                self._name,
                min_idle_ms=self._options.claim_idle_ms,
                cursor=self._claim_cursor[stream],
                count=room,
            )
            self._claim_cursor[stream] = cursor
            if deleted:
                self._count_trimmed(stream, deleted)
            if claimed:
                log.info(
                    "%s: claimed %d entries of %s idle for %d ms or more",
                    self._where,
                    len(claimed),
                    stream,
                    self._options.claim_idle_ms,
                )
                counts = await self._deliveries(stream, [entry_id for entry_id, _ in claimed])
                await consumer.admit(
                    stream,
                    [(entry_id, flat, counts.get(entry_id, 1)) for entry_id, flat in claimed],
                )
            more = more or bool(claimed) or cursor != b"0-0"
        return more

    async def _deliveries(self, stream: str, ids: list[bytes]) -> dict[bytes, int]:
        """Delivery counters of entries just claimed (XAUTOCLAIM does not report them)."""
        page = await _redis.pending(
            self._client,
            stream,
            self._group,
            self._name,
            min_idle_ms=0,
            start=min(ids, key=_id_key),
            end=max(ids, key=_id_key),
            count=len(ids) + PAGE,
        )
        return {p.id: p.deliveries for p in page}

    # -- renewal and cleanup -------------------------------------------------------------

    async def _renew(self) -> bool:
        """Reset the idle time of every entry this consumer holds (no delivery counted)."""
        for stream in self._options.streams:
            held = sorted(self._consumer.held(stream))
            for start in range(0, len(held), 1000):
                chunk = held[start : start + 1000]
                renewed = await _redis.renew(self._client, stream, self._group, self._name, chunk)
                self._consumer.failures.unpark(stream, set(chunk) - renewed)
        return False

    async def _forget_idle_consumers(self) -> bool:
        after = self._options.delete_idle_consumers_after
        assert after is not None
        for stream in self._options.streams:
            for other in await _redis.consumers(self._client, stream, self._group):
                if other.name == self._name or other.pending or other.idle_ms < after * 1000:
                    continue
                # DELCONSUMER drops a consumer's pending entries: only ever at zero.
                dropped = await _redis.delete_consumer(
                    self._client, stream, self._group, other.name
                )
                log.log(
                    logging.ERROR if dropped else logging.INFO,
                    "%s: deleted consumer %s of %s (idle %.1f s, nothing pending%s)",
                    self._where,
                    other.name,
                    stream,
                    other.idle_ms / 1000,
                    f"; {dropped} pending entries appeared meanwhile" if dropped else "",
                )
        return False


def _id_key(entry_id: bytes) -> tuple[int, int]:
    millis, _, sequence = entry_id.partition(b"-")
    return int(millis), int(sequence or 0)
