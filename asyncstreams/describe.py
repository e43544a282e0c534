"""`asyncstreams describe module:app`: what an app consumes, from its registrations alone
(nothing connects to Redis), as JSON or as an AsyncAPI 3.0.0 document.

The JSON shape (`--format json`, the default) is stable: `"describe"` is its version, raised
only when a key is removed or changes meaning (new keys may appear without it).

- `describe`: 1; `asyncstreams`: the version that wrote it; `app`: the target described.
- `server`: from `--url`, else null: `host` (with the port), `pathname` (`/db`, or null),
  `tls` (a `rediss://` URL), `unix` (a Unix socket: its path is the pathname). Never a
  user name or password.
- `consumers`: one object per handler, in registration order:
  - `handler` (its qualified name), `group`, `batch` (it takes lists of entries),
    `message` (it takes the `Message` envelope), `outbox` (it takes an `Outbox`);
  - `streams`: one object per item of `streams=`: `name`, `partitions` (the count for a
    `Partitioned` stream, else null) and `streams` (the streams read: the partitions' names,
    or the name itself);
  - `payload`: `kind` is `struct` (a `msgspec.Struct`: `type` is its name), `fields`
    (`dict[str, str]`) or `any` (only `Message`: any fields); `schema` is a JSON Schema
    (msgspec's, draft 2020-12) of what one entry's fields decode to;
  - `options`: every other `ConsumerOptions` field with its value in effect (`consumer`
    null: a name unique per process; a `key` or `output_key` callable: its qualified name;
    a `Partitioned` `output`: an object like those of `streams`, its name with the suffix
    `derive` gave it);
  - `dead_letters`: per stream read, `dead_letter` (its dead-letter stream, or null when
    `dead_letter=None`) and `dead_letter_on_cluster` (the name on a Redis Cluster, where the
    default `{stream}:dead-letter` becomes `{<stream>}:dead-letter` if that keeps it in the
    stream's hash slot).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec

from . import __version__
from ._arguments import url
from .app import App, Registration
from .codec import Arg, HandlerPlan
from .errors import AsyncstreamsError
from .options import ConsumerOptions
from .partitions import Partitioned

SHAPE_VERSION = 1
FORMATS = ("json", "asyncapi")
ASYNCAPI_VERSION = "3.0.0"

# A stream entry is a flat map of text (or binary) values, not a JSON document: say so once.
ENTRY_NOTE = (
    "One stream entry: a flat map of field names to values. The payload schema is msgspec's "
    "JSON Schema of what the handler decodes the fields to; in the entry itself numbers, "
    "booleans and dates are text, nested values are JSON text and bytes are stored as they are."
)
FIELDS_SCHEMA: dict[str, Any] = {
    "title": "Fields",
    "description": "the entry's fields, every value as text (dict[str, str])",
    "type": "object",
    "additionalProperties": {"type": "string"},
}
DEAD_LETTER_NOTE = (
    "An entry moved to a dead-letter stream: the original entry's fields and the `!dlq:` "
    "metadata (see the README's dead-letter stream)."
)
ANY_SCHEMA: dict[str, Any] = {
    "title": "AnyFields",
    "description": "any fields (the handler takes only the Message envelope)",
    "type": "object",
}
_DLQ_FIELDS = ("stream", "id", "group", "consumer", "reason", "error", "message")
DEAD_LETTER_SCHEMA: dict[str, Any] = {
    "title": "DeadLetter",
    "description": (
        "the original entry's fields (a name that starts with `!` gets one more) and the "
        "`!dlq:` metadata: where it came from, why (`failed`, `undecodable`, `too-large`), "
        "deliveries and time (ms since the epoch) as text"
    ),
    "type": "object",
    "properties": {
        **{f"!dlq:{name}": {"type": "string"} for name in _DLQ_FIELDS},
        **{
            f"!dlq:{name}": {"type": "string", "pattern": "^[0-9]+$"}
            for name in ("deliveries", "time")
        },
    },
    "required": [f"!dlq:{name}" for name in (*_DLQ_FIELDS, "deliveries", "time")],
}
_SCHEMAS = "#/components/schemas/"
# What `asyncstreams` itself names in components; a Struct's name never has a dot unless
# msgspec qualifies two same-named Structs by module.
FIELDS_ID = "asyncstreams.Fields"
ANY_ID = "asyncstreams.AnyFields"
DEAD_LETTER_ID = "asyncstreams.DeadLetter"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `describe` on the CLI's subcommands."""
    parser = commands.add_parser(
        "describe",
        help="describe an app's consumers, payload schemas and dead-letter streams "
        "(JSON or AsyncAPI 3.0.0); connects to nothing",
    )
    parser.add_argument("target", help='where the App is, as "module:attribute" (e.g. tasks:app)')
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="json",
        help="json (default: asyncstreams' own stable shape) or asyncapi (an AsyncAPI 3.0.0 "
        "document)",
    )
    parser.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")
    parser.add_argument(
        "--url",
        type=url,
        help="the Redis URL to name as the server (host, port and database; never a "
        "password); nothing connects to it",
    )


