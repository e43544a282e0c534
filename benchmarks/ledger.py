"""What a consumer process writes down about the entries it handled.

A `Tally` ticks off sequence numbers in a bytearray (one byte per entry of the data set, so a
million entries cost a megabyte and no per-entry objects): it counts duplicates and numbers
outside the data set. A `Sink` is what the handlers call: it tallies and, for the latency
scenario, keeps publish-to-handler delays.
"""

from __future__ import annotations

import base64
import resource
import time
import zlib
from array import array
from collections.abc import Callable, Iterable

# The latency scenario's clock: `created_at` is time.time() in the producer process.
clock = time.time


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Tally:
    __slots__ = (
        "_on_complete",
        "count",
        "duplicates",
        "entries",
        "first_at",
        "first_cpu",
        "seen",
        "unexpected",
    )

    def __init__(self, entries: int, on_complete: Callable[[], None] | None = None) -> None:
        self.entries = entries
        self.seen = bytearray(entries)
        self.count = 0
        self.duplicates = 0
        self.unexpected = 0
        self.first_at = 0.0  # time.perf_counter() when the first entry was handled
        self.first_cpu = 0.0  # cpu_seconds() then
        self._on_complete = on_complete

    def mark(self, seq: int) -> None:
        self.count += 1
        if self.count == 1:
            self.first_at = time.perf_counter()
            self.first_cpu = cpu_seconds()
        if 0 <= seq < self.entries:
            if self.seen[seq]:
                self.duplicates += 1
            else:
                self.seen[seq] = 1
        else:
            self.unexpected += 1
        if self.count == self.entries and self._on_complete is not None:
            self._on_complete()

    @property
    def distinct(self) -> int:
        return self.count - self.duplicates - self.unexpected

    def encode(self) -> str:
        """The bitmap, compressed, as text (for a JSON reply)."""
        return base64.b64encode(zlib.compress(bytes(self.seen), 1)).decode()


def decode_bitmap(text: str) -> bytes:
    return zlib.decompress(base64.b64decode(text))


def merge_bitmaps(entries: int, bitmaps: Iterable[bytes]) -> tuple[int, int]:
    """(missing, handled more than once) over the bitmaps of several processes."""
    totals = array("H", bytes(2 * entries))
    for bitmap in bitmaps:
        for seq, hit in enumerate(bitmap[:entries]):
            if hit:
                totals[seq] += 1
    missing = sum(1 for total in totals if total == 0)
    repeated = sum(1 for total in totals if total > 1)
    return missing, repeated


class Sink:
    """The handlers' side of the ledger: `record(task_id, created_at)` once per entry."""

    __slots__ = ("delay", "failure", "latencies", "tally")

    def __init__(
        self,
        entries: int,
        *,
        latency: bool = False,
        delay: float = 0.0,
        on_complete: Callable[[], None] | None = None,
    ) -> None:
        self.tally = Tally(entries, on_complete)
        self.latencies: array[float] | None = array("d") if latency else None
        self.delay = delay  # what a handler awaits after recording (the io scenario)
        self.failure: BaseException | None = None

    def record(self, seq: str | bytes | int, created_at: str | bytes | float) -> None:
        if self.latencies is not None:
            self.latencies.append(clock() - float(created_at))
        self.tally.mark(int(seq))
