"""From a handler's signature to its arguments, and from a payload to stream fields and back.

Pure unit tests: no Redis. An entry is given as Redis sends it, a flat [name, value, ...] list
of bytes, and the per-entry call is awaited with asyncio.run (a handler's return value comes
back, so handlers here just return what they were given).
"""

import asyncio
import datetime
import enum
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncstreams import App, ConfigurationError, DecodeError, Message
from asyncstreams._decode import struct_batch_decoder, struct_decoder
from asyncstreams.codec import encode_fields, plan_handler

# -- payload types -----------------------------------------------------------------------


class Task(msgspec.Struct):
    task_id: str
    data: str
    created_at: float


class Scalars(msgspec.Struct):
    ratio: float
    count: int
    flag: bool


class Point(msgspec.Struct):
    x: int
    y: int


class Nested(msgspec.Struct):
    numbers: list[int]
    counts: dict[str, int]
    point: Point
    tags: list[str] | None = None


class WithDefaults(msgspec.Struct):
    name: str
    retries: int = 3
    note: str | None = None
    labels: list[str] = []


class Camel(msgspec.Struct, rename="camel"):
    task_id: str
    retry_count: int = 0
    extra_tags: list[str] = []


class ArrayLike(msgspec.Struct, array_like=True):
    a: int


class Mixed(msgspec.Struct):
    value: list[int] | str


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Rich(msgspec.Struct):
    when: datetime.datetime
    color: Color
    blob: bytes
    text: str
    ratio: float
    tiny: float
    delta: int
    flag: bool
    points: list[Point] = []
    lookup: dict[str, list[int]] = {}
    maybe: int | None = None


class Sample(msgspec.Struct):
    text: str
    number: int
    ratio: float
    flag: bool
    numbers: list[int]


# -- helpers ---------------------------------------------------------------------------

ENTRY_ID = b"1700000000000-7"


def flatten(fields: Mapping[str, str | bytes]) -> list[bytes]:
    """A field map as XREADGROUP returns it: [name, value, ...] in bytes."""
    flat: list[bytes] = []
    for name, value in fields.items():
        flat += [name.encode(), value.encode() if isinstance(value, str) else value]
    return flat


def deliver(
    handler: Callable[..., Awaitable[Any]],
    flat: list[bytes],
    *,
    stream: str = "orders",
    deliveries: int = 1,
) -> Any:
    """Plan `handler`, bind it as consumer "worker-1" of group "billing", run it on one entry."""
    invoke = plan_handler(handler).bind("billing", "worker-1")
    return asyncio.run(invoke(stream, ENTRY_ID, flat, deliveries))  # type: ignore[arg-type]


def round_trip(payload: msgspec.Struct) -> Any:
    return struct_decoder(type(payload))(flatten(encode_fields(payload)))


def register(handler: Any) -> Any:
    return App().consumer("orders", group="billing")(handler)


TASK_FLAT = [b"task_id", b"t-1", b"data", b"hello", b"created_at", b"1.5"]
TASK = Task("t-1", "hello", 1.5)


# -- what a handler receives -----------------------------------------------------------


def test_struct_parameter_is_decoded_from_the_fields() -> None:
    async def handle(task: Task) -> Task:
        return task

    assert deliver(handle, TASK_FLAT) == TASK


def test_message_parameter_gets_the_envelope() -> None:
    async def handle(message: Message) -> Message:
        return message

    message = deliver(handle, [b"n", b"1", b"k", b"\xc3\xa9"], stream="orders", deliveries=3)
    assert isinstance(message, Message)
    assert message.id == "1700000000000-7"
    assert message.stream == "orders"
    assert message.group == "billing"
    assert message.consumer == "worker-1"
    assert message.deliveries == 3
    assert message.fields == {"n": "1", "k": "é"}
    assert message.raw == {b"n": b"1", b"k": b"\xc3\xa9"}


def test_dict_parameter_gets_the_fields() -> None:
    async def handle(fields: dict[str, str]) -> dict[str, str]:
        return fields

    assert deliver(handle, [b"a", b"1", b"b", b"two"]) == {"a": "1", "b": "two"}


