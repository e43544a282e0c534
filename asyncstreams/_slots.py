"""Redis Cluster hash slots: which of the 16384 slots a key belongs to, and an even split of
the slots among masters.

As the Redis Cluster specification defines them: the slot of a key is CRC16 (the XMODEM
variant) of the key modulo 16384, where a key holding a `{` followed later by a `}` with at
least one character between them is hashed on those characters only (its hash tag), so
`{user1000}.following` and `{user1000}.followers` share a slot.
"""

from __future__ import annotations

from binascii import crc_hqx

SLOTS = 16384


def key_slot(key: str | bytes) -> int:
    """The hash slot of `key` (a str is encoded as UTF-8, as redis-py sends it)."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        # Only the first `{` and the first `}` after it count; `{}` is no hash tag.
        if end > start + 1:
            data = data[start + 1 : end]
    # crc_hqx with 0 as the initial value is CRC16-XMODEM (polynomial 0x1021), in C.
    return crc_hqx(data, 0) % SLOTS


def slot_ranges(masters: int) -> list[tuple[int, int]]:
    """`masters` contiguous (first, last) slot ranges covering every slot, sizes within one
    of each other, as `redis-cli --cluster create` splits them (3: 0-5460, 5461-10922,
    10923-16383)."""
    if not 1 <= masters <= SLOTS:
        raise ValueError(f"expected 1 to {SLOTS} masters, got {masters}")
    starts = [(SLOTS * index + masters // 2) // masters for index in range(masters)]
    return [(start, end - 1) for start, end in zip(starts, [*starts[1:], SLOTS], strict=True)]
