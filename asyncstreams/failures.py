"""What becomes of an entry that was not handled: a retry after a backoff, the dead-letter
stream, or, without one, left pending for good ("parked").

An entry whose handler raised runs again after `retry_delay * 2**(deliveries-1)` seconds
(capped at `retry_max_delay`, with jitter), until Redis has delivered it `max_deliveries`
times; then, and at once for an entry that does not decode or is too large, it moves to the
dead-letter stream. The consumer holds its failed entries meanwhile (the recovery renews
them), so that no other consumer claims them early or over and over.
"""

from __future__ import annotations

import asyncio
import logging
import random

from . import _redis
from ._redis import Redis
from .deadletter import Reason, dead_letter
from .errors import DecodeError
from .message import Entry
from .options import ConsumerOptions

log = logging.getLogger("asyncstreams.consumer")


class TooLarge(Exception):
    """An entry larger than max_payload_bytes."""

    def __init__(self, entry: Entry, limit: int) -> None:
        size = sum(map(len, entry[2]))
        super().__init__(f"entry is {size} bytes, more than max_payload_bytes={limit}")


class Failures:
    """The failure policy of one consumer, and the failed entries it holds."""

    def __init__(self, client: Redis, options: ConsumerOptions, consumer: str, where: str) -> None:
        self._client = client
        self._options = options
        self._consumer = consumer
        self._where = where
        # Entries whose handler raised, by id: (when the retry is due, deliveries so far).
        self._retries: dict[str, dict[bytes, tuple[float, int]]] = {
            stream: {} for stream in options.streams
        }
        # Entries out of deliveries, left pending for want of a dead-letter stream.
        self._parked: dict[str, set[bytes]] = {stream: set() for stream in options.streams}
        self.retried = 0
        self.dead_lettered = 0
        self.parked = 0

    def held(self, stream: str) -> set[bytes]:
        """Ids of the failed entries of `stream` held here: waiting for a retry, or parked."""
        return set(self._parked[stream]).union(self._retries[stream])

    def is_parked(self, stream: str, deliveries: int) -> bool:
        """Whether an entry delivered `deliveries` times is one this policy leaves alone."""
        options = self._options
        return (
            options.max_deliveries is not None
            and deliveries >= options.max_deliveries
            and options.dead_letter_stream(stream) is None
        )

    async def failed(self, entry: Entry, exc: Exception, *, logged: bool = False) -> None:
        """The handler raised, or the entry cannot be handled: retry it, or reject it.

        `logged`: the exception was logged already (a batch's), so a retry logs nothing.
        """
        stream, entry_id, _, deliveries = entry
        limit = self._options.max_deliveries
        if isinstance(exc, TooLarge):
            await self.reject(entry, Reason.TOO_LARGE, None, str(exc))
        elif isinstance(exc, DecodeError):
            await self.reject(entry, Reason.UNDECODABLE, exc)
        elif limit is not None and deliveries >= limit:
            log.error(
                "%s: handler failed on entry %s of %s on its last delivery (%d of %d)",
                self._where,
                entry_id.decode(),
                stream,
                deliveries,
                limit,
                exc_info=exc,
            )
            await self.reject(entry, Reason.FAILED, exc)
        else:
            delay = self.retry_later(stream, entry_id, deliveries)
            if logged:
                return
            log.warning(
                "%s: handler failed on entry %s of %s (delivery %d of %s); it stays "
                "pending and runs again in %.2f s: %s: %s",
                self._where,
                entry_id.decode(),
                stream,
                deliveries,
                limit or "unlimited",
                delay,
                type(exc).__name__,
                exc,
                exc_info=exc,
            )

    async def reject(
        self, entry: Entry, reason: str, exc: BaseException | None, message: str = ""
    ) -> None:
        """Move an entry to the dead-letter stream (XADD + XACK in one MULTI).

        Without a dead-letter stream the entry is parked; when the move fails, it is
        held and tried again after a backoff. Either way it stays pending.
        """
        stream, entry_id, flat, deliveries = entry
        options = self._options
        target = options.dead_letter_stream(stream)
        letter = dead_letter(
            stream=stream,
            entry_id=entry_id,
            group=options.group,
            consumer=self._consumer,
            deliveries=deliveries,
            reason=reason,
            error=exc,
            message=message,
        )
        what = f"{letter.reason}: {letter.error + ': ' if letter.error else ''}{letter.message}"
        if target is None:
            if entry_id not in self._parked[stream]:
                self._parked[stream].add(entry_id)
                self.parked += 1
                log.error(
                    "%s: entry %s of %s left pending, not run again (no dead-letter stream); %s",
                    self._where,
                    letter.id,
                    stream,
                    what,
                )
            return
        try:
            await _redis.move(
                self._client,
                stream,
                options.group,
                self._consumer,
                entry_id,
                target,
                letter.fields(flat),
            )
        except Exception as move_failed:
            self.retry_later(stream, entry_id, deliveries)
            log.error(
                "%s: could not move entry %s of %s to %s (%s: %s); it stays pending; %s",
                self._where,
                letter.id,
                stream,
                target,
                type(move_failed).__name__,
                move_failed,
                what,
            )
            return
        self.dead_lettered += 1
        log.error(
            "%s: entry %s of %s moved to dead-letter stream %s (delivery %d); %s",
            self._where,
            letter.id,
            stream,
            target,
            deliveries,
            what,
        )

    def retry_later(self, stream: str, entry_id: bytes, deliveries: int) -> float:
        """Hold a failed entry until its backoff is over; returns the backoff in seconds."""
        options = self._options
        backoff: float = options.retry_delay * 2.0 ** (deliveries - 1)
        delay = min(options.retry_max_delay, backoff) * random.uniform(0.5, 1.0)
        due = asyncio.get_running_loop().time() + delay
        self._retries[stream][entry_id] = (due, deliveries)
        self.retried += 1
        return delay

    def due_retries(self, stream: str, limit: int) -> list[tuple[bytes, int]]:
        """Up to `limit` entries whose backoff is over, as (id, deliveries); no longer held."""
        retries = self._retries[stream]
        now = asyncio.get_running_loop().time()
        due = [(i, count) for i, (at, count) in retries.items() if at <= now][: max(limit, 0)]
        for entry_id, _ in due:
            del retries[entry_id]
        return due

    def unpark(self, stream: str, ids: set[bytes]) -> None:
        """Parked entries no longer pending (acked by hand, say): stop holding them."""
        self._parked[stream] -= ids