async def struct_then_message(task: Task, message: Message) -> tuple[Task, Message]:
    return task, message


async def message_then_struct(message: Message, task: Task) -> tuple[Task, Message]:
    return task, message


async def keyword_only_message(task: Task, *, message: Message) -> tuple[Task, Message]:
    return task, message


async def all_keyword_only(*, message: Message, task: Task) -> tuple[Task, Message]:
    return task, message


async def fields_and_message(fields: dict[str, str], message: Message) -> tuple[Any, Message]:
    return fields, message


@pytest.mark.parametrize(
    "handler",
    [struct_then_message, message_then_struct, keyword_only_message, all_keyword_only],
    ids=lambda h: h.__name__,
)
def test_struct_and_message_together_in_any_order(handler: Callable[..., Any]) -> None:
    assert register(handler) is handler
    task, message = deliver(handler, TASK_FLAT, deliveries=2)
    assert task == TASK
    assert isinstance(message, Message)
    assert (message.id, message.deliveries) == ("1700000000000-7", 2)


def test_fields_and_message_together() -> None:
    fields, message = deliver(fields_and_message, [b"a", b"1"])
    assert fields == {"a": "1"}
    assert message.fields == {"a": "1"}


def test_decorator_returns_the_function_unchanged() -> None:
    async def handle(task: Task) -> None:
        pass

    app = App()
    assert app.consumer("orders", group="billing")(handle) is handle
    assert [r.plan.handler for r in app.registrations] == [handle]


class CallableHandler:
    async def __call__(self, task: Task) -> Task:
        return task


def test_object_with_async_call_is_accepted() -> None:
    handler = CallableHandler()
    assert register(handler) is handler
    assert deliver(handler, TASK_FLAT) == TASK


def test_two_handlers_on_one_stream_and_group_are_refused() -> None:
    app = App()

    @app.consumer("orders", group="billing")
    async def first(message: Message) -> None:
        pass

    async def second(message: Message) -> None:
        pass

    with pytest.raises(ConfigurationError) as caught:
        app.consumer(["audit", "orders"], group="billing")(second)
    message = str(caught.value)
    assert "first" in message
    assert "second" in message
    assert "'orders'" in message
    assert "'billing'" in message
    assert len(app.registrations) == 1


def test_same_stream_in_another_group_is_fine() -> None:
    app = App()

    @app.consumer("orders", group="billing")
    async def first(message: Message) -> None:
        pass

    @app.consumer("orders", group="audit")
    async def second(message: Message) -> None:
        pass

    assert [r.options.group for r in app.registrations] == ["billing", "audit"]


# -- signatures refused at registration ------------------------------------------------


def sync_handler(message: Message) -> None:
    pass


async def no_params() -> None:
    pass


async def unannotated(message) -> None:  # type: ignore[no-untyped-def]
    pass


async def takes_int(count: int) -> None:
    pass


async def takes_int_dict(fields: dict[str, int]) -> None:
    pass


async def two_structs(task: Task, other: Scalars) -> None:
    pass


async def struct_and_fields(task: Task, fields: dict[str, str]) -> None:
    pass


async def star_args(*args: Message) -> None:
    pass


async def star_kwargs(message: Message, **kwargs: Message) -> None:
    pass


async def unresolvable(task: "Missing") -> None:  # type: ignore[name-defined] # noqa: F821
    pass


