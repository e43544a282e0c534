"""The entries every scenario uses: the seed's task shape (task_id, data, created_at).

`task_id` is the entry's sequence number in its data set, so a consumer can tick it off in a
ledger. `data` starts with the same number, zero-padded, then filler up to the entry size:
FastStream hands a per-message handler only the `data` field of an entry that has one (it
reads such an entry as its own legacy JSON envelope), so that is where it finds the number.
`created_at` is `time.time()` when the entry was written (the latency scenario's clock).
"""

from __future__ import annotations

import msgspec

SEQ_DIGITS = 10
_NAMES_SIZE = len("task_id") + len("data") + len("created_at")


class Task(msgspec.Struct):
    task_id: str
    data: str
    created_at: float


def task_fields(seq: int, size: int, created_at: float) -> dict[str, str]:
    """The fields of entry `seq`, names plus values adding up to about `size` bytes."""
    task_id = str(seq)
    stamp = repr(created_at)
    filler = max(0, size - _NAMES_SIZE - len(task_id) - len(stamp) - SEQ_DIGITS)
    return {
        "task_id": task_id,
        "data": f"{seq:0{SEQ_DIGITS}d}" + "x" * filler,
        "created_at": stamp,
    }


def task(seq: int, size: int, created_at: float) -> Task:
    fields = task_fields(seq, size, created_at)
    return Task(fields["task_id"], fields["data"], created_at)


def xadd_args(stream: str, seq: int, size: int, created_at: float) -> tuple[str, ...]:
    """XADD of entry `seq`, as arguments for `hiredis.pack_command`."""
    fields = task_fields(seq, size, created_at)
    return ("XADD", stream, "*", *(part for item in fields.items() for part in item))
