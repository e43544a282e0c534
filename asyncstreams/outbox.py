"""`Outbox`: what a handler publishes beside its return value, committed with its acks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from .errors import ConfigurationError
from .partitions import Partitioned

Payload = msgspec.Struct | Mapping[str, Any]
Target = str | Partitioned


class Outbox:
    """Where a handler emits what it publishes: declare a parameter annotated `Outbox` and
    call `emit`. Nothing is sent while the handler runs: what it emitted is committed with
    the call's acks, exactly once (see asyncstreams.pipeline), and dropped if the call fails.
    """

    __slots__ = ("emitted",)

    def __init__(self) -> None:
        self.emitted: list[tuple[Target, Payload, str | bytes | None]] = []

    def emit(self, stream: Target, payload: Payload, *, key: str | bytes | None = None) -> None:
        """Publish `payload` to `stream` (`{stream}` in a name is replaced by the input's
        stream) when the call commits. To a `Partitioned` stream, `key` picks the
        partition; without one, the partition of the same number as the input's (a
        `Partitioned` input of as many partitions), else one picked by the input entry's id.
        A payload that cannot be published fails the call when it returns."""
        if not isinstance(stream, (str, Partitioned)) or not stream:
            raise ConfigurationError(
                f"Outbox.emit: expected a stream name or a Partitioned stream, found {stream!r}"
            )
        self.emitted.append((stream, payload, key))

    def __repr__(self) -> str:
        return f"Outbox(emitted={len(self.emitted)})"