@pytest.mark.parametrize(
    ("handler", "name", "words"),
    [
        pytest.param(sync_handler, "sync_handler", ["async def", "regular"], id="not-async"),
        pytest.param(lambda message: None, "<lambda>", ["async def", "regular"], id="lambda"),
        pytest.param(no_params, "no_params", ["parameter", "found none"], id="no-params"),
        pytest.param(
            unannotated, "unannotated", ['"message"', "annotation", "found none"], id="bare"
        ),
        pytest.param(takes_int, "takes_int", ['"count"', "msgspec.Struct", "int"], id="int"),
        pytest.param(
            takes_int_dict, "takes_int_dict", ['"fields"', "dict[str, int]"], id="dict-int"
        ),
        pytest.param(two_structs, "two_structs", ['"other"', "one payload", "second"], id="2x"),
        pytest.param(
            struct_and_fields, "struct_and_fields", ['"fields"', "second"], id="struct+dict"
        ),
        pytest.param(star_args, "star_args", ['"args"', "*args"], id="args"),
        pytest.param(star_kwargs, "star_kwargs", ['"kwargs"', "**kwargs"], id="kwargs"),
        pytest.param(unresolvable, "unresolvable", ['"task"', "Missing"], id="unresolvable"),
    ],
)
def test_bad_signature_is_refused_at_registration(
    handler: Any, name: str, words: list[str]
) -> None:
    app = App()
    with pytest.raises(ConfigurationError) as caught:
        app.consumer("orders", group="billing")(handler)
    message = str(caught.value)
    assert name in message
    assert "expected" in message
    for word in words:
        assert word in message
    assert app.registrations == ()


async def takes_array_like(payload: ArrayLike) -> None:
    pass


async def takes_mixed(payload: Mixed) -> None:
    pass


@pytest.mark.parametrize(
    ("handler", "words"),
    [
        pytest.param(takes_array_like, ["ArrayLike", "array_like"], id="array_like"),
        pytest.param(takes_mixed, ["Mixed", "'value'", "mixes"], id="list-or-str"),
    ],
)
def test_payload_type_that_cannot_be_a_field_map_is_refused(
    handler: Callable[..., Any], words: list[str]
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        register(handler)
    for word in words:
        assert word in str(caught.value)


# -- decoding --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"), [("true", True), ("false", False), ("1", True), ("0", False)]
)
def test_text_is_coerced_to_bool(text: str, expected: bool) -> None:
    flat = flatten({"ratio": "0", "count": "0", "flag": text})
    assert struct_decoder(Scalars)(flat).flag is expected


@pytest.mark.parametrize(
    ("ratio", "count", "expected"),
    [
        ("1.5", "42", Scalars(1.5, 42, True)),
        ("-2", "-7", Scalars(-2.0, -7, True)),
        ("1e-300", "0", Scalars(1e-300, 0, True)),
    ],
)
def test_text_is_coerced_to_numbers(ratio: str, count: str, expected: Scalars) -> None:
    decoded = struct_decoder(Scalars)(flatten({"ratio": ratio, "count": count, "flag": "true"}))
    assert decoded == expected
    assert type(decoded.count) is int
    assert type(decoded.ratio) is float


def test_seed_producer_entry_decodes_into_task() -> None:
    task_id = str(uuid.uuid4())
    created_at = str(time.time())
    fields = {"task_id": task_id, "data": "resize image 42", "created_at": created_at}
    flat = [item.encode() for pair in fields.items() for item in pair]
    task = struct_decoder(Task)(flat)
    assert task == Task(task_id, "resize image 42", float(created_at))
    assert task.created_at == float(created_at)


def test_missing_optional_fields_take_defaults() -> None:
    assert struct_decoder(WithDefaults)([b"name", b"n"]) == WithDefaults("n", 3, None, [])


def test_unknown_fields_are_ignored() -> None:
    flat = [*TASK_FLAT, b"trace_id", b"abc", b"extra", b"{not json"]
    assert struct_decoder(Task)(flat) == TASK


def test_nested_fields_are_parsed_from_json() -> None:
    flat = flatten(
        {
            "numbers": "[1, 2, 3]",
            "counts": '{"a": 1, "b": 2}',
            "point": '{"x": 1, "y": -2}',
            "tags": '["x", "y"]',
        }
    )
    assert struct_decoder(Nested)(flat) == Nested(
        [1, 2, 3], {"a": 1, "b": 2}, Point(1, -2), ["x", "y"]
    )


def test_optional_nested_field_may_be_absent() -> None:
    flat = flatten({"numbers": "[]", "counts": "{}", "point": '{"x": 0, "y": 0}'})
    assert struct_decoder(Nested)(flat) == Nested([], {}, Point(0, 0), None)


