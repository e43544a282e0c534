"""Log lines about failing entries, bounded: an outage must not fill a disk.

Up to BURST lines per INTERVAL seconds go out one by one; beyond that, each is counted, and
when the interval is over one line sums them up (how many, what became of them, the
exception types), so a consumer whose every entry fails writes about one line a second.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

BURST = 10
INTERVAL = 10.0


class FailureLog:
    """The failure lines of one consumer, rate-limited."""

    def __init__(self, logger: logging.Logger, where: str) -> None:
        self._log = logger
        self._where = where
        self._window_end = 0.0
        self._lines = 0
        self._held_back: Counter[tuple[str, str]] = Counter()
        self._worst = logging.WARNING
        self._timer: asyncio.TimerHandle | None = None

    def log(
        self,
        level: int,
        outcome: str,
        error: str,
        message: str,
        *args: Any,
        exc_info: BaseException | None = None,
    ) -> None:
        """Log one line about an entry that failed; `outcome` (retried, dead-lettered, ...)
        and `error` (the exception type) are what the summary counts it by."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= self._window_end:
            self.flush()
            self._window_end = now + INTERVAL
            self._lines = 0
        if self._lines < BURST:
            self._lines += 1
            self._log.log(level, message, *args, exc_info=exc_info)
            return
        self._held_back[outcome, error] += 1
        self._worst = max(self._worst, level)
        if self._timer is None:
            self._timer = loop.call_at(self._window_end, self.flush)

    def flush(self) -> None:
        """Sum up the lines held back so far in one line (at stop, and as intervals end)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._held_back:
            return
        held_back, self._held_back = self._held_back, Counter()
        worst, self._worst = self._worst, logging.WARNING
        parts = [
            f"{outcome} {count:,} ({error})" if error else f"{outcome} {count:,}"
            for (outcome, error), count in held_back.most_common()
        ]
        self._log.log(
            worst,
            "%s: %s more failed entries in the last %.0f s, not logged one by one: %s",
            self._where,
            f"{sum(held_back.values()):,}",
            INTERVAL,
            "; ".join(parts),
        )
