"""The entries every scenario uses: the seed's task shape (task_id, data, created_at).

`task_id` is the entry's sequence number in its data set, so a consumer can tick it off in a
ledger. `data` starts with the same number, zero-padded, then filler up to the entry size:
FastStream hands a per-message handler only the `data` field of an entry that has one (it
reads such an entry as its own legacy JSON envelope), so that is where it finds the number.
`created_at` is `time.time()` when the entry was written (the latency scenario's clock).

The keyed scenario's data sets have a fourth field, `key` (`k` and `seq % keys`, zero-padded
to KEY_DIGITS), its bytes taken from the filler: the same size, and the other scenarios'
entries are left as they are (`keys=0`, the default, writes no `key`).
"""

from __future__ import annotations

import msgspec

SEQ_DIGITS = 10
KEY_FIELD = "key"  # the keyed scenario's key field (`key=KEY_FIELD`)
KEY_DIGITS = 5  # its values, zero-padded: every keyed data set's entries are alike in size
_NAMES_SIZE = len("task_id") + len("data") + len("created_at")


class Task(msgspec.Struct):
    task_id: str
    data: str
    created_at: float


class KeyedTask(Task):
    """A task of the keyed scenario's data sets: the Task with its key field."""

    key: str


def key_value(seq: int, keys: int) -> str:
    """The key of entry `seq` in a data set of `keys` distinct keys (spread round robin)."""
    return f"k{seq % keys:0{KEY_DIGITS}d}"


def task_fields(seq: int, size: int, created_at: float, keys: int = 0) -> dict[str, str]:
    """The fields of entry `seq`, names plus values adding up to about `size` bytes; with
    `keys`, a `key` field too (one of `keys` distinct values), in place of filler."""
    task_id = str(seq)
    stamp = repr(created_at)
    key = key_value(seq, keys) if keys else ""
    used = _NAMES_SIZE + len(task_id) + len(stamp) + SEQ_DIGITS
    if keys:
        used += len(KEY_FIELD) + len(key)
    filler = max(0, size - used)
    fields = {
        "task_id": task_id,
        "data": f"{seq:0{SEQ_DIGITS}d}" + "x" * filler,
        "created_at": stamp,
    }
    if keys:
        fields[KEY_FIELD] = key
    return fields


def task(seq: int, size: int, created_at: float) -> Task:
    fields = task_fields(seq, size, created_at)
    return Task(fields["task_id"], fields["data"], created_at)


def xadd_args(
    stream: str, seq: int, size: int, created_at: float, keys: int = 0
) -> tuple[str, ...]:
    """XADD of entry `seq`, as arguments for `hiredis.pack_command` (`keys`: see
    `task_fields`)."""
    fields = task_fields(seq, size, created_at, keys)
    return ("XADD", stream, "*", *(part for item in fields.items() for part in item))