def command(args: argparse.Namespace, load: Callable[[str], App]) -> int:
    """`asyncstreams describe`: exit 0, 2 for a bad target or configuration (as `run`), 1
    when the output cannot be written."""
    try:
        app = load(args.target)
    except AsyncstreamsError as exc:  # the target or the app's configuration: nothing else
        print(f"asyncstreams: error: {exc}", file=sys.stderr)
        return 2
    build = asyncapi if args.format == "asyncapi" else describe
    text = json.dumps(build(app, args.target, url=args.url), indent=2, ensure_ascii=False)
    if args.output is None:
        print(text)
        return 0
    try:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(text + "\n")
    except OSError as exc:
        print(f"asyncstreams: error: cannot write {args.output}: {exc}", file=sys.stderr)
        return 1
    return 0


# -- the JSON shape ------------------------------------------------------------------------


def describe(app: App, target: str, *, url: str | None = None) -> dict[str, Any]:
    """The app as the stable JSON shape of the module's docstring."""
    return {
        "describe": SHAPE_VERSION,
        "asyncstreams": __version__,
        "app": target,
        "server": None if url is None else server(url),
        "consumers": [_consumer(registration) for registration in app.registrations],
    }


def _consumer(registration: Registration) -> dict[str, Any]:
    plan, options = registration.plan, registration.options
    return {
        "handler": plan.name,
        "group": options.group,
        "batch": plan.batch,
        "message": Arg.MESSAGE in plan.args,
        "outbox": plan.outbox,
        "streams": [_stream_item(item) for item in _items(options)],
        "payload": {
            "kind": _kind(plan),
            "type": plan.payload_type.__name__ if plan.payload_type else None,
            "schema": _payload_schema(plan),
        },
        "options": option_values(options),
        "dead_letters": [
            {
                "stream": name,
                "dead_letter": options.dead_letter_stream(name),
                "dead_letter_on_cluster": options.dead_letter_stream(name, cluster=True),
            }
            for name in options.names
        ],
    }


def option_values(options: ConsumerOptions) -> dict[str, Any]:
    """Every option but the streams and the group, with its value in effect (a `key`
    callable as its name)."""
    values = {
        f.name: getattr(options, f.name)
        for f in fields(ConsumerOptions)
        if f.name not in ("_", "streams", "group")
    }
    for name in ("key", "output_key"):
        if callable(values[name]):
            values[name] = getattr(values[name], "__qualname__", None) or repr(values[name])
    if isinstance(options.output, Partitioned):
        values["output"] = _stream_item(options.output)
    return values


def _stream_item(item: str | Partitioned) -> dict[str, Any]:
    return {
        "name": item.name + item.suffix if isinstance(item, Partitioned) else item,
        "partitions": item.partitions if isinstance(item, Partitioned) else None,
        "streams": list(_names(item)),
    }


def _items(options: ConsumerOptions) -> tuple[str | Partitioned, ...]:
    return options.streams  # type: ignore[return-value]  # a tuple since __post_init__


def _names(item: str | Partitioned) -> tuple[str, ...]:
    return item.streams if isinstance(item, Partitioned) else (item,)


