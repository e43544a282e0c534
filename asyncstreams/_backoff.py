"""Capped exponential backoff with jitter, and one log line per outage."""

from __future__ import annotations

import logging
import random
import time


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
    """Logs when Redis stops answering and when it answers again, once each."""

    def __init__(self, logger: logging.Logger, where: str) -> None:
        self._log = logger
        self._where = where
        self._since: float | None = None

    def begin(self, exc: BaseException) -> None:
        if self._since is None:
            self._since = time.monotonic()
            self._log.warning(
                "%s: Redis is unavailable (%s: %s); retrying with backoff",
                self._where,
                type(exc).__name__,
                exc,
            )

    def end(self) -> None:
        if self._since is not None:
            self._log.warning(
                "%s: Redis is available again after %.1f s",
                self._where,
                time.monotonic() - self._since,
            )
            self._since = None
