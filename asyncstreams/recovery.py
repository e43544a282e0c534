"""Keeping pending entries moving: retries, claims, renewals and forgotten consumers.

Everything here works from Redis' own bookkeeping, the group's pending entries list (PEL),
and its delivery counters, so the bounds hold across processes and restarts:

- Retries. An entry whose handler raised stays pending; when the failure policy says it is
  due, XCLAIM hands it back to this consumer, which counts a delivery, and it runs again.
  A failed move to the dead-letter stream is tried again the same way, without XCLAIM.
- Own pending entries. At start, the entries a consumer of the same name left behind come
  first, before new ones. Later, entries pending on this consumer that it does not know of
  (delivered in a reply that never arrived: a connection cut mid-read) are claimed once idle
  for half of `claim_idle_ms`.
- Other consumers' entries. XAUTOCLAIM takes entries idle for `claim_idle_ms` (their
  consumer crashed or hangs). It scans up to 10 x COUNT PEL entries per call, so the scan
  is paced: a call every `claim_idle_ms / 2`, sooner only while it finds work. With `key=`,
  one whole scan (unpaced, as room allows) also comes before the first read, so that what
  a crashed consumer left runs before the newer entries of its keys. With `ordered=True`,
  claims (these and the next) are only in the partitions the consumer owns, and retries
  only while it owns their partition: taking a partition over claims its pending entries
  first (asyncstreams.ownership).
- Renewal. Entries this consumer holds (every state of the ledger) get their idle time reset
  every `claim_idle_ms / 3` with XCLAIM ... JUSTID, which counts no delivery: a slow
  handler's entry, or one waiting out a long backoff, is never claimed away from a consumer
  that is alive.
- Forgotten consumers. Consumers of the group with nothing pending, idle for
  `delete_idle_consumers_after`, are deleted (XGROUP DELCONSUMER, in a script that checks
  the PEL in the same step), so the unique names of past processes do not pile up.
- Trimming, with `trim_acked_every`. Every so often, the consumer that takes a stream's
  trim lock (SET NX PX for the interval: one process per interval, however many run)
  removes the entries every group has read and acked (`App.trim`'s script).

Claims take on only what the ledger has room for; retries are held already and need none.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence

from . import _commands, _trim
from ._backoff import Outage
from ._nodes import Nodes
from ._transport import REFUSALS
from .deadletter import Reason
from .errors import NotFoundError, RedisRefusedError
from .failures import Failures
from .ledger import Ledger
from .message import Entry, entry
from .options import ConsumerOptions
from .ownership import Ownership

log = logging.getLogger("asyncstreams.recovery")

# How soon to go on with an XAUTOCLAIM scan that claimed nothing but has not wrapped around.
CLAIM_STEP = 0.1
# XPENDING page size when sweeping this consumer's own pending entries.
PAGE = 200


class Recovery:
    """The recovery work of one consumer, run by one task of its own."""

    def __init__(
        self,
        nodes: Nodes,
        options: ConsumerOptions,
        name: str,
        where: str,
        *,
        ledger: Ledger,
        failures: Failures,
        outage: Outage,
        queued: Callable[[int], None],
        ownership: Ownership | None = None,
    ) -> None:
        self._nodes = nodes
        self._options = options
        self._group = options.group
        self._name = name
        self._where = where
        self._ledger = ledger
        self._failures = failures
        self._outage = outage
        self._queued = queued
        # With `ordered=True`: claims only in the partitions this consumer owns (their
        # pending entries were taken over when it took them: see asyncstreams.ownership).
        self._ownership = ownership
        # The streams a retry's XCLAIM is on its way for (a hand-over waits for it).
        self.claiming: set[str] = set()
        self.first_pass_done = asyncio.Event()
        # With `key=`, the first pass also takes in what other consumers left idle (one
        # scan of the group's pending entries, as room allows): claimed entries then run
        # before the newer entries of their keys that the reader brings.
        self._scanned = options.key is None or ownership is not None
        # Since the start: other consumers' idle entries claimed, and held entries renewed.
        self.claimed = 0
        self.renewed = 0
        self._claim_cursor = dict.fromkeys(options.names, b"0-0")
        # Where the first pass over this consumer's own pending entries goes on, per stream
        # (a stream is left out once done).
        self._first_cursor: dict[str, bytes | str] = (
            {} if ownership is not None else dict.fromkeys(options.names, "-")
        )
        self._retry_interval = min(max(options.retry_delay / 4, 0.01), 0.5)
        self._claim_interval = max(options.claim_idle_ms / 2000, 0.05)
        self._renew_interval = max(options.claim_idle_ms / 3000, 0.05)
        # Renewal checks whose each entry is first (a script); False once EVAL was refused.
        self._renew_checked = True
        after = options.delete_idle_consumers_after
        self._cleanup_interval = None if after is None else min(max(after / 2, 1.0), 300.0)
        self._trim_interval = options.trim_acked_every
        # A token of this consumer's for the trim lock (no two processes trim one stream in
        # the same interval).
        self._trim_token = secrets.token_hex(8)
        self.trimmed = 0
        # True while a step talks to Redis (a stop then lets it finish); False between steps.
        self.busy = False

    @property
    def _stopping(self) -> bool:
        return self._ledger.closed

    async def run(self) -> None:
        """Sweep, claim, renew and clean up on their own schedules until stopped.

        The first pass over this consumer's own pending entries goes a page at a time, as
        room allows, between the other steps (retries and renewals go on meanwhile); the
        reader waits for it to be over.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = {
            "first": now,
            "retry": now,
            "own": now + self._claim_interval,
            "claim": now,
            "renew": now + self._renew_interval,
            "cleanup": now,
        }
        while not self._stopping:
            now = loop.time()
            if not self.first_pass_done.is_set() and due["first"] <= now:
                more = await self._step(self._first_pass)
                due["first"] = loop.time() + (0.0 if more else CLAIM_STEP)
                if not self._first_cursor and self._scanned:
                    self.first_pass_done.set()
                    del due["first"]
            if due["retry"] <= now:
                await self._step(self._retry_due)
                due["retry"] = loop.time() + self._retry_interval
            if due["own"] <= now:
                await self._step(self._sweep_lost)
                due["own"] = loop.time() + self._claim_interval
            if due["claim"] <= now:
                more = await self._step(self._claim_others)
                if not self._scanned and (not more or self._ledger.room() < 1):
                    self._scanned = True
                    due["first"] = loop.time()
                pace = 0.0 if not self._scanned else CLAIM_STEP  # the reader waits for it
                due["claim"] = loop.time() + (pace if more else self._claim_interval)
            if due["renew"] <= now:
                await self._step(self._renew)
                due["renew"] = loop.time() + self._renew_interval
            if self._trim_interval is not None and due.setdefault("trim", now) <= now:
                await self._step(self._trim_acked)
                due["trim"] = loop.time() + self._trim_interval
            if self._cleanup_interval is not None and due["cleanup"] <= now:
                await self._step(self._forget_idle_consumers)
                due["cleanup"] = loop.time() + self._cleanup_interval
            await asyncio.sleep(max(0.0, min(due.values()) - loop.time()))

    async def _step(self, step: Callable[[], Awaitable[bool]]) -> bool:
        """Run one step, riding out what Redis may get over; a stop waits for it to end."""

        async def marked() -> bool:
            self.busy = True
            try:
                return await step()
            finally:
                self.busy = False  # a backoff between attempts may be cut short by a stop

        return bool(await self._outage.ride(marked))

    def _claimable(self) -> Sequence[str]:
        """The streams whose pending entries this consumer may claim: all of them, or with
        `ordered=True` the partitions it owns and has taken over."""
        ownership = self._ownership
        names = self._options.names
        return names if ownership is None else ownership.readable_now(names)

    # -- this consumer's own pending entries ---------------------------------------------

    async def _retry_due(self) -> bool:
        """Claim back the retries the failure policy says are due, and move again what
        could not be moved to the dead-letter stream."""
        ownership = self._ownership
        for stream, due in self._failures.due().items():
            if ownership is not None and not ownership.valid(stream):
                continue  # left to the partition's next owner
            ids = [entry_id for entry_id, _ in due]
            self.claiming.add(stream)
            try:
                claimed = await _commands.claim(
                    self._nodes, stream, self._group, self._name, due, min_idle_ms=0
                )
            finally:
                self.claiming.discard(stream)
            # Into the ledger before anything else is awaited: were the step run again, an
            # entry claimed here must not be claimed (and its delivery counted) once more.
            self._ledger.rerun(stream, claimed, ids)
            self._queued(len(claimed))
            got = {entry[1] for entry in claimed}
            await self._drop_trimmed(stream, [i for i in ids if i not in got])
        await self._failures.move_held()
        return False

    async def _first_pass(self) -> bool:
        """A page of this consumer's own pending entries that it does not hold (what a
        consumer of the same name left behind), as many as there is room for; True if it
        took some on."""
        more = False
        for stream, start in list(self._first_cursor.items()):
            after = await self._sweep(stream, start, min_idle_ms=0)
            if after is None:
                del self._first_cursor[stream]
            else:
                more = more or after != start
                self._first_cursor[stream] = after
        return more

    async def _sweep_lost(self) -> bool:
        """Entries pending on this consumer that it does not know of (delivered in a reply
        that never arrived, a connection cut mid-read), once idle for half of
        claim_idle_ms."""
        if self.first_pass_done.is_set():
            for stream in self._claimable():
                start: bytes | str | None = "-"
                while start is not None and self._ledger.room() > 0:
                    after = await self._sweep(
                        stream, start, min_idle_ms=self._options.claim_idle_ms // 2
                    )
                    start = None if after == start else after
        return False

    async def _sweep(
        self, stream: str, start: bytes | str, *, min_idle_ms: int
    ) -> bytes | str | None:
        """Claim what fits of one page of this consumer's pending entries idle at least
        `min_idle_ms` and not held, from `start`; where the next page starts (None: no more).

        Entries out of deliveries with no dead-letter stream are left alone (parked).
        """
        ledger = self._ledger
        room = ledger.room()
        if self._stopping or ledger.reads_paused or room < 1:
            return start
        page = await _commands.pending(
            self._nodes,
            stream,
            self._group,
            self._name,
            min_idle_ms=min_idle_ms,
            start=start,
            count=PAGE,
        )
        limit = self._options.max_deliveries
        parked = (
            limit is not None
            and self._options.dead_letter_stream(stream, cluster=self._nodes.cluster) is None
        )
        lost = [
            p
            for p in page
            if not ledger.holds(stream, p.id) and not (parked and p.deliveries >= (limit or 0))
        ]
        taken = lost[:room]
        if taken:
            due = [(p.id, p.deliveries) for p in taken]
            claimed = await _commands.claim(
                self._nodes, stream, self._group, self._name, due, min_idle_ms=min_idle_ms
            )
            await self.take_on(claimed)
            got = {entry[1] for entry in claimed}
            await self._drop_trimmed(stream, [p.id for p in taken if p.id not in got])
        if len(taken) < len(lost):
            return b"(" + taken[-1].id  # the rest of this page when there is room again
        if len(page) < PAGE:
            return None
        return b"(" + page[-1].id

    async def _drop_trimmed(self, stream: str, ids: list[bytes]) -> None:
        """Pending entries deleted from the stream (MAXLEN, XTRIM, XDEL): count, log, XACK."""
        if not ids:
            return
        gone = await _commands.missing(self._nodes, stream, ids)
        if not gone:
            return
        # Redis 7 already dropped them from the PEL; Redis 6.2 keeps them until acked.
        await _commands.ack(self._nodes, stream, self._group, gone)
        self._count_trimmed(stream, len(gone))

    def _count_trimmed(self, stream: str, count: int) -> None:
        log.warning(
            "%s: %d pending entries of %s were deleted (trimmed) before they were handled; "
            "removed from the pending entries list",
            self._where,
            count,
            stream,
        )

    async def take_on(self, claimed: Sequence[Entry]) -> None:
        """Run claimed entries, or dead-letter those out of deliveries (never run twice at
        once one that is held already)."""
        ledger = self._ledger
        limit = self._options.max_deliveries
        fresh = [item for item in claimed if not ledger.holds(item[0], item[1])]
        spent = [item for item in fresh if limit is not None and item[3] > limit]
        runnable = [item for item in fresh if limit is None or item[3] <= limit]
        ledger.delivered(runnable)
        self._queued(len(runnable))
        for item in spent:
            ledger.hold_running(item)
            try:
                outcome = await self._failures.reject(
                    item,
                    Reason.FAILED,
                    None,
                    f"delivered {item[3]} times (max_deliveries={limit}) without being "
                    "acked: its consumer kept failing, crashing or being stopped",
                )
            except BaseException:
                # Stopped during the move: this one stays held, as cancelled; the others
                # were never taken on, and stay pending.
                ledger.cancelled([item])
                raise
            if self._failures.unrun is not None:
                self._failures.unrun(item, outcome)

    # -- other consumers' idle entries ---------------------------------------------------

    async def _claim_others(self) -> bool:
        """One paced XAUTOCLAIM step per stream; True if the scan should go on soon."""
        ledger = self._ledger
        more = False
        for stream in self._claimable():
            room = min(ledger.room(), self._options.batch_size)
            if room < 1 or self._stopping or ledger.reads_paused:
                return more
            cursor, claimed, deleted = await _commands.autoclaim(
                self._nodes,
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
                self.claimed += len(claimed)
                log.info(
                    "%s: claimed %d entries of %s idle for %d ms or more",
                    self._where,
                    len(claimed),
                    stream,
                    self._options.claim_idle_ms,
                )
                counts = await _commands.deliveries(
                    self._nodes,
                    stream,
                    self._group,
                    self._name,
                    [entry_id for entry_id, _ in claimed],
                )
                # One not pending here any more (acked, or claimed by another meanwhile) is
                # not ours to run.
                await self.take_on(
                    [
                        entry(stream, entry_id, flat, counts[entry_id])
                        for entry_id, flat in claimed
                        if entry_id in counts
                    ]
                )
            more = more or bool(claimed) or cursor != b"0-0"
        return more

    # -- renewal and cleanup -------------------------------------------------------------

    async def _renew(self) -> bool:
        """Reset the idle time of every entry this consumer holds that is still pending on
        it (no delivery counted); one another consumer claimed meanwhile stays that one's."""
        for stream in self._options.names:
            held = sorted(self._ledger.ids(stream))
            for start in range(0, len(held), 1000):
                chunk = held[start : start + 1000]
                renewed = await self._renew_chunk(stream, chunk)
                self.renewed += len(renewed)
                self._ledger.unpark(stream, [i for i in chunk if i not in renewed])
            log.debug("%s: renewed %d held entries of %s", self._where, len(held), stream)
        return False

    async def _renew_chunk(self, stream: str, ids: list[bytes]) -> set[bytes]:
        try:
            return await _commands.renew(
                self._nodes, stream, self._group, self._name, ids, checked=self._renew_checked
            )
        except REFUSALS as exc:
            if not self._renew_checked:
                raise
            self._renew_checked = False
            log.warning(
                "%s: renewing held entries with a script was refused (%s); renewing with a "
                "bare XCLAIM from now on, which also takes back entries another consumer "
                "claimed while this one was paused; expected +eval in the ACL",
                self._where,
                exc,
            )
            return await self._renew_chunk(stream, ids)

    async def _trim_acked(self) -> bool:
        """Remove the entries of each stream that every group has read and acked, where this
        consumer takes the stream's trim lock for the interval (SET NX PX)."""
        interval = self._trim_interval
        assert interval is not None
        for stream in self._options.names:
            lock = f"{stream}:trim-lock"
            try:
                taken = await self._nodes.raw(
                    lock, "SET", lock, self._trim_token, "NX", "PX", max(1, int(interval * 1000))
                )
            except REFUSALS as exc:
                log.error(
                    "%s: trim_acked_every is off from now on: the trim lock %s was refused "
                    "(%s); expected +set in the ACL",
                    self._where,
                    lock,
                    exc,
                )
                self._trim_interval = None
                return False
            if taken is None:
                continue  # another process trims it this interval
            try:
                result = await _trim.trim(self._nodes, stream)
            except NotFoundError:
                continue  # the stream is gone (it is made again with the group)
            except RedisRefusedError as exc:
                log.error("%s: trim_acked_every is off from now on: %s", self._where, exc)
                self._trim_interval = None
                return False
            self.trimmed += result.removed
            log.log(
                logging.INFO if result.removed else logging.DEBUG,
                "%s: trimmed %d entries of %s that every group has acked; %d remain%s",
                self._where,
                result.removed,
                stream,
                result.remaining,
                f" (held back by group {result.held_back_by}: {result.held_back_because})"
                if result.held_back_by
                else "",
            )
        return False

    async def _forget_idle_consumers(self) -> bool:
        after = self._options.delete_idle_consumers_after
        assert after is not None
        for stream in self._options.names:
            for other in await _commands.consumers(self._nodes, stream, self._group):
                if other.name == self._name or other.pending or other.idle_ms < after * 1000:
                    continue
                # DELCONSUMER drops a consumer's pending entries: the script checks for none
                # in the same step, so one that has just read keeps what it read.
                if await _commands.delete_consumer_if_idle(
                    self._nodes, stream, self._group, other.name
                ):
                    log.info(
                        "%s: deleted consumer %s of %s (idle %.1f s, nothing pending)",
                        self._where,
                        other.name,
                        stream,
                        other.idle_ms / 1000,
                    )
        return False
