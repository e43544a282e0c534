"""Partitioned streams: one logical stream split into N streams, spread over the hash slots
of a Redis Cluster (on one server, just N streams).

The names are fixed by a rule, since data lives under them; it never changes:

- Partition `i` of `Partitioned(name, n)` is the stream `{name:i:k}`: its hash tag is the
  whole name, so its dead-letter stream (`{name:i:k}:dead-letter`) shares its slot. `k` is
  the smallest integer from 0 up for which the stream's hash slot lies in the
  `(i + r) % n`-th of `n` equal ranges of the 16384 slots, `r` being the range `name`
  itself hashes to. So the partitions of one stream fall in `n` different ranges, spread
  evenly over the masters of a cluster whose slots are split evenly (as
  `redis-cli --cluster create` splits them), and partition 0 of two streams seldom shares
  a master.
- `derive(name)` gives streams of the same partitions with `:name` appended, each in its
  partition's slot: `{name:i:k}:name`.
- The partition of a key is CRC-32 (zlib's, IEEE 802.3) of the key's UTF-8 bytes, modulo
  `n`: the same in every process, language and version (not Python's `hash()`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from ._slots import SLOTS, key_slot
from .errors import ConfigurationError

# The most partitions of one stream (finding the names of 1,024 takes about 0.4 s).
MAX_PARTITIONS = 1024


@dataclass(frozen=True, slots=True)
class Partitioned:
    """One logical stream of `partitions` streams (see the module's doc for their names).

    Consume it like a stream (`@app.consumer(Partitioned("orders", 16), group=...)`: one
    handler reads every partition; `msg.stream` says which) and publish to it with a key
    (`await app.publish(orders, order, key=order.customer_id)`): entries of one key always
    go to the same partition. Without a key, entries are spread over the partitions.
    """

    name: str
    partitions: int
    # Appended to each partition's name (see `derive`); empty for a stream of its own.
    suffix: str = ""
    streams: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigurationError(
                f"Partitioned: expected a non-empty stream name, got {self.name!r}"
            )
        partitions = self.partitions
        if isinstance(partitions, bool) or not isinstance(partitions, int):
            raise ConfigurationError(
                f"Partitioned {self.name!r}: expected an integer number of partitions, "
                f"got {partitions!r}"
            )
        if not 1 <= partitions <= MAX_PARTITIONS:
            raise ConfigurationError(
                f"Partitioned {self.name!r}: expected 1 to {MAX_PARTITIONS} partitions, "
                f"got {partitions}"
            )
        if not isinstance(self.suffix, str):
            raise ConfigurationError(
                f"Partitioned {self.name!r}: expected the suffix as str, got {self.suffix!r}"
            )
        offset = key_slot(self.name) * partitions // SLOTS
        streams = tuple(
            _name_in_range(self.name, index, (index + offset) % partitions, partitions)
            + self.suffix
            for index in range(partitions)
        )
        object.__setattr__(self, "streams", streams)

    @property
    def label(self) -> str:
        """`name[partitions]` (with its suffix, if derived), for logs and errors."""
        return f"{self.name}{self.suffix}[{self.partitions}]"

    def derive(self, name: str) -> Partitioned:
        """Streams of as many partitions, partition `i` of which shares partition `i`'s hash
        slot: `{orders:3:0}:enriched` for `Partitioned("orders", 16).derive("enriched")`.
        A pipeline from this stream to the derived one commits each partition's outputs
        with its acks in one step, on a cluster too (see asyncstreams.pipeline)."""
        if not isinstance(name, str) or not name:
            raise ConfigurationError(
                f"Partitioned {self.label}: derive expected a non-empty name, got {name!r}"
            )
        return Partitioned(self.name, self.partitions, suffix=f"{self.suffix}:{name}")

    def index(self, key: str | bytes) -> int:
        """The partition `key` belongs to: CRC-32 of its UTF-8 bytes modulo `partitions`."""
        data = key.encode() if isinstance(key, str) else key
        return zlib.crc32(data) % self.partitions

    def stream(self, key: str | bytes) -> str:
        """The stream of the partition `key` belongs to."""
        return self.streams[self.index(key)]


def _name_in_range(name: str, index: int, target: int, partitions: int) -> str:
    """`{name:index:k}` for the smallest k whose slot is in range `target` of `partitions`."""
    k = 0
    while True:
        stream = f"{{{name}:{index}:{k}}}"
        if key_slot(stream) * partitions // SLOTS == target:
            return stream
        k += 1
