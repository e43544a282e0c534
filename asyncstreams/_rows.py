"""Many Structs of one shape, encoded for XADD at once: a pipeline's outputs, column by column.

`encode_flat` turns one payload into name, value, name, value... with a few Python steps per
payload. A pipeline that returns a Struct per entry pays them for every entry, so its most
common output, a Struct whose values are all text, numbers or booleans, is kept as the
tuple of its values until the commit, and the commit encodes all such outputs of a shape
together: one C loop per column (a column of numbers is one JSON array, split), not a
Python step per value. The text is the same as `encode_flat`'s, value for value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from .codec import _SCALAR_KINDS, _astuple, _boolean, _json, _number, _template, _templates

# The most fields an output may have: the commit script passes them to XADD with Lua's
# unpack(), which takes about 8,000 values.
MOST_FIELDS = 3_900


class Shape:
    """A Struct type with values of given types: the names of the fields it writes (a field
    that is None or UNSET is left out, as `encode_flat` leaves it out), and how to turn a
    column of its values to text."""

    __slots__ = ("_converters", "_kept", "ints", "names")

    def __init__(self, names: Sequence[str], kinds: tuple[type, ...]) -> None:
        kept = [index for index, kind in enumerate(kinds) if kind not in _LEFT_OUT]
        self.names = tuple(names[index] for index in kept)
        # Where its ints are, among the values: one beyond 64 bits takes `encode_flat`.
        self.ints = tuple(index for index, kind in enumerate(kinds) if kind is int)
        # The columns written, by index among the values; None: all of them.
        self._kept = None if len(kept) == len(kinds) else kept
        self._converters: tuple[tuple[int, Callable[[Sequence[Any]], Sequence[str]]], ...] = tuple(
            (position, _COLUMNS[kinds[index]])
            for position, index in enumerate(kept)
            if kinds[index] is not str
        )

    def columns(self, rows: Sequence[tuple[Any, ...]]) -> list[Sequence[str]]:
        """The values of `rows` (tuples of this shape) as text, column by column."""
        columns: list[Sequence[Any]] = list(zip(*rows, strict=True))
        if self._kept is not None:
            columns = [columns[index] for index in self._kept]
        for position, convert in self._converters:
            columns[position] = convert(columns[position])
        return columns


# Per (Struct type, types of its values): its Shape, or None when its outputs take
# `encode_flat` (a value that is not a scalar, a tag, omit_defaults, no field or too many).
_shapes: dict[tuple[type, tuple[type, ...]], Shape | None] = {}


def shape_of(payload: object) -> tuple[Shape, tuple[Any, ...]] | None:
    """`payload`'s Shape and values, when it is a Struct whose values are all scalars (or
    None); else None (`encode_flat` encodes it)."""
    template = _templates.get(type(payload))
    if template is None:
        if not isinstance(payload, msgspec.Struct):
            return None
        template = _template(type(payload))
    if not template:
        return None
    values: tuple[Any, ...] = _astuple(payload)  # type: ignore[arg-type]  # a Struct: a template
    kinds = tuple(map(type, values))
    try:
        shape = _shapes[(type(payload), kinds)]
    except KeyError:
        shape = _new_shape(type(payload), kinds, template)
    if shape is None:
        return None
    if shape.ints and not all(_LOWEST <= values[index] <= _HIGHEST for index in shape.ints):
        # Beyond what JSON numbers hold here: encode_flat writes it (or, past the digits
        # Python converts, raises, failing the call, not the commit).
        return None
    return shape, values


def _new_shape(struct: type, kinds: tuple[type, ...], template: list[Any]) -> Shape | None:
    shape = None
    written = sum(kind not in _LEFT_OUT for kind in kinds)
    if _WRITABLE.issuperset(kinds) and 0 < written <= MOST_FIELDS:
        shape = Shape(template[::2], kinds)
    if len(_shapes) < 4096:  # one per shape of Struct values: a few, in practice
        _shapes[(struct, kinds)] = shape
    return shape


def _numbers(values: Sequence[float]) -> Sequence[str]:
    """Ints (within 64 bits: see `shape_of`) or floats as `_number` writes each: one JSON
    array, split at its commas; value by value where JSON has no number for one (nan,
    inf)."""
    try:
        text = _json(values)
    except (msgspec.EncodeError, OverflowError):
        return list(map(_number, values))
    if b"null" in text:
        return list(map(_number, values))
    return text[1:-1].decode().split(",")


def _booleans(values: Sequence[bool]) -> Sequence[str]:
    return list(map(_boolean, values))


_COLUMNS: dict[type, Callable[[Sequence[Any]], Sequence[str]]] = {
    int: _numbers,
    float: _numbers,
    bool: _booleans,
}
# The ints a Shape writes: what msgspec encodes as a JSON number.
_LOWEST, _HIGHEST = -(2**63), 2**64 - 1
# The types of the values a field is left out for, and of those a Shape writes.
_LEFT_OUT = frozenset((type(None), type(msgspec.UNSET)))
_WRITABLE = _SCALAR_KINDS | _LEFT_OUT
