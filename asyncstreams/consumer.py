"""One registered handler at run time: a reader, a pool of handler workers, an ack flusher
and the recovery of pending entries, as the tasks of one task group, around the ledger of
what the consumer holds.

    XREADGROUP / XCLAIM -> ledger: queued -> workers (at most `concurrency` at once) -> acks
                              ^                          | raised / undecodable       |
                              |                          v                            |
                              |        retried, dead-lettered or parked (failures.py) |
                              +------- room freed when the XACK is answered ----------+

The ledger (ledger.py) alone counts what the consumer holds, in every state; the reader and
the recovery ask it for room before they ask Redis for entries, so memory stays flat under
any backlog and any failure. A failure of any of the consumer's tasks cancels the others
and is raised from `run`, after the shutdown steps.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial

import anyio
import anyio.abc

from . import _commands
from ._backoff import Outage
from ._commands import Acker, GroupReader
from ._logsetup import log_context
from ._nodes import Nodes
from ._tasks import first_failure
from ._transport import SOCKET_TIMEOUT, Redis, explain, is_transient, refused, refuses
from .codec import HandlerPlan, Invoke, InvokeBatch
from .failures import Failures
from .lanes import KeyedLedger, guarded, guarded_batch, make_ledger
from .message import Entry
from .middleware import Call, Chain, Middleware
from .options import ConsumerOptions
from .ownership import Ownership
from .pipeline import Pipeline
from .recovery import Recovery
from .workers import Workers

log = logging.getLogger("asyncstreams.consumer")

# How long the final ack flush at shutdown may take before the rest is left pending.
FINAL_FLUSH_TIMEOUT = 5.0
# How long handing entries back to the group at shutdown may take (it is a courtesy: what
# is not given back is claimed after claim_idle_ms).
GIVE_BACK_TIMEOUT = 2.0
# How often a reader that owns no partition (`ordered=True`) looks again, at most.
OWNERSHIP_POLL = 0.5


@dataclass(slots=True)
class Stats:
    acked: int = 0
    never_started: int = 0
    given_back: int = 0


@dataclass(frozen=True, slots=True)
class Figures:
    """What a consumer has done since it started, and what it holds now: read at once, for
    metrics (asyncstreams.prometheus) and health checks. Counts are of entries."""

    received: int  # delivered to it: read, or claimed from other consumers
    acked: int  # acks Redis confirmed (XACK answered)
    retried: int  # handler failures that were retried
    dead_lettered: int  # moved to the dead-letter stream
    parked: int  # left pending for good (no dead-letter stream)
    cancelled: int  # cancelled by the stop while running
    claimed: int  # other consumers' idle entries claimed
    renewed: int  # idle times of held entries reset (leases renewed)
    outages: int  # times Redis became unavailable to it
    reconnects: int  # times it got through again after an outage
    in_outage: bool  # Redis is unavailable to it now
    in_flight: int  # entries held now, in every state (queued, running, acking, ...)
    room: int  # how many more it may hold: `limit - in_flight - room kept for a read`
    limit: int  # the bound on `in_flight`
    keys_held: int = 0  # with `key=`: keys held by an entry queued, running or retrying
    waiting_behind_keys: int = 0  # with `key=`: entries held that wait behind their key
    partitions_owned: int = 0  # with `ordered=True`: partitions whose lease it holds


class Consumer:
    """Runs one handler over its streams as one consumer of its group."""

    def __init__(
        self,
        plan: HandlerPlan,
        options: ConsumerOptions,
        nodes: Nodes,
        name: str,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        self.plan = plan
        self.options = options
        self.name = name
        self.nodes = nodes
        self.stats = Stats()
        self.where = f"{plan.name} [{options.label} group={options.group} consumer={name}]"
        # A handler that raised KeyboardInterrupt or SystemExit: raised once stopped.
        self.exit: BaseException | None = None
        self._stop: anyio.Event | None = None
        self.ledger = make_ledger(plan, options, name)
        self._outage = Outage(
            log, self.where, self.ensure_groups, nodes.map_changed if nodes.cluster else None
        )
        # One reader per set of streams one XREADGROUP may name: all of them on one server,
        # those of each hash slot on a cluster.
        self._readers = [
            GroupReader(nodes, streams, options.group, name, options.block_ms)
            for streams in nodes.slot_groups(options.names)
        ]
        # With `ordered=True`: the partitions a read is in flight for, and a wake-up for
        # readers that own none.
        self._reading_now: set[str] = set()
        self._owned_changed = asyncio.Event()
        self._unblocking: set[asyncio.Task[None]] = set()
        # With outputs to publish, the acks are commits (asyncstreams.pipeline).
        self.pipeline = (
            Pipeline(
                nodes,
                group=options.group,
                consumer=name,
                handler=plan.name,
                output=options.output,
                output_key=options.output_key,
                inputs=options.streams,  # type: ignore[arg-type]  # a tuple since __post_init__
                most=options.limit,
            )
            if options.output is not None or plan.outbox
            else None
        )
        self._acker: Acker | Pipeline = self.pipeline or Acker(nodes, options.names, options.group)
        self.failures = Failures(nodes, options, name, self.where, self.ledger)
        chain = Chain(middleware) if middleware else None

        # A partial, not a closure: one Python frame less per handler call.
        make_call: Callable[[Sequence[Entry]], Call] = partial(Call, plan.name, options.group, name)

        if chain is not None:
            self.failures.unrun = lambda entry, outcome: chain.settled(
                make_call((entry,)), outcome, None
            )
        self.ownership = self._make_ownership(options, name)
        self.workers = Workers(
            self.ledger,
            self.failures,
            concurrency=options.concurrency,
            max_payload_bytes=options.max_payload_bytes,
            batch_size=options.batch_size,
            invoke=None if plan.batch else self._invoke(plan, options, name),
            invoke_batch=self._invoke_batch(plan, options, name) if plan.batch else None,
            exit_requested=self._exit_requested,
            name=self.where,
            chain=chain,
            call=make_call if chain is not None else None,
            record=chain.recorder(plan.name, options.group) if chain is not None else None,
            discard=self.pipeline.discard if self.pipeline is not None else None,
        )
        if isinstance(self.ledger, KeyedLedger):
            self.ledger.ready = self.workers.wake
        self._recovery = Recovery(
            nodes,
            options,
            name,
            self.where,
            ledger=self.ledger,
            failures=self.failures,
            outage=self._outage,
            queued=self.workers.wake,
            ownership=self.ownership,
        )
        self._readers_left = len(self._readers)
        self._reader_done = anyio.Event()
        self._recovery_done = anyio.Event()

    def _invoke(self, plan: HandlerPlan, options: ConsumerOptions, name: str) -> Invoke:
        """The per-entry call of the handler: key lanes' guard, the partition owner's check
        of its lease, and a pipeline's staging."""
        pipeline = self.pipeline
        bound = plan.bind(options.group, name, pipeline.outbox if pipeline else None)
        invoke = guarded(self.ledger, bound, plan)
        if self.ownership is not None:
            invoke = self.ownership.guard(invoke)
        return pipeline.staged(invoke) if pipeline else invoke

    def _invoke_batch(self, plan: HandlerPlan, options: ConsumerOptions, name: str) -> InvokeBatch:
        """`_invoke` for a batch handler."""
        pipeline = self.pipeline
        bound = plan.bind_batch(options.group, name, pipeline.outbox if pipeline else None)
        invoke = guarded_batch(self.ledger, bound)
        if self.ownership is not None:
            invoke = self.ownership.guard_batch(invoke)
        return pipeline.staged_batch(invoke) if pipeline else invoke

    def _make_ownership(self, options: ConsumerOptions, name: str) -> Ownership | None:
        """With `ordered=True`: the partitions this consumer owns (asyncstreams.ownership)."""
        partitioned = options.partitioned
        if partitioned is None:
            return None
        return Ownership(
            self.nodes,
            options,
            partitioned,
            name,
            self.where,
            ledger=self.ledger,
            take_on=lambda claimed: self._recovery.take_on(claimed),
            changed=self._ownership_changed,
            busy=lambda stream: stream in self._reading_now or stream in self._recovery.claiming,
        )

    def _ownership_changed(self) -> None:
        """Partitions were taken, lost or are being handed over: the readers read again
        (a blocked read is woken, without losing its reply)."""
        self._owned_changed.set()
        for reader in self._readers:
            if reader.blocked:
                task = asyncio.get_running_loop().create_task(reader.unblock())
                self._unblocking.add(task)
                task.add_done_callback(self._unblocking.discard)

    async def run(
        self,
        stop: anyio.Event,
        grace_period: float,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Consume until `stop` is set, then shut down in order:

        1. stop reading and claiming (a blocked XREADGROUP is woken with CLIENT UNBLOCK, so
           no reply is lost; the recovery finishes the step it is in),
        2. let the handlers finish what was delivered, for up to `grace_period` seconds,
        3. cancel the handlers still running: their entries stay pending, not acked, not lost,
        4. flush the acks of everything that finished, within FINAL_FLUSH_TIMEOUT,
        5. give back to the group what was not run to the end (see `_give_back`),
        6. log one summary line.

        Steps 4 to 6 also run when one of the consumer's tasks fails or `run` is cancelled;
        the failure is raised afterwards.

        Every line it logs, in every task of it, carries its group and consumer (and its
        stream, when it reads one) for `--log-format json`.
        """
        with self._log_context():
            await self._consume(stop, grace_period, task_status)

    def _log_context(self) -> AbstractContextManager[None]:
        names = self.options.names
        return log_context(
            group=self.options.group,
            consumer=self.name,
            stream=names[0] if len(names) == 1 else None,
        )

    async def _consume(
        self, stop: anyio.Event, grace_period: float, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        self._stop = stop
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._flush_loop, name=f"asyncstreams acks {self.plan.name}")
                if self.ownership is not None:
                    tasks.start_soon(
                        self.ownership.run, name=f"asyncstreams ownership {self.plan.name}"
                    )
                await tasks.start(self.workers.run, name=f"asyncstreams workers {self.plan.name}")
                async with anyio.create_task_group() as intake:
                    intake.start_soon(self._recover, name=f"asyncstreams recovery {self.plan.name}")
                    for reader in self._readers:
                        intake.start_soon(
                            self._read_loop, reader, name=f"asyncstreams reader {self.plan.name}"
                        )
                    self._log_start()
                    task_status.started()
                    await stop.wait()
                    await self._stop_reading()
                    intake.cancel_scope.cancel()
                await self.workers.drain(grace_period)
                tasks.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise first_failure(group) from None
        finally:
            with anyio.CancelScope(shield=True):
                await self._shutdown()
        if self.exit is not None:
            raise self.exit

    def figures(self) -> Figures:
        """What this consumer has done and holds, now."""
        ledger, failures, outage = self.ledger, self.failures, self._outage
        return Figures(
            received=ledger.received,
            acked=self.stats.acked,
            retried=failures.retried,
            dead_lettered=failures.dead_lettered,
            parked=failures.parked,
            cancelled=self.workers.counts.cancelled,
            claimed=self._recovery.claimed,
            renewed=self._recovery.renewed,
            outages=outage.begun,
            reconnects=outage.ended,
            in_outage=outage.ongoing,
            in_flight=ledger.held,
            room=ledger.room(),
            limit=ledger.limit,
            keys_held=ledger.keys_held if isinstance(ledger, KeyedLedger) else 0,
            waiting_behind_keys=ledger.waiting if isinstance(ledger, KeyedLedger) else 0,
            partitions_owned=len(self.ownership.until) if self.ownership is not None else 0,
        )

    @property
    def own_connections(self) -> int:
        """Connections the consumer keeps to itself: one per reader, one for its acks."""
        return len(self._readers) + 1

    def _log_start(self) -> None:
        options = self.options
        log.info(
            "consuming streams=%s group=%s consumer=%s concurrency=%d batch_size=%d handler=%s",
            options.label,
            options.group,
            self.name,
            options.concurrency,
            options.batch_size,
            self.plan.name,
        )

    def _exit_requested(self, exc: BaseException) -> None:
        if self.exit is None:
            self.exit = exc
            log.error("%s: the handler raised %s; stopping the app", self.where, type(exc).__name__)
        if self._stop is not None:
            self._stop.set()

    async def prepare(self) -> None:
        """Create the groups at start. A read-only replica or a refusal (ACL, login) is a
        RedisRefusedError; an outage, or a full Redis that cannot create a missing group, is
        ridden out."""
        with self._log_context():
            try:
                await self.ensure_groups()
            except Exception as exc:
                if refuses(exc):
                    raise refused(self.nodes.seed, exc) from None
                if not is_transient(exc):
                    raise
                await self._outage.ride(self.ensure_groups)
            if self.ownership is not None:
                await self.ownership.prepare()

    async def ensure_groups(self) -> int:
        """Create the group on each stream where it is missing (MKSTREAM; BUSYGROUP is fine);
        returns how many were created.

        A group recreated after it was deleted starts after the last entry this consumer
        read, not at `start_id`: what was handled is not delivered again.
        """
        options = self.options
        last_ids = {k: v for reader in self._readers for k, v in reader.last_ids.items()}
        created = 0
        for stream in options.names:
            last = last_ids.get(stream)
            start_id = last.decode() if last is not None else options.start_id
            if await _commands.ensure_group(self.nodes, stream, options.group, start_id):
                log.info("created group %s on stream %s at %s", options.group, stream, start_id)
                created += 1
        return created

    # -- reading -----------------------------------------------------------------------

    async def _read_loop(self, reader: GroupReader) -> None:
        """Read into the ledger while it has room.

        The only reader (one server) blocks for a full COUNT. One of several (a cluster: one
        per hash slot) must not keep room for a read that waits on an idle stream while the
        others have entries: it reads without BLOCK while entries come, and once its
        streams are empty, blocks with COUNT 1 until one arrives.
        """
        ledger = self.ledger
        streams = len(reader.streams)
        alone = len(self._readers) == 1
        idle = False
        debug = log.isEnabledFor(logging.DEBUG)
        ownership = self.ownership
        only: list[str] | None = None
        try:
            # The consumer's own pending entries come first (a restart under the same name).
            await self._recovery.first_pass_done.wait()
            while not ledger.closed:
                if ownership is not None:
                    # Only the partitions owned, with a lease that counts (checked before
                    # each read).
                    only = ownership.readable_now(reader.streams)
                    if not only:
                        self._owned_changed.clear()
                        with anyio.move_on_after(OWNERSHIP_POLL):
                            await self._owned_changed.wait()
                        continue
                    streams = len(only)
                count = ledger.read_count(streams)
                if not count:
                    await ledger.wait_for_room(streams)
                    continue
                block = alone or idle
                if idle:
                    count = 1
                kept = ledger.read_started(count, streams)
                if only is not None:
                    self._reading_now.update(only)
                try:
                    entries = await self._outage.ride(
                        (lambda: reader.read(count, block=block))  # noqa: B023
                        if only is None
                        else (lambda: self._read(reader, count, block, only))  # noqa: B023
                    )
                finally:
                    ledger.read_ended(kept)
                    if only is not None:
                        self._reading_now.difference_update(only)
                idle = not entries
                if entries:
                    ledger.delivered(entries)
                    self.workers.wake(len(entries))
                if debug:
                    log.debug(
                        "%s: read %d entries (COUNT %d); holding %d, %d bytes in memory",
                        self.where,
                        len(entries),
                        count,
                        ledger.held,
                        ledger.memory,
                    )
        finally:
            self._readers_left -= 1
            if not self._readers_left:
                self._reader_done.set()
            with anyio.CancelScope(shield=True):
                await reader.close()

    async def _read(
        self, reader: GroupReader, count: int, block: bool, only: list[str]
    ) -> list[Entry]:
        """One read, with `ordered=True`: of the partitions still owned (a read sent again
        after an outage checks the leases again)."""
        assert self.ownership is not None
        owned = self.ownership.readable_now(only)
        return await reader.read(count, block=block, only=owned) if owned else []

    async def _recover(self) -> None:
        try:
            await self._recovery.run()
        finally:
            self._recovery_done.set()

    # -- acking ------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        due = self.ledger.ack_due
        if not self.nodes.cluster:
            while True:
                await due.wait()
                due.clear()
                await self._flush()
        # On a cluster, each master's acks are flushed on their own: one that does not
        # answer holds up its own entries (until the outage is over), not the others'.
        flushing: set[Redis] = set()
        async with anyio.create_task_group() as tasks:
            while True:
                await due.wait()
                due.clear()
                for client, streams in self._acks_by_master().items():
                    if client not in flushing:
                        flushing.add(client)
                        tasks.start_soon(self._flush_master, client, streams, flushing)

    def _acks_by_master(self) -> dict[Redis, list[str]]:
        by_master: dict[Redis, list[str]] = {}
        for stream, ids in self.ledger.acks.items():
            if ids:
                by_master.setdefault(self.nodes.client(stream), []).append(stream)
        return by_master

    async def _flush_master(self, client: Redis, streams: list[str], flushing: set[Redis]) -> None:
        try:
            await self._flush(streams)
        finally:
            flushing.discard(client)
            self.ledger.ack_due.set()  # what finished meanwhile, for this master or another

    async def _flush(self, streams: list[str] | None = None) -> None:
        """XACK everything finished (of `streams`; all by default), and whatever finishes
        meanwhile; keep it through outages (XACK is idempotent: sending one again is
        safe)."""
        ledger = self.ledger
        while True:
            batch, count = ledger.take_acks(streams)
            if not count:
                return
            try:
                await self._outage.ride(lambda: self._acker.ack(batch))  # noqa: B023
            except BaseException:
                ledger.ack_failed(batch, count)
                raise
            ledger.acked(batch, count)
            self.stats.acked += count
            log.debug("%s: acked %d entries", self.where, count)

    # -- stopping ----------------------------------------------------------------------

    async def _stop_reading(self) -> None:
        """Stop asking for entries without losing a reply that is already on its way."""
        self.ledger.close()
        with anyio.move_on_after(self.options.block_ms / 1000 + 1):
            while not self._reader_done.is_set() and any(r.blocked for r in self._readers):
                # CLIENT UNBLOCK makes XREADGROUP return as if BLOCK ran out: no entry is
                # delivered to a reply we would drop.
                for reader in self._readers:
                    await reader.unblock()
                with anyio.move_on_after(0.05):
                    await self._reader_done.wait()
        # The recovery stops after the step it is in (claimed entries are not left behind).
        if self._recovery.busy:
            with anyio.move_on_after(SOCKET_TIMEOUT):
                await self._recovery_done.wait()

    async def _shutdown(self) -> None:
        """Steps 4 to 6 of `run`, from wherever it was left."""
        self.ledger.close()
        self.stats.never_started = len(self.ledger.queue)
        with anyio.move_on_after(FINAL_FLUSH_TIMEOUT):
            await self._flush()
        if not self.ledger.ack_count:  # else Redis does not answer: no use trying
            with anyio.move_on_after(GIVE_BACK_TIMEOUT):
                await self._give_back()
            if self.ownership is not None:
                with anyio.move_on_after(GIVE_BACK_TIMEOUT):
                    await self.ownership.leave()
        await self._acker.close()
        self.failures.log.flush()
        unacked = self.ledger.ack_count
        extra = [
            f"{self.failures.parked} parked (no dead-letter stream)"
            if self.failures.parked
            else "",
            f"{self.stats.given_back} given back to the group" if self.stats.given_back else "",
            f"{unacked} acks not sent (entries stay pending)" if unacked else "",
        ]
        log.info(
            "%s: stopped; %d acked, %d retried, %d dead-lettered, %d cancelled, %d never started%s",
            self.where,
            self.stats.acked,
            self.failures.retried,
            self.failures.dead_lettered,
            self.workers.counts.cancelled,
            self.stats.never_started,
            "".join(f", {part}" for part in extra if part),
        )

    async def _give_back(self) -> None:
        """Leave to the group, at once, the entries this consumer will not run to the end:
        those never started, with their delivery here taken off the count (it did not run),
        and those cancelled or waiting for a retry, which another consumer may claim as soon
        as their backoff is over. Best effort: what is not given back stays pending on this
        consumer and is claimed after `claim_idle_ms`, as after a crash."""
        claim_idle_ms = self.options.claim_idle_ms
        now = asyncio.get_running_loop().time()
        for stream, left in self.ledger.leave().items():
            if not left:
                continue
            entries = [
                (entry_id, max(0, claim_idle_ms - _ms_until(due, now)), deliveries)
                for entry_id, due, deliveries in left
            ]
            try:
                given = await _commands.give_back(
                    self.nodes, stream, self.options.group, self.name, entries
                )
            except Exception as exc:
                log.warning(
                    "%s: could not give back %d entries of %s (%s); they stay pending on this "
                    "consumer until claimed",
                    self.where,
                    len(entries),
                    stream,
                    explain(exc),
                )
                continue
            self.ledger.given_back(stream, [entry_id for entry_id, _, _ in left])
            self.stats.given_back += given


def _ms_until(due: float | None, now: float) -> int:
    return 0 if due is None else max(0, int((due - now) * 1000))