def test_renamed_struct_uses_encoded_names() -> None:
    flat = flatten({"taskId": "t", "retryCount": "2", "extraTags": '["a"]'})
    assert struct_decoder(Camel)(flat) == Camel("t", 2, ["a"])


def test_renamed_struct_ignores_python_names() -> None:
    with pytest.raises(DecodeError, match="taskId"):
        struct_decoder(Camel)(flatten({"task_id": "t"}))


@pytest.mark.parametrize(
    ("payload_type", "fields", "words"),
    [
        pytest.param(
            Scalars, {"ratio": "abc", "count": "1", "flag": "true"}, ["ratio", "float"], id="float"
        ),
        pytest.param(
            Scalars, {"ratio": "1", "count": "1.5", "flag": "true"}, ["count", "int"], id="int"
        ),
        pytest.param(
            Scalars, {"ratio": "1", "count": "1", "flag": "yes"}, ["flag", "bool"], id="bool"
        ),
        pytest.param(Scalars, {"count": "1", "flag": "true"}, ["ratio", "missing"], id="missing"),
        pytest.param(
            Nested,
            {"numbers": "[1, 2", "counts": "{}", "point": '{"x": 0, "y": 0}'},
            ["numbers", "JSON"],
            id="bad-json",
        ),
        pytest.param(
            Nested,
            {"numbers": '["a"]', "counts": "{}", "point": '{"x": 0, "y": 0}'},
            ["numbers", "int"],
            id="bad-nested-item",
        ),
        pytest.param(
            Nested,
            {"numbers": "[]", "counts": "{}", "point": '{"x": 0}'},
            ["point", "y"],
            id="nested-struct-missing",
        ),
    ],
)
def test_entry_that_does_not_match_raises_decode_error(
    payload_type: type[msgspec.Struct], fields: dict[str, str], words: list[str]
) -> None:
    with pytest.raises(DecodeError) as caught:
        struct_decoder(payload_type)(flatten(fields))
    for word in words:
        assert word in str(caught.value)


class Limited(msgspec.Struct):
    name: Annotated[str, msgspec.Meta(max_length=3)]
    count: Annotated[int, msgspec.Meta(ge=0)]
    color: Color
    maybe: int | None


class Checked(msgspec.Struct):
    count: int

    def __post_init__(self) -> None:
        if self.count > 9:
            raise ValueError("count over 9")


class ByName(msgspec.Struct, kw_only=True):
    count: int
    ratio: float


def _by_convert(struct: type[msgspec.Struct], flat: list[bytes]) -> Any:
    """What msgspec.convert makes of the entry as a map, or the error it raises."""
    items = map(bytes.decode, flat)
    try:
        return msgspec.convert(dict(zip(items, items, strict=True)), struct, strict=False)
    except msgspec.ValidationError as exc:
        return str(exc)


@pytest.mark.parametrize(
    ("struct", "values"),
    [
        *((Scalars, [ratio, "1", "true"]) for ratio in ("1.5", "-0", "nan", "inf", "1e400")),
        *((Scalars, [ratio, "1", "true"]) for ratio in ("1_0", " 1.5", "+1.5", ".5", "1.", "")),
        *(
            (Scalars, ["1", count, "1"])
            for count in ("7", "-0", "1_0", "\uff11\uff12", "0x10", "1.0")
        ),
        *((Scalars, ["1", "1", flag]) for flag in ("false", "0", "True", "yes", "")),
        (Limited, ["abc", "0", "red", "5"]),
        (Limited, ["abcd", "0", "red", "5"]),
        (Limited, ["abc", "-1", "red", "5"]),
        (Limited, ["abc", "0", "green", "5"]),
        (Limited, ["abc", "0", "blue", "null"]),
        # Text that JSON would read otherwise, in a Struct of text and a number.
        *(
            (Task, [text, "d", "1.5"])
            for text in ('a"b', "a\\u0031", "\\", '"', '","', "line\nbreak", "\t", "\u00e9")
        ),
        (Task, ["t", 'a","b', "2"]),
        (Task, ["t", '","', '","']),
        (Checked, ["9"]),
        (Checked, ["10"]),
        (ByName, ["1", "2.5"]),
    ],
)
def test_an_entry_in_the_structs_order_decodes_as_msgspec_converts_its_map(
    struct: type[msgspec.Struct], values: list[str]
) -> None:
    """The decoder's short cut for an entry of every field in order (the common case)
    gives what msgspec.convert gives from the map, and its errors."""
    names = [f.encode_name.encode() for f in msgspec.structs.fields(struct)]
    flat = [part for pair in zip(names, (v.encode() for v in values), strict=True) for part in pair]
    expected = _by_convert(struct, flat)
    if isinstance(expected, str):
        with pytest.raises(DecodeError, match=re.escape(expected)):
            struct_decoder(struct)(flat)
    else:
        assert repr(struct_decoder(struct)(flat)) == repr(expected)  # repr: nan != nan


