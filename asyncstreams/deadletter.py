"""The dead-letter stream's entry format: the original fields, and metadata beside them.

A dead-letter entry keeps every field of the original entry and adds metadata fields whose
names start with `!dlq:` (stream, id, group, consumer, deliveries, reason, error, message,
time). So that no original field can collide with those names, an original field name that
starts with `!` gets one more `!` in front; `original_fields` undoes it. The mapping is
one-to-one: metadata names start with one `!`, escaped originals with two.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .errors import ConfigurationError

PREFIX = b"!dlq:"
_ESCAPE = b"!"


class Reason:
    """Why an entry was dead-lettered (the `!dlq:reason` field)."""

    FAILED = "failed"  # the handler raised on its last allowed delivery
    UNDECODABLE = "undecodable"  # the fields do not decode into what the handler takes
    TOO_LARGE = "too-large"  # the entry is larger than max_payload_bytes


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Why and where from: the metadata of one dead-letter entry."""

    stream: str
    id: str
    group: str
    consumer: str
    deliveries: int
    reason: str
    error: str
    message: str
    time_ms: int

    def metadata(self) -> list[bytes | str]:
        """The metadata fields, flat: `!dlq:stream`, its value, and so on."""
        meta: dict[bytes, str | int] = {
            b"stream": self.stream,
            b"id": self.id,
            b"group": self.group,
            b"consumer": self.consumer,
            b"deliveries": self.deliveries,
            b"reason": self.reason,
            b"error": self.error,
            b"message": self.message,
            b"time": self.time_ms,
        }
        flat: list[bytes | str] = []
        for name, value in meta.items():
            flat += [PREFIX + name, str(value)]
        return flat

    def fields(self, original: list[bytes]) -> list[bytes | str]:
        """The dead-letter entry's flat field list: metadata first, then the original (as
        the move to the dead-letter stream writes it, in _moves.py)."""
        flat = self.metadata()
        for index in range(0, len(original), 2):
            name = original[index]
            flat += [_ESCAPE + name if name.startswith(_ESCAPE) else name, original[index + 1]]
        return flat


def dead_letter(
    *,
    stream: str,
    entry_id: bytes,
    group: str,
    consumer: str,
    deliveries: int,
    reason: str,
    error: BaseException | str | None,
    message: str = "",
) -> DeadLetter:
    """The metadata of an entry dead-lettered now; `error` is the exception, or its type's
    name, and `message` defaults to the exception's text."""
    if isinstance(error, BaseException):
        message = message or str(error)
        error = type(error).__name__
    return DeadLetter(
        stream=stream,
        id=entry_id.decode(),
        group=group,
        consumer=consumer,
        deliveries=deliveries,
        reason=reason,
        error=error or "",
        message=message,
        time_ms=int(time.time() * 1000),
    )


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    """An entry of a dead-letter stream, read back: why it is there, and what it was."""

    id: str  # its id in the dead-letter stream
    letter: DeadLetter
    fields: dict[bytes, bytes]  # the original entry's fields, as they were


def split(flat: list[bytes]) -> tuple[dict[str, str], list[bytes]]:
    """A dead-letter entry's (metadata, original flat fields)."""
    meta: dict[str, str] = {}
    original: list[bytes] = []
    for index in range(0, len(flat), 2):
        name, value = flat[index], flat[index + 1]
        if name.startswith(PREFIX):
            meta[name[len(PREFIX) :].decode()] = value.decode(errors="replace")
        elif name.startswith(_ESCAPE):
            original += [name[1:], value]
        else:
            original += [name, value]
    return meta, original


def parse(entry_id: bytes, flat: list[bytes], source: str) -> DeadLetterEntry:
    """Read a dead-letter entry back; ConfigurationError if it is not one."""
    meta, original = split(flat)
    if "stream" not in meta or "id" not in meta:
        raise ConfigurationError(
            f"entry {entry_id.decode()} of {source!r}: expected a dead-letter entry (with "
            f"{PREFIX.decode()}stream and {PREFIX.decode()}id fields), found fields "
            f"{sorted(name.decode(errors='replace') for name in flat[::2])}"
        )
    letter = DeadLetter(
        stream=meta["stream"],
        id=meta["id"],
        group=meta.get("group", ""),
        consumer=meta.get("consumer", ""),
        deliveries=int(meta.get("deliveries", "0") or 0),
        reason=meta.get("reason", ""),
        error=meta.get("error", ""),
        message=meta.get("message", ""),
        time_ms=int(meta.get("time", "0") or 0),
    )
    pairs = iter(original)
    return DeadLetterEntry(entry_id.decode(), letter, dict(zip(pairs, pairs, strict=True)))
