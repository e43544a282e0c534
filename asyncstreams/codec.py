"""From a handler's signature to one call per entry; from a payload to a flat field map.

A stream entry is a flat map of text fields. A handler asks for it by annotating its
parameters: a `msgspec.Struct` type is decoded from the fields (strings coerced to numbers
and booleans, nested values parsed from JSON), `Message` gets the envelope and
`dict[str, str]` gets the fields, and `Outbox` (one per call) takes what it publishes in a
pipeline. A handler whose parameters are lists of those (`list[Task]`, `list[Message]`;
the Outbox stays one) is a batch handler: it gets many entries in one call.
Everything is worked out once, at registration.
"""

from __future__ import annotations

import enum
import inspect
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import msgspec.structs

from ._decode import DecodeMany, struct_batch_decoder, struct_decoder
from .errors import ConfigurationError, DecodeError
from .message import Entry, Message, decode_fields
from .outbox import Outbox

Handler = Callable[..., Awaitable[Any]]
# The Outbox of a call whose first entry is (stream, id).
Outboxes = Callable[[str, bytes], Outbox]
# The call for one entry: (stream, id, flat fields, deliveries) -> the handler's awaitable.
Invoke = Callable[[str, bytes, list[bytes], int], Awaitable[Any]]
# The call for a batch: entries -> (the entries passed, those that did not decode, the
# handler's awaitable, or None when no entry decoded).
InvokeBatch = Callable[
    [list[Entry]], tuple[list[Entry], list[tuple[Entry, DecodeError]], Awaitable[Any] | None]
]


class Arg(enum.Enum):
    STRUCT = "a msgspec.Struct payload"
    FIELDS = "the fields as dict[str, str]"
    MESSAGE = "the Message envelope"
    OUTBOX = "an Outbox to emit outputs to"


_EXPECTED = (
    "a msgspec.Struct type, Message or dict[str, str] (or, for a batch handler, lists of "
    "them), and an Outbox if it emits outputs"
)


def _is_fields_type(annotation: object) -> bool:
    origin = typing.get_origin(annotation)
    return origin in (dict, Mapping) and typing.get_args(annotation) == (str, str)


def _is_struct_type(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, msgspec.Struct)