def test_a_batch_decodes_as_its_entries_one_by_one() -> None:
    """Entries of a batch handler are decoded together where they can be (see _InOrder):
    the same values as one by one, the same error for the first that does not decode."""
    decode, decode_many = struct_decoder(Task), struct_batch_decoder(Task)
    in_order = [
        [b"task_id", f"t-{n}".encode(), b"data", b"d", b"created_at", str(n / 3).encode()]
        for n in range(50)
    ]
    others = [
        [b"data", b"d", b"task_id", b"t", b"created_at", b"1"],  # another order
        [b"task_id", b"t", b"data", b"\\u0031", b"created_at", b"1"],  # JSON reads "1"
        [b"task_id", b'a"b', b"data", b"d", b"created_at", b"nan"],
        [*TASK_FLAT, b"extra", b"\xff"],  # a field Task does not declare
    ]
    batches = [in_order, *([*in_order, other] for other in others), [*in_order, *others], []]
    for batch in batches:
        assert repr(decode_many(batch)) == repr([decode(flat) for flat in batch])
    bad = [b"task_id", b"t", b"data", b"d", b"created_at", b"soon"]
    with pytest.raises(DecodeError) as one:
        decode(bad)
    with pytest.raises(DecodeError) as many:
        decode_many([*in_order, bad, *in_order])
    assert str(many.value) == str(one.value)


def test_invalid_utf8_value_raises_decode_error_naming_the_field() -> None:
    flat = [b"task_id", b"t", b"data", b"\xff", b"created_at", b"1"]
    with pytest.raises(DecodeError) as caught:
        struct_decoder(Task)(flat)
    assert "UTF-8" in str(caught.value)
    assert "data" in str(caught.value)


def test_fields_the_struct_does_not_declare_may_hold_any_bytes() -> None:
    flat = [*TASK_FLAT, b"\xff", b"x", b"thumbnail", b"\x89PNG\r\n\x1a\n\xff"]
    assert struct_decoder(Task)(flat) == struct_decoder(Task)(TASK_FLAT)


def test_invalid_utf8_in_a_declared_field_raises_decode_error_naming_it() -> None:
    flat = [b"task_id", b"t\xff1", *TASK_FLAT[2:]]
    with pytest.raises(DecodeError) as caught:
        struct_decoder(Task)(flat)
    assert "UTF-8" in str(caught.value)
    assert "'task_id'" in str(caught.value)


class Blob(msgspec.Struct):
    name: str
    data: bytes
    more: bytearray | None = None


def test_a_bytes_field_gets_the_raw_bytes() -> None:
    raw = b"\x00\xff\x89PNG"
    assert struct_decoder(Blob)([b"name", b"b", b"data", raw]) == Blob("b", raw)
    assert struct_decoder(Blob)([b"data", raw, b"name", b"b", b"more", b"\xfe"]) == Blob(
        "b", raw, bytearray(b"\xfe")
    )


def test_a_deeply_nested_value_is_undecodable_not_a_crash() -> None:
    """10,000 levels of JSON: msgspec stops with RecursionError; that is bad input."""
    flat = [b"numbers", b"[" * 10_000 + b"]" * 10_000, b"counts", b"{}", b"point", b"{}"]
    with pytest.raises(DecodeError, match="nested too deeply"):
        struct_decoder(Nested)(flat)


