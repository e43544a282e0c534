"""`Message`: the envelope of one stream entry as a handler sees it."""

from __future__ import annotations

from .errors import DecodeError

# An entry as a consumer holds it: (stream, id, flat fields [name, value, ...], deliveries,
# size: the bytes of its names and values). A plain tuple: one is made for every entry read.
Entry = tuple[str, bytes, list[bytes], int, int]


def entry(stream: str, entry_id: bytes, flat: list[bytes], deliveries: int) -> Entry:
    return (stream, entry_id, flat, deliveries, sum(map(len, flat)))


class Message:
    """One entry of a stream, delivered to a consumer of a group.

    `fields` is the entry's field map decoded as UTF-8; `raw` is the same map as Redis sent
    it, in bytes. `deliveries` is how many times the group has delivered this entry, this
    delivery included (Redis' own delivery counter).
    """

    __slots__ = ("_fields", "_flat", "consumer", "deliveries", "group", "id", "stream")

    id: str
    stream: str
    group: str
    consumer: str
    deliveries: int

    def __init__(
        self,
        id: str,
        stream: str,
        group: str,
        fields: dict[str, str] | dict[bytes, bytes],
        *,
        consumer: str = "",
        deliveries: int = 1,
    ) -> None:
        self.id = id
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.deliveries = deliveries
        flat: list[bytes] = []
        for key, value in fields.items():
            flat.append(key.encode() if isinstance(key, str) else key)
            flat.append(value.encode() if isinstance(value, str) else value)
        self._flat = flat
        self._fields: dict[str, str] | None = None

    @classmethod
    def from_entry(
        cls,
        id: bytes,
        flat: list[bytes],
        stream: str,
        group: str,
        consumer: str,
        deliveries: int,
    ) -> Message:
        """Build a Message from an XREADGROUP entry without copying its fields."""
        message = cls.__new__(cls)
        message.id = id.decode()
        message.stream = stream
        message.group = group
        message.consumer = consumer
        message.deliveries = deliveries
        message._flat = flat
        message._fields = None
        return message

    @property
    def fields(self) -> dict[str, str]:
        """The entry's field map; raises DecodeError if a name or value is not UTF-8."""
        if self._fields is None:
            self._fields = decode_fields(self._flat)
        return self._fields

    @property
    def raw(self) -> dict[bytes, bytes]:
        """The entry's field map exactly as stored in Redis."""
        pairs = iter(self._flat)
        return dict(zip(pairs, pairs, strict=True))

    def __repr__(self) -> str:
        return (
            f"Message(id={self.id!r}, stream={self.stream!r}, group={self.group!r}, "
            f"deliveries={self.deliveries}, fields={len(self._flat) // 2})"
        )


def decode_fields(flat: list[bytes]) -> dict[str, str]:
    """Decode an entry's flat `[name, value, ...]` reply into a str dict."""
    try:
        # One map over the flat list, paired by zipping the iterator with itself: about twice
        # as fast as decoding pairs in a comprehension (0.8 vs 1.5 us for three fields).
        items = map(bytes.decode, flat)
        return dict(zip(items, items, strict=False))
    except UnicodeDecodeError:
        for index, item in enumerate(flat):
            try:
                item.decode()
            except UnicodeDecodeError as exc:
                name = flat[index - 1].decode(errors="replace")
                what = "name" if index % 2 == 0 else f"value of field {name!r}"
                raise DecodeError(
                    f"expected UTF-8 text in every field, found invalid bytes in the {what} "
                    f"at byte {exc.start}"
                ) from None
        raise  # pragma: no cover - the loop above always finds the culprit