@dataclass(frozen=True, slots=True)
class HandlerPlan:
    """What a handler receives, worked out from its signature once."""

    handler: Handler
    name: str
    args: tuple[Arg, ...]
    keywords: tuple[str | None, ...]
    payload_type: type[msgspec.Struct] | None
    batch: bool = False

    @property
    def outbox(self) -> bool:
        """Whether the handler takes an Outbox."""
        return Arg.OUTBOX in self.args

    def bind(self, group: str, consumer: str, outboxes: Outboxes | None = None) -> Invoke:
        """The per-entry call for this handler running as `consumer` of `group`
        (`outboxes` makes the Outbox of a call, for a handler that takes one)."""
        handler = self.handler
        decode = struct_decoder(self.payload_type) if self.payload_type else None

        def message(stream: str, id: bytes, flat: list[bytes], deliveries: int) -> Message:
            return Message.from_entry(id, flat, stream, group, consumer, deliveries)

        if self.outbox:
            makers = [self._maker(arg, decode, message, outboxes) for arg in self.args]
            keywords = self.keywords

            def invoke_with_outbox(s: str, i: bytes, f: list[bytes], d: int) -> Awaitable[Any]:
                values = [make(s, i, f, d) for make in makers]
                positional = [v for v, k in zip(values, keywords, strict=True) if k is None]
                named = {k: v for v, k in zip(values, keywords, strict=True) if k is not None}
                return handler(*positional, **named)

            return invoke_with_outbox

        # The common shapes get a call of their own: no per-entry loop over parameters.
        if any(self.keywords):
            makers = [self._maker(arg, decode, message) for arg in self.args]
            keywords = self.keywords

            def invoke_general(s: str, i: bytes, f: list[bytes], d: int) -> Awaitable[Any]:
                positional = []
                named = {}
                for keyword, make in zip(keywords, makers, strict=True):
                    if keyword is None:
                        positional.append(make(s, i, f, d))
                    else:
                        named[keyword] = make(s, i, f, d)
                return handler(*positional, **named)

            return invoke_general
        if decode is not None and self.args == (Arg.STRUCT,):
            return lambda s, i, f, d: handler(decode(f))
        if decode is not None and self.args == (Arg.STRUCT, Arg.MESSAGE):
            return lambda s, i, f, d: handler(decode(f), message(s, i, f, d))
        if self.args == (Arg.MESSAGE,):
            return lambda s, i, f, d: handler(message(s, i, f, d))
        if self.args == (Arg.FIELDS,):
            return lambda s, i, f, d: handler(decode_fields(f))
        makers = [self._maker(arg, decode, message) for arg in self.args]
        return lambda s, i, f, d: handler(*[make(s, i, f, d) for make in makers])

    def bind_batch(
        self, group: str, consumer: str, outboxes: Outboxes | None = None
    ) -> InvokeBatch:
        """The call for a batch of entries, for a handler that takes lists (and an Outbox,
        one per call, if it takes one: see `bind`)."""
        handler = self.handler
        decode = struct_decoder(self.payload_type) if self.payload_type else None

        def message(stream: str, id: bytes, flat: list[bytes], deliveries: int) -> Message:
            return Message.from_entry(id, flat, stream, group, consumer, deliveries)

        args = [arg for arg in self.args if arg is not Arg.OUTBOX]
        makers = [self._maker(arg, decode, message) for arg in args]
        decode_many = struct_batch_decoder(self.payload_type) if self.payload_type else None
        columns_of = [
            self._column(make, decode_many if arg is Arg.STRUCT else None)
            for arg, make in zip(args, makers, strict=True)
        ]
        keywords = tuple(
            k for a, k in zip(self.args, self.keywords, strict=True) if a is not Arg.OUTBOX
        )
        # Where the Outbox goes among the arguments, if the handler takes one.
        box_at = self.args.index(Arg.OUTBOX) if self.outbox else -1
        box_keyword = self.keywords[box_at] if box_at >= 0 else None

        def invoke_batch(
            entries: list[Entry],
        ) -> tuple[list[Entry], list[tuple[Entry, DecodeError]], Awaitable[Any] | None]:
            passed: list[Entry] = entries
            rejected: list[tuple[Entry, DecodeError]] = []
            try:
                columns = [column(entries) for column in columns_of]
            except DecodeError:
                # Some entry does not decode: sort them out one by one (the rare case).
                passed = []
                columns = [[] for _ in makers]
                for entry in entries:
                    try:
                        values = [make(entry[0], entry[1], entry[2], entry[3]) for make in makers]
                    except DecodeError as exc:
                        rejected.append((entry, exc))
                        continue
                    passed.append(entry)
                    for column, value in zip(columns, values, strict=True):
                        column.append(value)
            if not passed:
                return passed, rejected, None
            positional: list[Any] = [c for c, k in zip(columns, keywords, strict=True) if k is None]
            named: dict[str, Any] = {
                k: c for c, k in zip(columns, keywords, strict=True) if k is not None
            }
            if box_at >= 0:
                assert outboxes is not None
                box = outboxes(passed[0][0], passed[0][1])
                if box_keyword is None:
                    positional.insert(box_at, box)
                else:
                    named[box_keyword] = box
            return passed, rejected, handler(*positional, **named)

        return invoke_batch

    @staticmethod
    def _column(
        make: Callable[[str, bytes, list[bytes], int], Any], decode_many: DecodeMany | None
    ) -> Callable[[list[Entry]], list[Any]]:
        """An argument's list for all the entries of a batch: Structs decoded together."""
        if decode_many is not None:
            return lambda entries: decode_many([e[2] for e in entries])
        return lambda entries: [make(e[0], e[1], e[2], e[3]) for e in entries]

    @staticmethod
    def _maker(
        arg: Arg,
        decode: Callable[[list[bytes]], Any] | None,
        message: Callable[[str, bytes, list[bytes], int], Message],
        outboxes: Outboxes | None = None,
    ) -> Callable[[str, bytes, list[bytes], int], Any]:
        if arg is Arg.MESSAGE:
            return message
        if arg is Arg.OUTBOX:
            assert outboxes is not None
            return lambda s, i, f, d: outboxes(s, i)
        if arg is Arg.FIELDS:
            return lambda s, i, f, d: decode_fields(f)
        assert decode is not None
        return lambda s, i, f, d: decode(f)