def test_invalid_utf8_reaches_a_fields_handler_as_decode_error() -> None:
    async def handle(fields: dict[str, str]) -> None:
        pass

    with pytest.raises(DecodeError, match="UTF-8"):
        deliver(handle, [b"a", b"\xfe\xff"])


# -- Message ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [{"a": "1", "é": "ü"}, {b"a": b"1", "é".encode(): "ü".encode()}],
    ids=["str", "bytes"],
)
def test_message_constructor_takes_str_or_bytes_fields(fields: Any) -> None:
    message = Message("1-0", "orders", "billing", fields, consumer="w", deliveries=4)
    assert (message.id, message.stream, message.group) == ("1-0", "orders", "billing")
    assert (message.consumer, message.deliveries) == ("w", 4)
    assert message.fields == {"a": "1", "é": "ü"}
    assert message.raw == {b"a": b"1", "é".encode(): "ü".encode()}


def test_message_defaults_to_first_delivery() -> None:
    message = Message("1-0", "orders", "billing", {"a": "1"})
    assert message.deliveries == 1
    assert message.consumer == ""


def test_message_fields_raise_decode_error_on_invalid_utf8() -> None:
    message = Message("1-0", "orders", "billing", {b"a": b"\xff"})
    assert message.raw == {b"a": b"\xff"}
    with pytest.raises(DecodeError, match="UTF-8"):
        message.fields  # noqa: B018


def test_message_repr_does_not_show_field_values() -> None:
    message = Message("1-0", "orders", "billing", {"card": "4111-1111-1111-1111"})
    text = repr(message)
    assert "4111" not in text
    assert "1-0" in text
    assert "orders" in text


# -- encoding --------------------------------------------------------------------------

WHEN = datetime.datetime(2024, 5, 1, 12, 30, 15, 250000, tzinfo=datetime.UTC)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (True, "true"),
        (False, "false"),
        (42, "42"),
        (-7, "-7"),
        (0, "0"),
        (0.1, "0.1"),
        (1e-300, "1e-300"),
        ("héllo", "héllo"),
        (Color.RED, "red"),
    ],
)
def test_scalars_are_written_as_text(value: Any, text: str) -> None:
    assert encode_fields({"v": value}) == {"v": text}


def test_datetime_is_written_as_iso_text() -> None:
    written = encode_fields({"when": WHEN})["when"]
    assert isinstance(written, str)
    assert datetime.datetime.fromisoformat(written) == WHEN


def test_bytes_are_written_raw() -> None:
    assert encode_fields({"blob": b"\x00\xff raw"})["blob"] == b"\x00\xff raw"
    assert encode_fields(Blob("b", b"\x01", bytearray(b"\x02"))) == {
        "name": "b",
        "data": b"\x01",
        "more": b"\x02",
    }


def test_bytes_round_trip_through_a_struct() -> None:
    blob = Blob("b", bytes(range(256)))
    flat = [part for item in encode_fields(blob).items() for part in _bytes_pair(item)]
    assert struct_decoder(Blob)(flat) == blob


def _bytes_pair(item: tuple[str, str | bytes]) -> list[bytes]:
    name, value = item
    return [name.encode(), value if isinstance(value, bytes) else value.encode()]


def test_none_values_are_left_out() -> None:
    assert encode_fields({"a": "1", "b": None}) == {"a": "1"}
    assert encode_fields(WithDefaults("n", note=None)) == {
        "name": "n",
        "retries": "3",
        "labels": b"[]",
    }


def test_nested_values_are_written_as_json_bytes() -> None:
    fields = encode_fields(Nested([1, 2], {"a": 1}, Point(3, 4), ["t"]))
    assert all(isinstance(fields[name], bytes) for name in ("numbers", "counts", "point", "tags"))
    assert json.loads(fields["numbers"]) == [1, 2]
    assert json.loads(fields["counts"]) == {"a": 1}
    assert json.loads(fields["point"]) == {"x": 3, "y": 4}
    assert json.loads(fields["tags"]) == ["t"]


