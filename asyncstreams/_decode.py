"""A Struct from an entry's flat field list: the decoders a handler's Struct parameter
gets (`codec` plans the handler), one and a batch at a time, built once per type.

Fields are decoded from the values' text by msgspec's lax rules (`strict=False`), nested
values from JSON text, bytes fields kept as they are; an entry that does not match raises
a DecodeError naming the field.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import msgspec.inspect as mi
import msgspec.structs

from .errors import ConfigurationError, DecodeError

_CONTAINERS = (
    mi.ListType,
    mi.TupleType,
    mi.VarTupleType,
    mi.SetType,
    mi.FrozenSetType,
    mi.DictType,
    mi.StructType,
    mi.DataclassType,
    mi.TypedDictType,
    mi.NamedTupleType,
)

_BINARY = (mi.BytesType, mi.ByteArrayType, mi.MemoryViewType)


@dataclass(frozen=True, slots=True)
class _Layout:
    """How a Struct's fields travel in an entry, by their encoded names."""

    names: dict[bytes, str]  # every field the Struct declares
    nested: frozenset[str]  # fields whose values travel as JSON text
    binary: frozenset[str]  # bytes fields: their values are passed on raw, not decoded


def _layout(struct: type[msgspec.Struct]) -> _Layout:
    info = mi.type_info(struct)
    assert isinstance(info, mi.StructType)
    if info.array_like:
        raise ConfigurationError(
            f"payload type {struct.__qualname__}: expected a Struct encoded as a map, "
            "found array_like=True (stream entries are field maps)"
        )
    nested = set()
    binary = set()
    for field in info.fields:
        members = field.type.types if isinstance(field.type, mi.UnionType) else (field.type,)
        members = tuple(m.type if isinstance(m, mi.Metadata) else m for m in members)
        containers = [m for m in members if isinstance(m, _CONTAINERS)]
        scalars = [m for m in members if not isinstance(m, (*_CONTAINERS, mi.NoneType))]
        if containers and scalars:
            raise ConfigurationError(
                f"payload type {struct.__qualname__}: field {field.name!r} mixes text and "
                f"nested types ({field.type}); expected one or the other"
            )
        if containers:
            nested.add(field.encode_name)
        elif any(isinstance(m, _BINARY) for m in members):
            binary.add(field.encode_name)
    names = {field.encode_name.encode(): field.encode_name for field in info.fields}
    return _Layout(names, frozenset(nested), frozenset(binary))


Decode = Callable[[list[bytes]], Any]
DecodeMany = Callable[[list[list[bytes]]], list[Any]]
_decoders: dict[type[msgspec.Struct], tuple[Decode, DecodeMany]] = {}


def struct_decoder(struct: type[msgspec.Struct]) -> Decode:
    """The decoder from an entry's flat field list to `struct`, built once per type."""
    return _struct_decoders(struct)[0]


def struct_batch_decoder(struct: type[msgspec.Struct]) -> DecodeMany:
    """`struct_decoder` for the entries of a batch at once: a list of `struct`, in order.
    Raises the DecodeError of the first entry that does not decode."""
    return _struct_decoders(struct)[1]


def _struct_decoders(struct: type[msgspec.Struct]) -> tuple[Decode, DecodeMany]:
    decoders = _decoders.get(struct)
    if decoders is None:
        decoders = _decoders[struct] = _build_struct_decoders(struct)
    return decoders


