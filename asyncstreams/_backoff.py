"""Riding out what Redis may get over: capped exponential backoff with jitter, one log line
when an outage starts and one when it ends, and a group recreated when it is deleted."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ._transport import explain, is_group_gone, is_transient

T = TypeVar("T")


class Backoff:
    """Delays of base * 2**n seconds, capped, each drawn from its upper half at random."""

    def __init__(self, base: float = 0.05, cap: float = 5.0) -> None:
        self._base = base
        self._cap = cap
        self._attempt = 0

    def next_delay(self) -> float:
        delay = min(self._cap, self._base * 2**self._attempt)
        self._attempt = min(self._attempt + 1, 30)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self._attempt = 0


class Outage:
    """How one consumer rides out Redis going away; shared by its reader, its ack flusher
    and its recovery, so an outage is logged once whichever of them meets it."""

    def __init__(
        self,
        logger: logging.Logger,
        where: str,
        regroup: Callable[[], Awaitable[int]],
        moved: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._log = logger
        self._where = where
        self._regroup = regroup
        # Returns when a cluster's slot map has changed: the wait ends early, the backoff
        # starts over (the failed-over master's replica has taken over).
        self._moved = moved
        self._since: float | None = None
        # Outages met (`begin`) and got over (`end`) since the start.
        self.begun = 0
        self.ended = 0

    async def ride(self, step: Callable[[], Awaitable[T]]) -> T:
        """Run `step` until it gets through; raise what waiting cannot fix.

        Only a step that met the outage and then got through ends it (a step may not talk to
        Redis at all: its success says nothing).
        """
        backoff: Backoff | None = None
        while True:
            try:
                result = await step()
            except Exception as exc:
                backoff = backoff or Backoff()
                await self.recover(exc, backoff)
                continue
            if backoff is not None:
                self.end()
            return result

    async def recover(self, exc: Exception, backoff: Backoff) -> None:
        """Get over `exc` (recreate the group, or wait a backoff), or raise it."""
        if is_group_gone(exc):
            try:
                created = await self._regroup()
            except Exception as again:
                self._gone(exc)
                exc = again
            else:
                if created:
                    self._gone(exc)
                else:
                    # Nothing was gone: the key moved (a resharding's MIGRATE deletes it on
                    # the old master, which ends the reads blocked on it), or someone else
                    # recreated it first.
                    self._log.info(
                        "%s: a read ended (%s); the stream and group are there", self._where, exc
                    )
                return
        if not is_transient(exc):
            raise exc
        self.begin(exc)
        delay = backoff.next_delay()
        if self._moved is None:
            await asyncio.sleep(delay)
            return
        try:
            async with asyncio.timeout(delay):
                await self._moved()
        except TimeoutError:
            return
        backoff.reset()

    def _gone(self, exc: BaseException) -> None:
        self._log.warning("%s: the stream or group is gone (%s); recreating it", self._where, exc)

    @property
    def ongoing(self) -> bool:
        """Whether Redis is unavailable to this consumer now."""
        return self._since is not None

    def begin(self, exc: BaseException) -> None:
        if self._since is None:
            self._since = time.monotonic()
            self.begun += 1
            self._log.warning(
                "%s: Redis is unavailable (%s); retrying with backoff", self._where, explain(exc)
            )

    def end(self) -> None:
        if self._since is not None:
            self._log.warning(
                "%s: Redis is available again after %.1f s",
                self._where,
                time.monotonic() - self._since,
            )
            self._since = None
            self.ended += 1