def test_struct_payload_uses_encoded_names() -> None:
    assert encode_fields(Camel("t", 2, ["a"])) == {
        "taskId": "t",
        "retryCount": "2",
        "extraTags": b'["a"]',
    }


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({}, id="empty-dict"),
        pytest.param({"a": None}, id="all-none-dict"),
        pytest.param(msgspec.defstruct("Empty", [])(), id="empty-struct"),
        pytest.param(
            msgspec.defstruct("AllNone", [("a", int | None, None)])(), id="all-none-struct"
        ),
    ],
)
def test_empty_payload_is_refused(payload: Any) -> None:
    with pytest.raises(ConfigurationError, match="none"):
        encode_fields(payload)


@pytest.mark.parametrize("payload", [["a", "1"], "a=1", 42, None, ("a", "1")], ids=repr)
def test_payload_that_is_neither_dict_nor_struct_is_refused(payload: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"msgspec\.Struct or a dict"):
        encode_fields(payload)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(TASK, id="task"),
        pytest.param(Task(str(uuid.uuid4()), "", time.time()), id="task-now"),
        pytest.param(Scalars(0.1, -(2**63), False), id="scalars-min"),
        pytest.param(Scalars(1e-300, 2**63 - 1, True), id="scalars-max"),
        pytest.param(Scalars(-0.5, -1, False), id="negative"),
        pytest.param(Nested([1, -2], {"ü": 3}, Point(-1, 0), ["日本", "x y"]), id="nested"),
        pytest.param(Nested([], {}, Point(0, 0), None), id="nested-empty"),
        pytest.param(WithDefaults("名前", 0, "note", ["a", "b"]), id="defaults"),
        pytest.param(Camel("t", 5, ["x"]), id="camel"),
        pytest.param(
            Rich(
                when=WHEN,
                color=Color.BLUE,
                blob=b"\x00\x01\xff",
                text="emoji 🎉 and \n newline",
                ratio=0.1,
                tiny=1e-300,
                delta=-42,
                flag=False,
                points=[Point(1, 2)],
                lookup={"a": [1]},
                maybe=7,
            ),
            id="rich",
        ),
    ],
)
def test_round_trip_gives_an_equal_value(payload: msgspec.Struct) -> None:
    assert round_trip(payload) == payload


INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.builds(
        Sample,
        text=st.text(),
        number=INT64,
        ratio=st.floats(allow_nan=False),
        flag=st.booleans(),
        numbers=st.lists(INT64, max_size=10),
    )
)
def test_round_trip_property(sample: Sample) -> None:
    assert round_trip(sample) == sample


class _Tagged(msgspec.Struct, tag=True):
    x: int


class _Unset(msgspec.Struct):
    a: int | msgspec.UnsetType = msgspec.UNSET
    b: str = "x"


class _Key(enum.StrEnum):
    A = "a"


class _Maybe(enum.Enum):
    NONE = None
    ONE = 1


def test_encoding_keeps_what_to_builtins_writes_where_the_fast_path_would_not() -> None:
    """A tagged Struct keeps its tag field (a reader decoding the union needs it); UNSET is
    left out as None is; an enum or str subclass names a field by its value; an enum whose
    value is None is left out."""
    assert encode_fields(_Tagged(1)) == {"type": "_Tagged", "x": "1"}
    assert msgspec.convert(encode_fields(_Tagged(1)), _Tagged, strict=False) == _Tagged(1)
    assert encode_fields(_Unset()) == {"b": "x"}
    assert encode_fields({_Key.A: "v", "n": _Maybe.NONE, "m": _Maybe.ONE}) == {"a": "v", "m": "1"}


def test_numbers_are_written_as_json_numbers() -> None:
    """msgspec's JSON digits (an exponent without "+"), repr where JSON has none."""
    assert encode_fields({"a": 1e16, "b": 0.1, "c": 2**80, "d": float("nan"), "e": -3}) == {
        "a": "1e16",
        "b": "0.1",
        "c": str(2**80),
        "d": "nan",
        "e": "-3",
    }
