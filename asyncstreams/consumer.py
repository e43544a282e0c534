"""One registered handler at run time: a reader, a pool of handler workers, an ack flusher,
and the recovery of pending entries (see recovery.py).

    XREADGROUP / XCLAIM -> queue -> workers (at most `concurrency` at once) -> ack batch -> XACK
                             ^                            | raised               |
                             |                            v                      |
                             |          stays pending: retried, or dead-lettered |
                             +--------- room freed when the XACK is answered ----+

Backpressure lives in one number, `_outstanding`: entries delivered to this consumer and not
yet done with (queued, running, or waiting in the ack batch). Neither the reader nor the
recovery asks Redis for more than `concurrency + batch_size - _outstanding`, so memory stays
flat under any backlog.

The per-entry path uses plain asyncio futures and a deque rather than anyio primitives:
a fixed pool of worker tasks pulling from a deque costs no task creation per entry. Measured
on uvloop (2-core machine, a no-op coroutine per entry): anyio's `start_soon` in one task
group, 18,500 entries/s; `loop.create_task` per entry, 171,000/s; the worker pool, 2,070,000/s.
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
from ._redis import Acker, GroupReader, Redis
from ._tasks import cancel_and_wait
from .codec import HandlerPlan
from .deadletter import Reason
from .failures import Failures, TooLarge
from .message import Entry
from .options import ConsumerOptions
from .recovery import Recovery

log = logging.getLogger("asyncstreams.consumer")

# How long a finished entry may wait for others to share its XACK.
ACK_INTERVAL = 0.002
# How long the final ack flush at shutdown may take before the rest is left pending.
FINAL_FLUSH_TIMEOUT = 5.0
# How long the consumer's own tasks get to stop once cancelled.
STOP_TIMEOUT = 5.0


@dataclass(slots=True)
class Stats:
    acked: int = 0
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
        self.client = client
        self.stats = Stats()
        self.where = (
            f"{plan.name} [{','.join(options.streams)} group={options.group} consumer={name}]"
        )
        self.failure: BaseException | None = None
        self._outage = Outage(log, self.where)
        self._invoke = plan.bind(options.group, name)
        self._invoke_batch = plan.bind_batch(options.group, name) if plan.batch else None
        self._reader = GroupReader(client, options.streams, options.group, name, options.block_ms)
        self._acker = Acker(client, options.group)
        self.failures = Failures(client, options, name, self.where)
        self._recovery = Recovery(self)
        self._n_streams = len(options.streams)
        self._limit = options.concurrency + options.batch_size
        self._outstanding = 0
        self._queue: deque[Entry] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()
        # What each worker is running: one entry, or for a batch handler, a batch.
        self._current: list[Entry | None] = [None] * options.concurrency
        self._current_batches: list[list[Entry]] = [[] for _ in range(options.concurrency)]
        self._top_up_scheduled = False
        self._room_waiters: list[asyncio.Future[None]] = []
        self._drained: asyncio.Future[None] | None = None
        self._acks: dict[str, list[bytes]] = {stream: [] for stream in options.streams}
        self._acking: dict[str, list[bytes]] = {}
        self._ack_count = 0
        self._ack_due = asyncio.Event()
        self._stopping = False

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def run(
        self,
        stop: anyio.Event,
        grace_period: float,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Consume until `stop` is set, then shut down in order (see `_shutdown`).

        If one of the consumer's own tasks fails, the failure is kept in `failure` and `stop`
        is set, so the whole app stops gracefully and reports it.
        """
        loop = asyncio.get_running_loop()

        def start(coro: Coroutine[None, None, None], what: str) -> asyncio.Task[None]:
            task = loop.create_task(coro, name=f"asyncstreams {what} {self.plan.name}")
            task.add_done_callback(lambda t: self._watch(t, what, stop))
            return task

        work = self._work_batches if self.plan.batch else self._work
        workers = [start(work(i), "worker") for i in range(self.options.concurrency)]
        flusher = start(self._flush_loop(), "ack flusher")
        recovery = start(self._recovery.run(), "recovery")
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
            await self._stop_reading(reader, recovery)
            await self._drain(grace_period)
        finally:
            with anyio.CancelScope(shield=True):
                await self._shutdown([reader, recovery, *workers, flusher])

    def _watch(self, task: asyncio.Task[None], what: str, stop: anyio.Event) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        if self.failure is None:
            self.failure = exc
        log.error("%s: the %s failed; stopping the app", self.where, what, exc_info=exc)
        stop.set()

    async def ensure_groups(self) -> None:
        """Create the group on each stream where it is missing (MKSTREAM; BUSYGROUP is fine).

        A group recreated after it was deleted starts after the last entry this consumer
        read, not at `start_id`: what was handled is not delivered again.
        """
        options = self.options
        for stream in options.streams:
            start_id = self._reader.last_ids.get(stream, options.start_id)
            if await _redis.ensure_group(self.client, stream, options.group, start_id):
                log.info("created group %s on stream %s at %s", options.group, stream, start_id)

    async def recover(self, exc: Exception, backoff: Backoff) -> bool:
        """Ride out what Redis may get over; False for an error that retrying cannot fix."""
        if _redis.is_group_gone(exc):
            log.warning("%s: the stream or group is gone (%s); recreating it", self.where, exc)
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

    # -- room --------------------------------------------------------------------------

    def room(self) -> int:
        """How many more entries this consumer may take on."""
        return self._limit - self._outstanding

    def _may_read(self) -> bool:
        """Read a full batch when there is room for one, or less rather than let workers idle."""
        room = self._limit - self._outstanding
        return room >= self.options.batch_size or (not self._queue and room >= self._n_streams)

    async def wait_for_room(self) -> int:
        """Wait until a batch may be taken on (or the consumer stops); returns the room."""
        while not self._may_read() and not self._stopping:
            waiter = asyncio.get_running_loop().create_future()
            self._room_waiters.append(waiter)
            await waiter
        return self.room()

    def _release(self, n: int) -> None:
        """`n` delivered entries are done with (acked, or left to Redis): room for more."""
        self._outstanding -= n
        if self._room_waiters and self._may_read():
            self._wake_room_waiters()

    def _wake_room_waiters(self) -> None:
        waiters, self._room_waiters = self._room_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- reading -----------------------------------------------------------------------

    async def _read_loop(self) -> None:
        reader = self._reader
        backoff = Backoff()
        batch_size = self.options.batch_size
        n_streams = self._n_streams
        # The consumer's own pending entries come first (a restart under the same name).
        await self._recovery.first_pass_done.wait()
        try:
            while not self._stopping:
                if not self._may_read():
                    await self.wait_for_room()
                    continue
                # COUNT applies per stream: never ask for more than there is room for.
                count = min(batch_size, self.room()) // n_streams
                try:
                    entries = await reader.read(count)
                except Exception as exc:
                    if not await self.recover(exc, backoff):
                        raise
                    continue
                backoff.reset()
                self._outage.end()
                if entries:
                    self._dispatch(entries)
        finally:
            await reader.close()

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

    async def admit(self, stream: str, entries: list[tuple[bytes, list[bytes], int]]) -> None:
        """Take on claimed entries: run them, or dead-letter those out of deliveries."""
        held = self.held(stream)
        limit = self.options.max_deliveries
        runnable: list[Entry] = []
        for entry_id, flat, deliveries in entries:
            if entry_id in held:
                continue  # already ours and on its way: never run one entry twice at once
            entry = (stream, entry_id, flat, deliveries)
            if limit is not None and deliveries > limit:
                await self.failures.reject(
                    entry,
                    Reason.FAILED,
                    None,
                    f"delivered {deliveries} times (max_deliveries={limit}) without being "
                    "acked: its consumer kept failing, crashing or being stopped",
                )
            else:
                runnable.append(entry)
        if runnable:
            self._dispatch(runnable)

    def held(self, stream: str) -> set[bytes]:
        """Ids of the entries of `stream` this consumer holds: queued, running, being acked,
        waiting for a retry, or parked (out of deliveries with no dead-letter stream)."""
        held = self.failures.held(stream)
        held.update(entry[1] for entry in self._queue if entry[0] == stream)
        held.update(entry[1] for entry in self._current if entry is not None and entry[0] == stream)
        for batch in self._current_batches:
            held.update(entry[1] for entry in batch if entry[0] == stream)
        held.update(self._acks[stream])
        held.update(self._acking.get(stream, ()))
        return held

    # -- handling ----------------------------------------------------------------------

    async def _work(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        current = self._current
        invoke = self._invoke
        acks = self._acks
        ack_due = self._ack_due
        ack_threshold = self.options.batch_size
        max_payload = self.options.max_payload_bytes
        while True:
            if not queue:
                await self._park()
                continue
            entry = current[index] = queue.popleft()
            stream, entry_id, flat, deliveries = entry
            try:
                if max_payload is not None and sum(map(len, flat)) > max_payload:
                    raise TooLarge(entry, max_payload)
                await invoke(stream, entry_id, flat, deliveries)
            except asyncio.CancelledError:
                self.stats.cancelled += 1
                raise
            except Exception as exc:
                await self._failed(entry, exc)
                current[index] = None
                continue
            # Acked inline, not through _acked_batch: this runs once per entry.
            acks[stream].append(entry_id)
            current[index] = None
            self._ack_count += 1
            if self._ack_count >= ack_threshold or self._room_waiters:
                ack_due.set()
            elif self._ack_count == 1:
                loop.call_later(ACK_INTERVAL, ack_due.set)

    async def _park(self) -> None:
        """A worker found the queue empty: wait until the reader queues entries.

        The reader may read on now (while the last acks are still on their way, not after
        they return), and a drain is over when the last worker parks.
        """
        if self._room_waiters and self._may_read():
            self._wake_room_waiters()
        drained = self._drained
        everyone_idle = len(self._idle) + 1 == self.options.concurrency
        if drained is not None and everyone_idle and not drained.done():
            drained.set_result(None)
        waiter = asyncio.get_running_loop().create_future()
        self._idle.append(waiter)
        await waiter

    async def _work_batches(self, index: int) -> None:
        """A worker of a batch handler: each call gets what is queued, up to `batch_size`.

        Entries on a retry run one per call: one entry that keeps failing must not take the
        rest of its first batch to the dead-letter stream with it.
        """
        loop = asyncio.get_running_loop()
        queue = self._queue
        batch_size = self.options.batch_size
        while True:
            if not queue:
                await self._park()
                continue
            taken = self._current_batches[index] = [
                queue.popleft() for _ in range(min(len(queue), batch_size))
            ]
            first = [entry for entry in taken if entry[3] == 1]
            retries = [[entry] for entry in taken if entry[3] > 1]
            try:
                for batch in [first, *retries] if first else retries:
                    await self._run_batch(batch, loop)
            finally:
                self._current_batches[index] = []

    async def _run_batch(self, batch: list[Entry], loop: asyncio.AbstractEventLoop) -> None:
        """One call of a batch handler. Entries too large or that do not decode are split
        out and dealt with one by one; the others go to the handler together."""
        invoke_batch = self._invoke_batch
        assert invoke_batch is not None
        max_payload = self.options.max_payload_bytes
        if max_payload is not None:
            fits = []
            for entry in batch:
                if sum(map(len, entry[2])) > max_payload:
                    await self._failed(entry, TooLarge(entry, max_payload))
                else:
                    fits.append(entry)
            batch = fits
        passed, rejected, call = invoke_batch(batch)
        for entry, exc in rejected:
            await self._failed(entry, exc)
        if call is None:
            return
        try:
            await call
        except asyncio.CancelledError:
            self.stats.cancelled += len(passed)
            raise
        except Exception as exc:
            log.warning(
                "%s: handler failed on a batch of %d entries (%s to %s of %s); each stays "
                "pending and runs again on its own",
                self.where,
                len(passed),
                passed[0][1].decode(),
                passed[-1][1].decode(),
                ",".join(sorted({entry[0] for entry in passed})),
                exc_info=exc,
            )
            for entry in passed:
                await self._failed(entry, exc, logged=True)
        else:
            self._acked_batch(passed, loop)

    def _acked_batch(self, entries: list[Entry], loop: asyncio.AbstractEventLoop) -> None:
        for stream, entry_id, _, _ in entries:
            self._acks[stream].append(entry_id)
        first = self._ack_count == 0
        self._ack_count += len(entries)
        if self._ack_count >= self.options.batch_size or self._room_waiters:
            self._ack_due.set()
        elif first:  # as in _work: one timer per ack batch, not one per call
            loop.call_later(ACK_INTERVAL, self._ack_due.set)

    async def _failed(self, entry: Entry, exc: Exception, *, logged: bool = False) -> None:
        """The entry was not handled: retried later, dead-lettered, or parked (failures.py)."""
        try:
            await self.failures.failed(entry, exc, logged=logged)
        finally:
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
            self._acking = batch
            try:
                await self._acker.ack(batch)
            except BaseException as exc:
                if _redis.is_group_gone(exc):
                    log.warning("%s: %d acks dropped: the group is gone", self.where, count)
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
            finally:
                self._acking = {}
            self.stats.acked += count
            self._outage.end()
            self._release(count)

    # -- stopping ----------------------------------------------------------------------

    async def _stop_reading(self, reader: asyncio.Task[None], recovery: asyncio.Task[None]) -> None:
        """Stop asking for entries without losing a reply that is already on its way."""
        self._stopping = True
        self._wake_room_waiters()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.block_ms / 1000 + 1
        while not reader.done() and loop.time() < deadline:
            if not self._reader.blocked:
                break  # waiting for room or backing off: nothing in flight to lose
            # CLIENT UNBLOCK makes XREADGROUP return as if BLOCK ran out: no entry is
            # delivered to a reply we would drop.
            await self._reader.unblock(self.client)
            await asyncio.wait([reader], timeout=0.05)
        # The recovery stops after the step it is in (claimed entries are not left behind).
        if self._recovery.busy:
            await asyncio.wait([recovery], timeout=_redis.SOCKET_TIMEOUT)
        await cancel_and_wait([reader, recovery], STOP_TIMEOUT)

    async def _drain(self, grace_period: float) -> None:
        """Let the handlers finish what was delivered, for at most `grace_period` seconds."""
        self._drained = asyncio.get_running_loop().create_future()
        if not self._queue and len(self._idle) == self.options.concurrency:
            return
        with anyio.move_on_after(grace_period):
            await self._drained

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        """The shutdown order, from wherever `run` was left (stop requested or cancelled):

        1. stop reading and claiming (if `_stop_reading` did not get to it),
        2. cancel the handlers still running: their entries stay pending, not acked, not lost,
        3. flush the acks of everything that finished, within FINAL_FLUSH_TIMEOUT,
        4. log one summary line.
        """
        self._stopping = True
        self.stats.left_pending = len(self._queue)
        stuck = await cancel_and_wait(tasks, STOP_TIMEOUT)
        if stuck:
            log.error(
                "%s: %d tasks did not stop within %.0f s of being cancelled (a handler that "
                "swallows cancellation?); their entries stay pending",
                self.where,
                len(stuck),
                STOP_TIMEOUT,
            )
        with anyio.move_on_after(FINAL_FLUSH_TIMEOUT):
            await self._flush()
        await self._acker.close()
        unacked = self._ack_count
        stats = self.stats
        log.info(
            "%s: stopped; %d acked, %d retried, %d dead-lettered, %d cancelled, %d never started%s",
            self.where,
            stats.acked,
            self.failures.retried,
            self.failures.dead_lettered,
            stats.cancelled,
            stats.left_pending,
            f", {unacked} acks not sent (entries stay pending)" if unacked else "",
        )