def _build_struct_decoders(struct: type[msgspec.Struct]) -> tuple[Decode, DecodeMany]:
    layout = _layout(struct)
    names = layout.names
    nested = layout.nested
    binary = layout.binary
    convert = msgspec.convert
    json_decode = msgspec.json.decode
    name = struct.__qualname__

    def declared(flat: list[bytes]) -> dict[str, Any]:
        """Only the fields the Struct declares: others may hold anything, binary included."""
        fields: dict[str, Any] = {}
        pairs = iter(flat)
        for key, value in zip(pairs, pairs, strict=False):
            field = names.get(key)
            if field is None:
                continue
            if field in binary:
                fields[field] = value
                continue
            try:
                fields[field] = value.decode()
            except UnicodeDecodeError as exc:
                raise DecodeError(
                    f"expected UTF-8 text in field {field!r} of {name}, found invalid bytes "
                    f"at byte {exc.start}"
                ) from None
        return fields

    # The short cut for the common entry (see _InOrder).
    in_order = (not (nested or binary) and _in_order(struct)) or _NOT_IN_ORDER
    keys, values, rows, quotes = in_order.keys, in_order.values, in_order.rows, in_order.quotes

    def decode(flat: list[bytes]) -> Any:
        if flat[::2] == keys:
            try:
                if values is None:
                    return struct(*map(bytes.decode, flat[1::2]))
                text = b'","'.join(flat[1::2])
                if b"\\" not in text and text.count(b'"') == quotes:
                    return struct(*values(b'["' + text + b'"]'))
            except (UnicodeDecodeError, msgspec.DecodeError, msgspec.ValidationError):
                pass  # the map's way says why
        if binary:
            fields = declared(flat)
        else:
            try:
                # Every field at once, in C (see decode_fields): the common case.
                items = map(bytes.decode, flat)
                fields = dict(zip(items, items, strict=False))
            except UnicodeDecodeError:
                fields = declared(flat)
        try:
            for key in nested.intersection(fields) if nested else ():
                try:
                    fields[key] = json_decode(fields[key])
                except msgspec.DecodeError as exc:
                    raise DecodeError(f"expected JSON in field {key!r} of {name}: {exc}") from None
            return convert(fields, struct, strict=False)
        except msgspec.ValidationError as exc:
            raise DecodeError(f"entry does not match {name}: {exc}") from None
        except RecursionError:
            raise DecodeError(
                f"entry does not match {name}: a value is nested too deeply to decode"
            ) from None

    def decode_many(flats: list[list[bytes]]) -> list[Any]:
        """Entries all in order, as one JSON array of arrays (see _InOrder); any other
        batch, one by one."""
        if rows is not None and flats and all(flat[::2] == keys for flat in flats):
            text = b'"],["'.join([b'","'.join(flat[1::2]) for flat in flats])
            expected = len(flats) * (quotes + 2) - 2  # the arrays' own quotes
            if b"\\" not in text and text.count(b'"') == expected:
                try:
                    return [struct(*row) for row in rows(b'[["' + text + b'"]]')]
                except (msgspec.DecodeError, msgspec.ValidationError):
                    pass  # one by one: the first that does not decode says why
        return [decode(flat) for flat in flats]

    return decode, decode_many


def _in_order(struct: type[msgspec.Struct]) -> _InOrder | None:
    """The decoder's short cut for an entry of `struct`'s own fields, every one, in its
    order (as `encode_flat` writes them), or None where the Struct's constructor is not the
    same as `msgspec.convert` from a map: a `__post_init__` (convert turns its errors into
    ValidationErrors), a tag, fields only passed by name, or a type msgspec cannot take."""
    config = struct.__struct_config__
    if config.tag is not None or hasattr(struct, "__post_init__"):
        return None
    fields = msgspec.structs.fields(struct)
    kinds = [p.kind for p in inspect.signature(struct).parameters.values()]
    if kinds != [inspect.Parameter.POSITIONAL_OR_KEYWORD] * len(fields):
        return None
    keys = [f.encode_name.encode() for f in fields]
    types = tuple(f.type for f in fields)
    if all(t is str for t in types):
        return _InOrder(keys, None, None, 0)
    row = tuple[types]  # type: ignore[valid-type]
    try:
        values = msgspec.json.Decoder(row, strict=False).decode
        rows = msgspec.json.Decoder(list[row], strict=False).decode
    except TypeError:  # e.g. a TypeVar
        return None
    return _InOrder(keys, values, rows, 2 * len(keys) - 2)


@dataclass(frozen=True, slots=True)
class _InOrder:
    """How the decoder takes an entry of a Struct's own fields, every one, in its order.

    When they are all of str, their values are decoded and go to the Struct's constructor
    in order. Otherwise they are one JSON array of strings to msgspec, which converts each
    to its field's type by its own rules for text (`strict=False`, as `msgspec.convert`
    does from a map), in one call: a JSON string means what its bytes say only if none of
    them is a backslash or a quote, so an entry holding one (the `quotes` between the
    values are the array's own) takes the map's way, as does one that msgspec refuses
    (the map's way then says why)."""

    keys: list[bytes] | None  # None: no short cut (no entry's names are None)
    values: Callable[[bytes], tuple[Any, ...]] | None
    rows: Callable[[bytes], list[tuple[Any, ...]]] | None  # the values of many entries
    quotes: int


_NOT_IN_ORDER = _InOrder(None, None, None, 0)