def plan_handler(handler: object) -> HandlerPlan:
    """Check `handler`'s signature and work out what each parameter receives.

    Raises ConfigurationError naming the handler when it is not `async def`, has a
    parameter whose annotation is not one of the supported kinds, or asks for two payloads.
    """
    name = getattr(handler, "__qualname__", None) or repr(handler)
    if not callable(handler):
        raise ConfigurationError(f"handler {name}: expected an async function, found {handler!r}")
    # An object whose class has `async def __call__` counts too.
    is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        type(handler).__call__
    )
    if not is_async:
        raise ConfigurationError(
            f"handler {name}: expected an async function (async def), found a regular "
            f"{'function' if inspect.isfunction(handler) else type(handler).__name__}"
        )
    signature = _signature(handler, name)

    args: list[Arg] = []
    keywords: list[str | None] = []
    lists: list[bool] = []
    payload_type: type[msgspec.Struct] | None = None
    for param in signature.parameters.values():
        where = f'handler {name}: parameter "{param.name}"'
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ConfigurationError(
                f"{where}: expected a named parameter annotated with {_EXPECTED}, "
                f"found {'*' if param.kind is param.VAR_POSITIONAL else '**'}{param.name}"
            )
        annotation = param.annotation
        if annotation is param.empty:
            raise ConfigurationError(f"{where}: expected an annotation, {_EXPECTED}; found none")
        if annotation is Outbox:
            if Arg.OUTBOX in args:
                raise ConfigurationError(f"{where}: expected one Outbox parameter, found a second")
            args.append(Arg.OUTBOX)
            keywords.append(param.name if param.kind is param.KEYWORD_ONLY else None)
            continue
        is_list = typing.get_origin(annotation) is list and len(typing.get_args(annotation)) == 1
        if is_list:
            annotation = typing.get_args(annotation)[0]
        if annotation is Outbox:
            raise ConfigurationError(
                f"{where}: expected Outbox (one per call, a batch handler's too), found "
                f"{param.annotation!r}"
            )
        if annotation is Message:
            arg = Arg.MESSAGE
        elif _is_struct_type(annotation):
            arg = Arg.STRUCT
            payload_type = annotation
        elif _is_fields_type(annotation):
            arg = Arg.FIELDS
        else:
            raise ConfigurationError(f"{where}: expected {_EXPECTED}, found {param.annotation!r}")
        if arg is not Arg.MESSAGE and any(a in (Arg.STRUCT, Arg.FIELDS) for a in args):
            raise ConfigurationError(
                f"{where}: the handler already takes a payload; expected one payload "
                f"parameter ({Arg.STRUCT.value} or {Arg.FIELDS.value}), found a second"
            )
        if lists and lists[0] != is_list:
            raise ConfigurationError(
                f"{where}: expected every parameter to be a list (a batch handler) or none "
                f"of them; found {param.annotation!r} beside "
                f"{'lists' if lists[0] else 'single values'}"
            )
        args.append(arg)
        lists.append(is_list)
        keywords.append(param.name if param.kind is param.KEYWORD_ONLY else None)
    if not lists:
        raise ConfigurationError(
            f"handler {name}: expected at least one parameter annotated with {_EXPECTED}, "
            "found none"
        )
    if payload_type is not None:
        struct_decoder(payload_type)  # fail now, not at the first entry
    return HandlerPlan(handler, name, tuple(args), tuple(keywords), payload_type, lists[0])


def _signature(handler: Callable[..., Any], name: str) -> inspect.Signature:
    """The signature with string annotations evaluated (for functions, partials and objects
    with `async def __call__` alike)."""
    try:
        return inspect.signature(handler, eval_str=True)
    except NameError as exc:
        raw = inspect.signature(handler)
        culprit = next(
            (
                f'parameter "{p.name}"'
                for p in raw.parameters.values()
                if isinstance(p.annotation, str) and exc.name and exc.name in p.annotation
            ),
            "an annotation",
        )
        raise ConfigurationError(
            f"handler {name}: {culprit}: cannot resolve {exc.name!r} ({exc}); expected "
            f"{_EXPECTED} defined where the handler's module can see it (e.g. module level)"
        ) from None


_RAW = (bytes, bytearray, memoryview)


def encode_fields(payload: msgspec.Struct | Mapping[str, Any]) -> dict[str, str | bytes]:
    """A flat field map any Redis client can read: scalars as text, bytes as they are,
    nested values as JSON (where bytes are base64, JSON having no bytes).

    `None` values are left out (a stream entry has no null); decoding gives such a
    field its default.
    """
    flat = encode_flat(payload)
    return dict(zip(flat[::2], flat[1::2], strict=True))  # type: ignore[arg-type]  # names are str


