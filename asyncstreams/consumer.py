"""One registered handler at run time: a reader, a pool of handler workers, an ack flusher.

    XREADGROUP -> queue -> workers (at most `concurrency` handlers at once) -> ack batch -> XACK
                    ^                                                              |
                    +------------- room freed when the XACK is answered -----------+

Backpressure lives in one number, `_outstanding`: entries delivered to this consumer and not
yet acked (queued, running, or waiting in the ack batch). The reader asks Redis for no more
than `concurrency + batch_size - _outstanding`, so memory stays flat under any backlog.

The per-entry path uses plain asyncio futures and a deque rather than anyio primitives:
a fixed pool of worker tasks pulling from a deque costs no task creation per entry.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass

import anyio

from . import _redis
from ._backoff import Backoff, Outage
from ._redis import Acker, Entry, GroupReader, Redis
from .codec import HandlerPlan
from .options import ConsumerOptions

log = logging.getLogger("asyncstreams.consumer")

# How long a finished entry may wait for others to share its XACK.
ACK_INTERVAL = 0.002
# How long the final ack flush at shutdown may take before the rest is left pending.
FINAL_FLUSH_TIMEOUT = 5.0


@dataclass(slots=True)
class Stats:
    acked: int = 0
    failed: int = 0
    cancelled: int = 0
    left_pending: int = 0


class Consumer:
    """Runs one handler over its streams as one consumer of its group."""

    def __init__(
        self, plan: HandlerPlan, options: ConsumerOptions, client: Redis, name: str
    ) -> None:
        self.plan = plan
        self.options = options
        self.name = name
        self.stats = Stats()
        self._client = client
        self._where = (
            f"{plan.name} [{','.join(options.streams)} group={options.group} consumer={name}]"
        )
        self._outage = Outage(log, self._where)
        self._invoke = plan.bind(options.group, name)
        self._reader = GroupReader(client, options.streams, options.group, name, options.block_ms)
        self._acker = Acker(client, options.group)
        self._n_streams = len(options.streams)
        self._limit = options.concurrency + options.batch_size
        self._outstanding = 0
        self._queue: deque[Entry] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()
        self._top_up_scheduled = False
        self._room: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._acks: dict[str, list[bytes]] = {stream: [] for stream in options.streams}
        self._ack_count = 0
        self._ack_due = asyncio.Event()
        self._stopping = False
        self.failure: BaseException | None = None

    async def run(
        self,
        stop: anyio.Event,
        grace_period: float,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Consume until `stop` is set, then shut down in order; see `_shutdown`.

        If one of the consumer's own tasks fails, the failure is kept in `failure` and `stop`
        is set, so the whole app stops gracefully and reports it.
        """
        loop = asyncio.get_running_loop()

        def start(coro: Coroutine[None, None, None], what: str) -> asyncio.Task[None]:
            task = loop.create_task(coro, name=f"asyncstreams {what} {self.plan.name}")
            task.add_done_callback(lambda t: self._watch(t, what, stop))
            return task

        workers = [start(self._work(), "worker") for _ in range(self.options.concurrency)]
        flusher = start(self._flush_loop(), "ack flusher")
        reader = start(self._read_loop(), "reader")
        log.info(
            "consuming streams=%s group=%s consumer=%s concurrency=%d batch_size=%d handler=%s",
            ",".join(self.options.streams),
            self.options.group,
            self.name,
            self.options.concurrency,
            self.options.batch_size,
            self.plan.name,
        )
        task_status.started()
        try:
            await stop.wait()
            await self._stop_reading(reader)
            await self._drain(grace_period)
        finally:
            with anyio.CancelScope(shield=True):
                await self._shutdown(reader, workers, flusher)

    def _watch(self, task: asyncio.Task[None], what: str, stop: anyio.Event) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        if self.failure is None:
            self.failure = exc
        log.error("%s: the %s failed; stopping the app", self._where, what, exc_info=exc)
        stop.set()

    async def ensure_groups(self) -> None:
        """Create the group on each stream where it is missing (MKSTREAM; BUSYGROUP is fine)."""
        options = self.options
        for stream in options.streams:
            if await _redis.ensure_group(self._client, stream, options.group, options.start_id):
                log.info(
                    "created group %s on stream %s at %s", options.group, stream, options.start_id
                )

    # -- reading -----------------------------------------------------------------------

    async def _read_loop(self) -> None:
        reader = self._reader
        backoff = Backoff()
        loop = asyncio.get_running_loop()
        batch_size = self.options.batch_size
        n_streams = self._n_streams
        try:
            while not self._stopping:
                if not self._may_read():
                    self._room = loop.create_future()
                    await self._room
                    self._room = None
                    continue
                # COUNT applies per stream: never ask for more than there is room for.
                room = self._limit - self._outstanding
                count = min(batch_size, room) // n_streams
                try:
                    entries = await reader.read(count)
                except Exception as exc:
                    if not await self._recover(exc, backoff):
                        raise
                    continue
                backoff.reset()
                self._outage.end()
                if entries:
                    self._dispatch(entries)
        finally:
            await reader.close()

    async def _recover(self, exc: Exception, backoff: Backoff) -> bool:
        """Ride out what Redis may get over; False for an error that retrying cannot fix."""
        if _redis.is_nogroup(exc):
            log.warning("%s: the stream or group is gone (%s); recreating it", self._where, exc)
            try:
                await self.ensure_groups()
                return True
            except Exception as again:
                exc = again
        if not _redis.is_transient(exc):
            return False
        self._outage.begin(exc)
        await asyncio.sleep(backoff.next_delay())
        return True

    def _dispatch(self, entries: list[Entry]) -> None:
        self._outstanding += len(entries)
        self._queue.extend(entries)
        if not self._idle:
            return
        self._wake(1)
        # Wake more workers only once the first one yields: a handler that never awaits
        # anything runs the whole batch in that one worker without waking the others.
        if len(entries) > 1 and not self._top_up_scheduled:
            self._top_up_scheduled = True
            asyncio.get_running_loop().call_soon(self._top_up)

    def _top_up(self) -> None:
        self._top_up_scheduled = False
        self._wake(len(self._queue))

    def _wake(self, n: int) -> None:
        idle = self._idle
        for _ in range(min(n, len(idle))):
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _may_read(self) -> bool:
        """Read a full batch when there is room for one, or less rather than let workers idle."""
        room = self._limit - self._outstanding
        return room >= self.options.batch_size or (not self._queue and room >= self._n_streams)

    def _release(self, n: int) -> None:
        """`n` delivered entries are done with (acked or given up): room for more."""
        self._outstanding -= n
        room = self._room
        if room is not None and not room.done() and self._may_read():
            room.set_result(None)

    # -- handling ----------------------------------------------------------------------

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        idle = self._idle
        invoke = self._invoke
        acks = self._acks
        ack_due = self._ack_due
        ack_threshold = self.options.batch_size
        n_workers = self.options.concurrency
        while True:
            if not queue:
                drained = self._drained
                if drained is not None and len(idle) + 1 == n_workers and not drained.done():
                    drained.set_result(None)
                waiter = loop.create_future()
                idle.append(waiter)
                await waiter
                continue
            stream, entry_id, flat, deliveries = queue.popleft()
            try:
                await invoke(stream, entry_id, flat, deliveries)
            except asyncio.CancelledError:
                self.stats.cancelled += 1
                raise
            except Exception as exc:
                self._failed(stream, entry_id, deliveries, exc)
                continue
            acks[stream].append(entry_id)
            self._ack_count += 1
            if self._ack_count >= ack_threshold or self._room is not None:
                ack_due.set()
            elif self._ack_count == 1:
                loop.call_later(ACK_INTERVAL, ack_due.set)

    def _failed(self, stream: str, entry_id: bytes, deliveries: int, exc: Exception) -> None:
        """The handler raised or its input did not decode: the entry stays pending."""
        self.stats.failed += 1
        log.error(
            "%s: handler failed on entry %s of %s (delivery %d); left pending: %s: %s",
            self._where,
            entry_id.decode(),
            stream,
            deliveries,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        self._release(1)

    # -- acking ------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await self._ack_due.wait()
            self._ack_due.clear()
            await self._flush()

    async def _flush(self) -> None:
        """XACK everything buffered, and whatever finishes meanwhile; keep it through outages."""
        backoff = Backoff()
        acks = self._acks  # the workers hold this dict: swap the lists inside it, not the dict
        while self._ack_count:
            batch = {stream: ids for stream, ids in acks.items() if ids}
            for stream in batch:
                acks[stream] = []
            count, self._ack_count = self._ack_count, 0
            try:
                await self._acker.ack(batch)
            except BaseException as exc:
                if _redis.is_nogroup(exc):
                    log.warning("%s: %d acks dropped: the group is gone", self._where, count)
                    self._release(count)
                    continue
                # Keep them, oldest first: XACK is idempotent, so sending them again is safe.
                for stream, ids in batch.items():
                    acks[stream] = ids + acks[stream]
                self._ack_count += count
                if not _redis.is_transient(exc):
                    raise
                self._outage.begin(exc)
                await asyncio.sleep(backoff.next_delay())
                continue
            else:
                self.stats.acked += count
                self._outage.end()
            self._release(count)

    # -- stopping ----------------------------------------------------------------------

    async def _stop_reading(self, reader: asyncio.Task[None]) -> None:
        """Stop asking for entries without losing a reply that is already on its way."""
        self._stopping = True
        if self._room is not None and not self._room.done():
            self._room.set_result(None)
        deadline = asyncio.get_running_loop().time() + self.options.block_ms / 1000 + 1
        while not reader.done():
            if not self._reader.blocked:
                reader.cancel()  # waiting for room or backing off: nothing in flight
            elif asyncio.get_running_loop().time() > deadline:
                reader.cancel()
            else:
                # CLIENT UNBLOCK makes XREADGROUP return as if BLOCK ran out: no entry is
                # delivered to a reply we would drop.
                await self._reader.unblock(self._client)
            await asyncio.wait([reader], timeout=0.05)

    async def _drain(self, grace_period: float) -> None:
        """Let the handlers finish what was delivered, for at most `grace_period` seconds."""
        self._drained = asyncio.get_running_loop().create_future()
        if not self._queue and len(self._idle) == self.options.concurrency:
            return
        with anyio.move_on_after(grace_period):
            await self._drained

    async def _shutdown(
        self,
        reader: asyncio.Task[None],
        workers: list[asyncio.Task[None]],
        flusher: asyncio.Task[None],
    ) -> None:
        """The shutdown order, from wherever `run` was left (stop requested or cancelled):

        1. stop reading (if `_stop_reading` did not get to it),
        2. cancel the handlers still running: their entries stay pending, not acked, not lost,
        3. flush the acks of everything that finished, within FINAL_FLUSH_TIMEOUT,
        4. log one summary line.
        """
        self._stopping = True
        reader.cancel()
        self.stats.left_pending = len(self._queue)
        for task in workers:
            task.cancel()
        await asyncio.gather(reader, *workers, return_exceptions=True)
        flusher.cancel()
        await asyncio.gather(flusher, return_exceptions=True)
        with anyio.move_on_after(FINAL_FLUSH_TIMEOUT):
            await self._flush()
        await self._acker.close()
        unacked = self._ack_count
        stats = self.stats
        log.info(
            "%s: stopped; %d acked, %d failed, %d cancelled, %d never started%s",
            self._where,
            stats.acked,
            stats.failed,
            stats.cancelled,
            stats.left_pending,
            f", {unacked} acks not sent (entries stay pending)" if unacked else "",
        )
