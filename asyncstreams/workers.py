"""The handler workers of one consumer: a fixed pool of tasks taking queued entries from the
ledger, calling the handler, and telling the ledger how it went.

The per-entry path uses plain asyncio futures and the ledger's deque rather than anyio
primitives: a fixed pool of worker tasks costs no task creation per entry. Measured on
uvloop (2-core machine, a no-op coroutine per entry): anyio's `start_soon` in one task
group, 18,500 entries/s; `loop.create_task` per entry, 171,000/s; the worker pool,
2,070,000/s. The pool itself is one task of the consumer's task group, which owns it.

What a handler raises is a failure of its entry (failures.py), whatever it is: any
Exception, a BaseException of its own, and an `asyncio.CancelledError` that the consumer
did not cause (a library's timeout, say). Only the consumer's own stop cancels a handler.
A handler that raises KeyboardInterrupt or SystemExit also stops the app, gracefully.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import anyio
import anyio.abc

from ._logsetup import ENTRY
from ._tasks import cancel_and_wait
from .codec import Invoke, InvokeBatch
from .failures import Failures, TooLarge
from .ledger import Ledger
from .message import Entry
from .middleware import Call, Chain, Outcome

log = logging.getLogger("asyncstreams.consumer")

# How long the workers get to stop once cancelled.
STOP_TIMEOUT = 5.0
# What a handler may raise to stop the process; it also fails its entry.
EXITS = (KeyboardInterrupt, SystemExit)


@dataclass(slots=True)
class Counts:
    cancelled: int = 0


class Workers:
    """`concurrency` tasks that run the handler on what the ledger has queued."""

    def __init__(
        self,
        ledger: Ledger,
        failures: Failures,
        *,
        concurrency: int,
        max_payload_bytes: int | None,
        batch_size: int,
        invoke: Invoke | None,
        invoke_batch: InvokeBatch | None,
        exit_requested: Callable[[BaseException], None],
        name: str,
        chain: Chain | None = None,
        call: Callable[[Sequence[Entry]], Call] | None = None,
        record: Callable[[Entry, float], None] | None = None,
        discard: Callable[[Sequence[Entry]], None] | None = None,
    ) -> None:
        self._ledger = ledger
        self._failures = failures
        self._concurrency = concurrency
        self._max_payload = max_payload_bytes
        self._batch_size = batch_size
        self._invoke = invoke
        self._invoke_batch = invoke_batch
        self._exit_requested = exit_requested
        self._name = name
        # Middleware, when there is any: `call` makes the Call of a batch of entries.
        self._chain = chain
        self._call = call
        # The chain's cheaper way to tell of an acked entry, if it has one (Chain.recorder).
        self._record = record
        # A pipeline's: forget what the call of these entries staged (it failed after all).
        self._discard = discard
        self.counts = Counts()
        self._idle: list[asyncio.Future[None]] = []
        self._top_up_scheduled = False
        self._drained: asyncio.Future[None] | None = None

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the workers until cancelled; a worker that fails (a bug) fails this too.

        Stopping is bounded: a handler that will not stop when cancelled is left behind
        after STOP_TIMEOUT (its entry stays pending), so a stop never hangs.
        """
        loop = asyncio.get_running_loop()
        if self._invoke is None:
            work = self._work_batches
        else:
            work = (
                self._work
                if self._chain is None
                else self._work_recording
                if self._record is not None
                else self._work_with_middleware
            )
        tasks = [
            loop.create_task(work(), name=f"asyncstreams worker {self._name}")
            for _ in range(self._concurrency)
        ]
        task_status.started()
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises what the worker died of
        finally:
            # Shielded: this task is being cancelled, and its handlers must be waited for
            # (their cleanup, their entries' state) before the consumer's shutdown goes on.
            with anyio.CancelScope(shield=True):
                stuck = await cancel_and_wait(tasks, STOP_TIMEOUT)
            if stuck:
                log.error(
                    "%s: %d handlers did not stop within %.0f s of being cancelled (a handler "
                    "that swallows cancellation?); their entries stay pending",
                    self._name,
                    len(stuck),
                    STOP_TIMEOUT,
                )

    # -- waking and draining -----------------------------------------------------------

    def wake(self, count: int) -> None:
        """`count` entries were queued: wake a worker for them.

        More workers are woken only once the first one yields: a handler that never awaits
        anything runs the whole batch in that one worker without waking the others.
        """
        if not self._idle:
            return
        self._wake(1)
        if count > 1 and not self._top_up_scheduled:
            self._top_up_scheduled = True
            asyncio.get_running_loop().call_soon(self._top_up)

    def _top_up(self) -> None:
        self._top_up_scheduled = False
        self._wake(len(self._ledger.queue))

    def _wake(self, count: int) -> None:
        idle = self._idle
        for _ in range(min(count, len(idle))):
            waiter = idle.pop()
            if not waiter.done():
                waiter.set_result(None)

    @property
    def idle(self) -> bool:
        """Every worker waits for entries and none are queued."""
        return not self._ledger.queue and len(self._idle) == self._concurrency

    async def drain(self, grace_period: float) -> None:
        """Let the handlers finish what was queued, for at most `grace_period` seconds."""
        if self.idle:
            return
        self._drained = asyncio.get_running_loop().create_future()
        with anyio.move_on_after(grace_period):
            await self._drained

    async def _park(self) -> None:
        """A worker found the queue empty: wait until entries are queued.

        The reader may read on now (while the last acks are still on their way, not after
        they return), and a drain is over when the last worker parks.
        """
        self._ledger.wake_reader()
        drained = self._drained
        everyone_idle = len(self._idle) + 1 == self._concurrency
        if drained is not None and everyone_idle and not drained.done():
            drained.set_result(None)
        waiter = asyncio.get_running_loop().create_future()
        self._idle.append(waiter)
        await waiter

    # -- running handlers --------------------------------------------------------------

    @staticmethod
    def _raise_if_stopping() -> None:
        """A handler that swallowed the stop's cancellation (and raised something else)
        must not take the worker on to the next entry."""
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError

    def _ours(self, exc: BaseException) -> bool:
        """Whether `exc` is the consumer's own cancellation of this worker."""
        task = asyncio.current_task()
        return (
            isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling() > 0
        )

    async def _settle(
        self, failed: Sequence[tuple[Entry, BaseException]], *, logged: int = 0
    ) -> list[Outcome]:
        """Running entries that were not handled go through the failure policy, one by one
        (the first `logged` were logged already, as a batch); returns what became of each.
        Cancelled meanwhile (in a move to the dead-letter stream), the rest stay held, as
        cancelled."""
        outcomes: list[Outcome] = []
        for index, (entry, exc) in enumerate(failed):
            # What the failure policy logs of it names the entry (`--log-format json`).
            token = ENTRY.set((entry[0], entry[1].decode()))
            try:
                outcomes.append(await self._failures.failed(entry, exc, logged=index < logged))
            except BaseException:
                self._ledger.cancelled([entry for entry, _ in failed[index:]])
                self._report_split(failed, outcomes)
                raise
            finally:
                ENTRY.reset(token)
        for _, exc in failed:
            if isinstance(exc, EXITS):
                self._exit_requested(exc)
                break
        return outcomes

    def _report_split(
        self, failed: Sequence[tuple[Entry, BaseException]], outcomes: list[Outcome]
    ) -> None:
        """Tell the middleware what became of a batch cut short by the stop: the entries
        settled before it, and the rest, cancelled."""
        if self._chain is None or self._call is None:
            return
        settled = len(outcomes)
        for (entry, exc), outcome in zip(failed, outcomes, strict=False):
            self._chain.settled(self._call([entry]), outcome, exc)
        rest = [entry for entry, _ in failed[settled:]]
        if rest:
            self._chain.settled(self._call(rest), "cancelled", None)

    async def _work(self) -> None:
        ledger = self._ledger
        queue = ledger.queue
        # Bound once: they run for every entry.
        start, finished = ledger.start, ledger.finished
        invoke = self._invoke
        assert invoke is not None
        max_payload = self._max_payload
        while True:
            if not queue:
                await self._park()
                continue
            entry = start()
            try:
                if max_payload is not None and entry[4] > max_payload:
                    raise TooLarge(entry, max_payload)
                await invoke(entry[0], entry[1], entry[2], entry[3])
            except BaseException as exc:
                if self._ours(exc):
                    self.counts.cancelled += 1
                    ledger.cancelled([entry])
                    raise
                await self._settle([(entry, exc)])
                self._raise_if_stopping()
                continue
            finished(entry)

    async def _work_with_middleware(self) -> None:
        """`_work`, with each call run through the middleware and its outcome reported."""
        ledger = self._ledger
        queue = ledger.queue
        start, finished = ledger.start, ledger.finished
        invoke = self._invoke
        chain = self._chain
        make_call = self._call
        assert invoke is not None
        assert chain is not None
        assert make_call is not None
        max_payload = self._max_payload
        clock = time.perf_counter
        wraps = chain.wraps
        while True:
            if not queue:
                await self._park()
                continue
            entry = start()
            call = make_call((entry,))
            began = clock()
            try:
                if max_payload is not None and entry[4] > max_payload:
                    raise TooLarge(entry, max_payload)
                if wraps:
                    await chain.wrap(call, partial(invoke, entry[0], entry[1], entry[2], entry[3]))
                else:
                    await invoke(entry[0], entry[1], entry[2], entry[3])
            except BaseException as exc:
                call.duration = clock() - began
                await self._failed_one(entry, exc, call)
                continue
            call.duration = clock() - began
            finished(entry)
            chain.settled(call, "acked", None)

    async def _work_recording(self) -> None:
        """`_work_with_middleware` for a chain that only records acked entries (the
        metrics'): no Call is made for an entry that is acked."""
        ledger = self._ledger
        queue = ledger.queue
        start, finished = ledger.start, ledger.finished
        invoke = self._invoke
        make_call = self._call
        record = self._record
        assert invoke is not None
        assert make_call is not None
        assert record is not None
        max_payload = self._max_payload
        clock = time.perf_counter
        while True:
            if not queue:
                await self._park()
                continue
            entry = start()
            began = clock()
            try:
                if max_payload is not None and entry[4] > max_payload:
                    raise TooLarge(entry, max_payload)
                await invoke(entry[0], entry[1], entry[2], entry[3])
            except BaseException as exc:
                call = make_call((entry,))
                call.duration = clock() - began
                await self._failed_one(entry, exc, call)
                continue
            finished(entry)
            record(entry, clock() - began)

    async def _failed_one(self, entry: Entry, exc: BaseException, call: Call) -> None:
        """The call of one entry raised `exc`: the failure policy decides, the middleware
        hears the outcome. The consumer's own cancellation is raised again."""
        chain = self._chain
        assert chain is not None
        if self._discard is not None:  # a middleware raised after the handler returned
            self._discard((entry,))
        if self._ours(exc):
            self.counts.cancelled += 1
            self._ledger.cancelled([entry])
            chain.settled(call, "cancelled", exc)
            raise exc
        (outcome,) = await self._settle([(entry, exc)])
        chain.settled(call, outcome, exc)
        self._raise_if_stopping()

    async def _work_batches(self) -> None:
        """A worker of a batch handler: each call gets what is queued, up to `batch_size`.

        Entries on a retry run one per call: one entry that keeps failing must not take the
        rest of its first batch to the dead-letter stream with it.
        """
        ledger = self._ledger
        queue = ledger.queue
        while True:
            if not queue:
                await self._park()
                continue
            taken = ledger.start_many(self._batch_size)
            first = [entry for entry in taken if entry[3] == 1]
            batches = [[entry] for entry in taken if entry[3] > 1]
            if first:
                batches.insert(0, first)
            for index, batch in enumerate(batches):
                try:
                    await self._run_batch(batch)
                except BaseException:
                    # Cancelled: this batch was cancelled in _run_batch; the later ones
                    # never started.
                    later = [entry for rest in batches[index + 1 :] for entry in rest]
                    ledger.cancelled(later)
                    if later and self._chain is not None and self._call is not None:
                        self._chain.settled(self._call(later), "cancelled", None)
                    raise

    async def _run_batch(self, batch: list[Entry]) -> None:
        """One call of a batch handler. Entries too large or that do not decode are split
        out and go to the dead-letter stream one by one, after the call; the others go to
        the handler together."""
        invoke_batch = self._invoke_batch
        assert invoke_batch is not None
        max_payload = self._max_payload
        unfit: list[tuple[Entry, BaseException]] = []
        if max_payload is not None and any(entry[4] > max_payload for entry in batch):
            unfit = [(e, TooLarge(e, max_payload)) for e in batch if e[4] > max_payload]
            batch = [entry for entry in batch if entry[4] <= max_payload]
        passed, rejected, run = invoke_batch(batch) if batch else (batch, [], None)
        unfit += rejected
        logged = 0
        chain, make_call = self._chain, self._call
        call = make_call(passed) if make_call is not None and run is not None else None
        if run is not None:
            began = time.perf_counter()
            try:
                if chain is not None and call is not None and chain.wraps:
                    try:
                        await chain.wrap(call, lambda: run)
                    finally:
                        _close_unstarted(run)  # a middleware skipped the handler
                else:
                    await run
            except BaseException as exc:
                if self._discard is not None:
                    self._discard(passed)
                if call is not None:
                    call.duration = time.perf_counter() - began
                if self._ours(exc):
                    self.counts.cancelled += len(passed)
                    self._ledger.cancelled([*passed, *(entry for entry, _ in unfit)])
                    if chain is not None and call is not None:
                        chain.settled(call, "cancelled", exc)
                    raise
                self._failures.batch_failed(passed, exc)
                unfit = [*((entry, exc) for entry in passed), *unfit]
                logged = len(passed)
            else:
                self._ledger.finished_many(passed)
                if chain is not None and call is not None:
                    call.duration = time.perf_counter() - began
                    chain.settled(call, "acked", None)
        if unfit:
            outcomes = await self._settle(unfit, logged=logged)
            if chain is not None and make_call is not None:
                self._report_failed(chain, make_call, call, unfit, outcomes, logged)
            self._raise_if_stopping()

    @staticmethod
    def _report_failed(
        chain: Chain,
        make_call: Callable[[Sequence[Entry]], Call],
        call: Call | None,
        unfit: Sequence[tuple[Entry, BaseException]],
        outcomes: list[Outcome],
        ran: int,
    ) -> None:
        """A batch call's failed entries: the first `ran` reached the handler (one report,
        when they ended alike, as entries of the same delivery do), the rest did not (one
        report each)."""
        if ran and call is not None and len(set(outcomes[:ran])) == 1:
            chain.settled(call, outcomes[0], unfit[0][1])
            unfit, outcomes = unfit[ran:], outcomes[ran:]
        for (entry, exc), outcome in zip(unfit, outcomes, strict=True):
            chain.settled(make_call((entry,)), outcome, exc)


def _close_unstarted(awaitable: object) -> None:
    """Close the handler's coroutine if nothing awaited it (no "never awaited" warning)."""
    # A pipeline's call wraps the handler's coroutine (asyncstreams.pipeline.Staging).
    close_unstarted = getattr(awaitable, "close_unstarted", None)
    if close_unstarted is not None:
        close_unstarted()
        return
    if inspect.iscoroutine(awaitable) and inspect.getcoroutinestate(awaitable) == "CORO_CREATED":
        awaitable.close()
