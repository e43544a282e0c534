"""What becomes of an entry that was not handled: a retry after a backoff, the dead-letter
stream, or, without one, left pending for good ("parked"); and when handlers keep failing,
a pause.

An entry whose handler raised runs again after `retry_delay * 2**(deliveries-1)` seconds
(capped at `retry_max_delay`, with jitter), until Redis has delivered it `max_deliveries`
times; then, and at once for an entry that does not decode or is too large, it moves to the
dead-letter stream. The consumer holds its failed entries meanwhile (the ledger counts them
against the bound, the recovery renews them), so no other consumer claims them early.

When `pause_after_failures` handler runs in a row fail (a database is down, say), the
consumer pauses: it reads nothing new and, instead of every held entry spending its
deliveries on schedule, retries one entry at a time (a probe, the one with the fewest
deliveries), the probes spaced by the retry backoff. The first run that succeeds resumes
everything. An outage so costs deliveries at the pace of the probes, not of the backlog.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from . import _commands
from ._backoff import Backoff
from ._logs import FailureLog
from ._logsetup import ENTRY
from ._moves import Moved, move
from ._nodes import Nodes
from ._transport import explain
from .deadletter import DeadLetter, Reason, dead_letter
from .errors import DecodeError
from .ledger import Ledger
from .message import Entry
from .middleware import Outcome
from .options import ConsumerOptions

log = logging.getLogger("asyncstreams.consumer")

# Retries to claim back now, by stream: (id, deliveries so far).
Due = dict[str, list[tuple[bytes, int]]]


class TooLarge(Exception):
    """An entry larger than max_payload_bytes."""

    def __init__(self, entry: Entry, limit: int) -> None:
        super().__init__(f"entry is {entry[4]} bytes, more than max_payload_bytes={limit}")


class LeaseLost(Exception):
    """Raised in place of a handler's call whose partition this consumer no longer owns
    (`ordered=True`, asyncstreams.ownership): its entry is left to the new owner, neither
    run nor retried here."""

    def __init__(self, stream: str) -> None:
        super().__init__(f"this consumer no longer owns partition {stream}")


class Failures:
    """The failure policy of one consumer."""

    def __init__(
        self, nodes: Nodes, options: ConsumerOptions, consumer: str, where: str, ledger: Ledger
    ) -> None:
        self._nodes = nodes
        self._options = options
        self._consumer = consumer
        self._where = where
        self._ledger = ledger
        self.log = FailureLog(log, where)
        # Moves to the dead-letter stream that failed are tried again together, after a
        # backoff that grows with each round that fails (Redis is full, say).
        self._move_backoff = Backoff(base=0.5, cap=30.0)
        self._moves_due = 0.0
        self.retried = 0
        self.dead_lettered = 0
        self.parked = 0
        # The pause: failed runs in a row (since `ledger.successes` was last seen to move),
        # when it began, the entry being tried and when the next may go.
        self._streak = 0
        self._successes = 0
        self._paused_at: float | None = None
        self._probe: tuple[str, bytes] | None = None
        self._probes = 0
        self._next_probe = 0.0
        # Tells the middleware, if any, what became of an entry no handler call ran (one
        # claimed after its last delivery); set by the consumer.
        self.unrun: Callable[[Entry, Outcome], None] | None = None

    # -- an entry failed -----------------------------------------------------------------

    async def failed(self, entry: Entry, exc: BaseException, *, logged: bool = False) -> Outcome:
        """A running entry was not handled: the handler raised, or it cannot be handled.
        Returns what became of it.

        `logged`: the exception was logged already (a batch's), so a retry logs nothing.
        """
        stream, entry_id, _, deliveries, _ = entry
        if isinstance(exc, LeaseLost):
            # Held as cancelled, until the ownership drops it (or, renewed after all,
            # claims it back as a retry due now).
            self._ledger.cancelled([entry])
            return "cancelled"
        if isinstance(exc, TooLarge):
            return await self.reject(entry, Reason.TOO_LARGE, None, str(exc))
        if isinstance(exc, DecodeError):
            return await self.reject(entry, Reason.UNDECODABLE, exc)
        self._probe_ended(stream, entry_id)
        if not logged:
            self.handler_failed()
        limit = self._options.max_deliveries
        if limit is not None and deliveries >= limit:
            self.log.log(
                logging.ERROR,
                "failed",
                type(exc).__name__,
                "%s: handler failed on entry %s of %s on its last delivery (%d of %d): %s",
                self._where,
                entry_id.decode(),
                stream,
                deliveries,
                limit,
                explain(exc),
                exc_info=exc,
            )
            return await self.reject(entry, Reason.FAILED, exc)
        delay = self._retry_later(entry)
        if logged:
            return "retried"
        self.log.log(
            logging.WARNING,
            "retried",
            type(exc).__name__,
            "%s: handler failed on entry %s of %s (delivery %d of %s); it stays pending and "
            "runs again in %.2f s: %s",
            self._where,
            entry_id.decode(),
            stream,
            deliveries,
            limit or "unlimited",
            delay,
            explain(exc),
            # The first failure of an entry shows where it happened; later ones, one line.
            exc_info=exc if deliveries == 1 else None,
        )
        return "retried"

    def batch_failed(self, entries: list[Entry], exc: BaseException) -> None:
        """A batch handler call raised: one line for the batch (each entry then retries on
        its own, logging nothing more, see `failed`)."""
        self.handler_failed()
        self.log.log(
            logging.WARNING,
            "batch retried",
            type(exc).__name__,
            "%s: handler failed on a batch of %d entries (%s to %s of %s); each stays pending "
            "and runs again on its own: %s",
            self._where,
            len(entries),
            entries[0][1].decode(),
            entries[-1][1].decode(),
            ",".join(sorted({entry[0] for entry in entries})),
            explain(exc),
            exc_info=exc,
        )

    def handler_failed(self) -> None:
        """One handler run (one call of a batch handler) failed: pause after too many."""
        threshold = self._options.pause_after_failures
        ledger = self._ledger
        if threshold is None:
            return
        if ledger.successes != self._successes:
            self._successes = ledger.successes
            self._streak = 0
        self._streak += 1
        if self._streak < threshold or ledger.reads_paused:
            return
        loop = asyncio.get_running_loop()
        ledger.pause_reads()
        self._paused_at = loop.time()
        self._probes = 0
        self._next_probe = loop.time() + self._probe_delay()
        log.warning(
            "%s: %d handler runs in a row failed; pausing: no new entries are read, and the "
            "entries held run again one at a time until one succeeds",
            self._where,
            self._streak,
        )

    def _retry_later(self, entry: Entry) -> float:
        """Hold a failed entry until its backoff is over; returns the backoff in seconds."""
        delay = self._backoff(entry[3])
        self._ledger.retry_at(entry, asyncio.get_running_loop().time() + delay)
        self.retried += 1
        return delay

    def _backoff(self, attempt: int) -> float:
        options = self._options
        backoff: float = options.retry_delay * 2.0 ** (attempt - 1)
        return min(options.retry_max_delay, backoff) * random.uniform(0.5, 1.0)

    def _probe_delay(self) -> float:
        self._probes += 1
        return self._backoff(self._probes)

    def _probe_ended(self, stream: str, entry_id: bytes) -> None:
        if self._probe == (stream, entry_id):
            self._probe = None
            self._next_probe = asyncio.get_running_loop().time() + self._probe_delay()

    # -- dead letters --------------------------------------------------------------------

    async def reject(
        self, entry: Entry, reason: str, exc: BaseException | None, message: str = ""
    ) -> Outcome:
        """Move a running entry to the dead-letter stream (XADD + XACK in one MULTI).

        Without a dead-letter stream the entry is parked; when the move fails, it is
        held and tried again after a backoff (still "dead_lettered": the move is decided).
        """
        stream, entry_id, flat, deliveries, _ = entry
        self._probe_ended(stream, entry_id)
        letter = dead_letter(
            stream=stream,
            entry_id=entry_id,
            group=self._options.group,
            consumer=self._consumer,
            deliveries=deliveries,
            reason=reason,
            error=exc,
            message=message,
        )
        if self._options.dead_letter_stream(stream, cluster=self._nodes.cluster) is None:
            self._ledger.park(entry)
            self.parked += 1
            self.log.log(
                logging.ERROR,
                "parked",
                letter.error,
                "%s: entry %s of %s left pending, not run again (no dead-letter stream); %s",
                self._where,
                letter.id,
                stream,
                _what(letter),
            )
            if self._ledger.states()["parked"] >= self._ledger.limit:
                log.error(
                    "%s: %d entries are parked, all this consumer may hold: it reads no more "
                    "until they are acked or deleted (or give it a dead-letter stream)",
                    self._where,
                    self._ledger.limit,
                )
            return "parked"
        try:
            await self._move(letter, flat)
        except Exception as failure:
            self._ledger.move_later(entry, letter)
            self._move_failed(letter, failure)
            return "dead_lettered"
        self._ledger.dead_lettered(entry)
        return "dead_lettered"

    async def _move(self, letter: DeadLetter, flat: list[bytes]) -> bool:
        """Move the entry to the dead-letter stream; False if it was not this consumer's to
        move any more (acked, claimed by another, or deleted from the stream)."""
        target = self._options.dead_letter_stream(letter.stream, cluster=self._nodes.cluster)
        assert target is not None
        moved = await move(self._nodes, letter, target, self._consumer, flat)
        self._move_backoff.reset()
        if moved is not Moved.MOVED:
            log.warning(
                "%s: entry %s of %s was not moved to %s: %s",
                self._where,
                letter.id,
                letter.stream,
                target,
                "it was deleted from the stream meanwhile"
                if moved is Moved.DELETED
                else "it is no longer pending on this consumer (acked, or claimed by another)",
            )
            return False
        self.dead_lettered += 1
        self.log.log(
            logging.ERROR,
            "dead-lettered",
            letter.error,
            "%s: entry %s of %s moved to dead-letter stream %s (delivery %d); %s",
            self._where,
            letter.id,
            letter.stream,
            target,
            letter.deliveries,
            _what(letter),
        )
        return True

    def _move_failed(self, letter: DeadLetter, failure: Exception) -> None:
        now = asyncio.get_running_loop().time()
        if self._moves_due <= now:
            self._moves_due = now + self._move_backoff.next_delay()
        self.log.log(
            logging.ERROR,
            "not moved",
            type(failure).__name__,
            "%s: could not move entry %s of %s to %s (%s); it stays pending and the move is "
            "tried again; %s",
            self._where,
            letter.id,
            letter.stream,
            self._options.dead_letter_stream(letter.stream, cluster=self._nodes.cluster),
            explain(failure),
            _what(letter),
        )

    async def move_held(self) -> None:
        """Try again the moves that failed, once their backoff is over (the entries' fields
        are read again with XRANGE, which is not a delivery: the delivery count stays true).
        The first that fails again puts the round off."""
        ledger = self._ledger
        if asyncio.get_running_loop().time() < self._moves_due:
            return
        for stream, entry_id, letter in list(ledger.moves()):
            flat = await _commands.fields_of(self._nodes, stream, entry_id)
            if flat is None:  # deleted meanwhile; Redis 6.2 still has it pending
                await _commands.ack(self._nodes, stream, self._options.group, [entry_id])
                ledger.moved(stream, entry_id)
                continue
            token = ENTRY.set((stream, entry_id.decode()))
            try:
                await self._move(letter, flat)
            except Exception as failure:
                self._move_failed(letter, failure)
                return
            finally:
                ENTRY.reset(token)
            ledger.moved(stream, entry_id)

    # -- which retries run now ---------------------------------------------------------

    def due(self) -> Due:
        """The held retries to claim back and run now: every one whose backoff is over, or,
        while paused, one probe when its time comes."""
        ledger = self._ledger
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._paused_at is not None and not ledger.reads_paused:
            log.warning(
                "%s: a handler run succeeded; resuming after a pause of %.1f s",
                self._where,
                now - self._paused_at,
            )
            self._paused_at = None
            self._probe = None
        due: Due = {}
        if not ledger.reads_paused:
            for stream, entry_id, retry in ledger.retries():
                if retry.due <= now:
                    due.setdefault(stream, []).append((entry_id, retry.deliveries))
            return due
        if self._probe is not None and (
            not ledger.holds(*self._probe) or ledger.waits_for_retry(*self._probe)
        ):
            # Deleted meanwhile, or never claimed back (the claim failed): not on its way.
            self._probe = None
        if self._probe is not None or now < self._next_probe:
            return due
        # The next probe: the entry with the fewest deliveries, the earliest due first.
        candidates = sorted(ledger.retries(), key=lambda r: (r[2].deliveries, r[2].due))
        if not candidates:  # read again (and pause again, if need be)
            log.warning(
                "%s: no entry held is left to retry (all dead-lettered, parked or gone); "
                "reading again after a pause of %.1f s",
                self._where,
                now - (self._paused_at or now),
            )
            self._paused_at = None
            ledger.resume_reads()
            return due
        stream, entry_id, retry = candidates[0]
        self._probe = (stream, entry_id)
        due[stream] = [(entry_id, retry.deliveries)]
        return due


def _what(letter: DeadLetter) -> str:
    return f"{letter.reason}: {letter.error + ': ' if letter.error else ''}{letter.message}"