def _kind(plan: HandlerPlan) -> str:
    if plan.payload_type is not None:
        return "struct"
    return "fields" if Arg.FIELDS in plan.args else "any"


def _payload_schema(plan: HandlerPlan) -> dict[str, Any]:
    if plan.payload_type is not None:
        return msgspec.json.schema(plan.payload_type)
    return dict(FIELDS_SCHEMA if Arg.FIELDS in plan.args else ANY_SCHEMA)


def server(url: str) -> dict[str, Any]:
    """Where `url` points, without its user name, password or other query parameters."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return {"host": "localhost", "pathname": parts.path, "tls": False, "unix": True}
    host = parts.hostname or "localhost"
    if ":" in host:  # IPv6
        host = f"[{host}]"
    db = parts.path.strip("/") or parse_qs(parts.query).get("db", [""])[0]
    return {
        "host": f"{host}:{parts.port or 6379}",
        "pathname": f"/{db}" if db else None,
        "tls": parts.scheme == "rediss",
        "unix": False,
    }


# -- AsyncAPI 3.0.0 ------------------------------------------------------------------------


class _Ids:
    """Keys for channels and operations: letters, digits, `_`, `.` and `-`, each used once."""

    def __init__(self) -> None:
        self._taken: set[str] = set()

    def new(self, text: str) -> str:
        base = re.sub(r"[^\w.-]+", "_", text, flags=re.ASCII).strip("_") or "x"
        key, n = base, 1
        while key in self._taken:
            n += 1
            key = f"{base}-{n}"
        self._taken.add(key)
        return key


def asyncapi(app: App, target: str, *, url: str | None = None) -> dict[str, Any]:
    """The app as an AsyncAPI 3.0.0 document: a channel per stream (a `Partitioned` stream
    is one channel whose address takes each partition's name) and per dead-letter stream,
    a `receive` operation per consumer and stream, a `send` operation per consumer and
    dead-letter stream, and each handler's payload schema as a message."""
    module = sys.modules.get(target.partition(":")[0])
    version = getattr(module, "__version__", None)
    document: dict[str, Any] = {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": target.partition(":")[0],
            "version": version if isinstance(version, str) else "0.0.0",
            "description": f"The Redis Streams consumers of `{target}`, as asyncstreams "
            "describes them: a channel per stream and per dead-letter stream, the group of "
            "each operation in `x-asyncstreams-group`.",
            "x-asyncstreams-version": __version__,
        },
    }
    if url is not None:
        where = server(url)
        entry: dict[str, Any] = {"host": where["host"], "protocol": "redis"}
        if where["pathname"]:
            entry["pathname"] = where["pathname"]
        if where["tls"] or where["unix"]:
            entry["description"] = "over TLS (rediss://)" if where["tls"] else "a Unix socket"
        document["servers"] = {"redis": entry}
    builder = _Builder(app.registrations)
    document["channels"] = builder.channels
    document["operations"] = builder.operations
    document["components"] = {"schemas": builder.schemas, "messages": builder.messages}
    return document