def encode_flat(payload: object) -> list[str | bytes]:
    """`encode_fields` as XADD takes it: name, value, name, value... (no dict made).

    A Struct whose values are all text, numbers or booleans (the common case) takes a path
    of C loops, planned once per Struct type and per the types its values hold."""
    template = _templates.get(type(payload))
    if template is None and isinstance(payload, msgspec.Struct):
        template = _template(type(payload))
    if template:
        values: Sequence[Any] = _astuple(payload)  # type: ignore[arg-type]  # a Struct: a template
        steps = _steps_for(tuple(map(type, values)))
        if steps is None:
            return _flatten(zip(template[::2], values, strict=True))
        flat = template.copy()
        if steps:
            converted = list(values)
            for index, convert in steps:
                converted[index] = convert(converted[index])
            values = converted
        flat[1::2] = values
        return flat  # type: ignore[return-value]  # every None was replaced by a value
    if isinstance(payload, msgspec.Struct):
        items = msgspec.to_builtins(payload, builtin_types=_RAW).items()
    elif isinstance(payload, Mapping):
        items = payload.items()
    else:
        raise ConfigurationError(
            f"publish: expected a msgspec.Struct or a dict payload, found {type(payload).__name__}"
        )
    return _flatten(items)


def _flatten(items: Iterable[tuple[object, Any]]) -> list[str | bytes]:
    flat: list[str | bytes] = []
    add = flat.append
    for key, value in items:
        if type(key) is not str:
            # A str subclass or an enum whose value is a str names a field as it did.
            key = msgspec.to_builtins(key)
            if type(key) is not str:
                raise ConfigurationError(
                    f"publish: expected field names as str, found {type(key).__name__} {key!r}"
                )
        if type(value) is not str:
            if value is None or value is msgspec.UNSET:
                continue
            convert = _SCALARS.get(type(value))
            if convert is not None:
                value = convert(value)
            elif isinstance(value, _RAW):
                value = bytes(value)
            else:
                # What msgspec makes of it: text (a datetime, a UUID, an enum's value...),
                # a number, nothing (an enum whose value is None), or a nested value,
                # written as JSON.
                converted = msgspec.to_builtins(value, builtin_types=_RAW)
                if converted is None:
                    continue
                convert = _SCALARS.get(type(converted))
                if type(converted) is str:
                    value = converted
                elif convert is not None:
                    value = convert(converted)
                else:
                    value = _json(value)
        add(key)
        add(value)
    if not flat:
        raise ConfigurationError(
            "publish: expected a payload with at least one non-None field, found none "
            "(Redis stores no empty entries)"
        )
    return flat


_json = msgspec.json.Encoder().encode
_astuple = msgspec.structs.astuple
# Per Struct type: [name, None, name, None, ...] to fill with its values; empty where only
# `to_builtins` says what is written (omit_defaults, a tag).
_templates: dict[type, list[str | bytes | None]] = {}
# Per tuple of value types: how to turn those values to text, as (index, converter) for
# each that is not text already; None when one is not a scalar (then `_flatten` decides).
_steps: dict[tuple[type, ...], tuple[tuple[int, Callable[[Any], str]], ...] | None] = {}


def _template(struct: type[msgspec.Struct]) -> list[str | bytes | None]:
    config = struct.__struct_config__
    # omit_defaults leaves fields out, a tag adds one: to_builtins says what is written.
    plain = not config.omit_defaults and config.tag is None
    names = struct.__struct_encode_fields__ if plain else ()
    template = _templates[struct] = [part for name in names for part in (name, None)]
    return template


def _steps_for(kinds: tuple[type, ...]) -> tuple[tuple[int, Callable[[Any], str]], ...] | None:
    try:
        return _steps[kinds]
    except KeyError:
        pass
    steps = None
    if _SCALAR_KINDS.issuperset(kinds):
        steps = tuple((i, _SCALARS[kind]) for i, kind in enumerate(kinds) if kind is not str)
    if len(_steps) < 4096:  # one entry per shape of Struct values: a few, in practice
        _steps[kinds] = steps
    return steps


def _number(value: float) -> str:
    """An int or a float as text: msgspec's JSON number (4x faster than repr, the same
    digits; an exponent is written `1e16`, not repr's `1e+16`), or repr for what JSON has
    no number for (nan, inf, ints beyond 64 bits)."""
    try:
        text = _json(value)
    except (msgspec.EncodeError, OverflowError):
        return repr(value)
    return repr(value) if text == b"null" else text.decode()


def _boolean(value: bool) -> str:
    return "true" if value else "false"


_SCALARS: dict[type, Callable[[Any], str]] = {int: _number, float: _number, bool: _boolean}
_SCALAR_KINDS = frozenset((str, *_SCALARS))