class _Builder:
    """Channels, operations, schemas and messages, each made once and referred to after."""

    def __init__(self, registrations: tuple[Registration, ...]) -> None:
        self.channels: dict[str, Any] = {}
        self.operations: dict[str, Any] = {}
        self.messages: dict[str, Any] = {}
        self._channel_ids = _Ids()
        self._operation_ids = _Ids()
        self._channel_of: dict[tuple[str, ...], str] = {}
        types = list(dict.fromkeys(r.plan.payload_type for r in registrations))
        structs = [t for t in types if t is not None]
        refs, self.schemas = msgspec.json.schema_components(
            structs, ref_template=_SCHEMAS + "{name}"
        )
        self._schema_of: dict[type[msgspec.Struct], str] = {
            t: r["$ref"].removeprefix(_SCHEMAS) for t, r in zip(structs, refs, strict=True)
        }
        for registration in registrations:
            self._add(registration.plan, registration.options)

    def _add(self, plan: HandlerPlan, options: ConsumerOptions) -> None:
        message = self._message(plan)
        by = {"x-asyncstreams-group": options.group, "x-asyncstreams-handler": plan.name}
        for item in _items(options):
            names = _names(item)
            if isinstance(item, Partitioned):
                title = item.name + item.suffix
                about = f"the {item.partitions} partitions of the Partitioned stream {title}"
                channel = self._channel(title, names, about)
                self.channels[channel]["x-asyncstreams-partitioned"] = {
                    "name": item.name,
                    "partitions": item.partitions,
                    **({"suffix": item.suffix} if item.suffix else {}),
                }
            else:
                title = item
                channel = self._channel(title, names, f"the stream {title}")
            batch = f", in batches of up to {options.batch_size}" if plan.batch else ""
            self._operation(
                plan.name,
                "receive",
                channel,
                message,
                {
                    "summary": f"{plan.name} reads {title} as group {options.group}{batch}",
                    **by,
                    "x-asyncstreams-batch": plan.batch,
                    "x-asyncstreams-options": option_values(options),
                },
            )
            dead = list(dict.fromkeys(filter(None, map(options.dead_letter_stream, names))))
            if not dead:
                continue
            if len(dead) == 1:
                channel = self._channel(dead[0], tuple(dead), "a dead-letter stream")
            else:
                about = f"dead-letter streams, one per partition of {title}"
                channel = self._channel(f"{title}:dead-letter", tuple(dead), about)
            cluster = [options.dead_letter_stream(n, cluster=True) for n in names]
            if cluster != [options.dead_letter_stream(n) for n in names]:
                self.channels[channel]["description"] = (
                    f"On a Redis Cluster: {', '.join(dict.fromkeys(map(str, cluster)))} "
                    "(the default name, kept in its stream's hash slot)."
                )
            self._operation(
                plan.name,
                "send",
                channel,
                self._dead_letter_message(),
                {
                    "summary": f"{plan.name} moves entries of {title} it cannot handle here",
                    **by,
                },
            )

    def _operation(
        self, handler: str, action: str, channel: str, message: str, more: dict[str, Any]
    ) -> None:
        self.operations[self._operation_ids.new(f"{handler}.{channel}")] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
            **more,
        }
        self.channels[channel]["messages"][message] = {"$ref": f"#/components/messages/{message}"}

    def _channel(self, title: str, names: tuple[str, ...], about: str) -> str:
        """The channel of the streams `names` (made once). Its address is the stream's
        name; several names, or one with braces (which AsyncAPI reads as an expression),
        are the parameter `stream`, one of those names."""
        found = self._channel_of.get(names)
        if found is not None:
            return found
        key = self._channel_of[names] = self._channel_ids.new(title)
        channel: dict[str, Any] = {"title": title, "summary": about}
        if len(names) == 1 and not set("{}") & set(names[0]):
            channel["address"] = names[0]
        else:
            channel["address"] = "{stream}"
            channel["parameters"] = {"stream": {"enum": list(names), "description": about}}
        channel["messages"] = {}
        self.channels[key] = channel
        return key

    def _message(self, plan: HandlerPlan) -> str:
        if plan.payload_type is not None:
            key, title = self._schema_of[plan.payload_type], plan.payload_type.__name__
        elif Arg.FIELDS in plan.args:
            key, title = FIELDS_ID, "fields"
            self.schemas.setdefault(key, FIELDS_SCHEMA)
        else:
            key, title = ANY_ID, "any fields"
            self.schemas.setdefault(key, ANY_SCHEMA)
        self.messages.setdefault(key, _message_object(key, title, ENTRY_NOTE))
        return key

    def _dead_letter_message(self) -> str:
        key = DEAD_LETTER_ID
        self.schemas.setdefault(key, DEAD_LETTER_SCHEMA)
        self.messages.setdefault(key, _message_object(key, "dead letter", DEAD_LETTER_NOTE))
        return key


def _message_object(key: str, title: str, description: str) -> dict[str, Any]:
    return {
        "name": key,
        "title": title,
        "description": description,
        "payload": {"$ref": _SCHEMAS + key},
    }
