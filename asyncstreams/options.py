"""Options, declared once: frozen dataclasses validated when they are created.

`ConsumerOptions` is the one declaration of what `@app.consumer(...)` takes: its keyword
arguments and their defaults (App.consumer's signature is this class's), their checks, and
the README's options table (`options_table()`; a test keeps the README in step).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import KW_ONLY, MISSING, dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from ._slots import key_slot
from .errors import ConfigurationError
from .partitions import Partitioned

DEFAULT_URL = "redis://localhost:6379/0"
DEFAULT_DEAD_LETTER = "{stream}:dead-letter"
URL_ENV = "ASYNCSTREAMS_URL"
URL_SCHEMES = ("redis", "rediss", "unix")

DEFAULT_GRACE_PERIOD = 10.0
DEFAULT_MAX_CONNECTIONS = 32


def _doc(text: str) -> Mapping[str, str]:
    return {"doc": text}


# Defaults chosen from `python -m benchmarks` runs on a 2-core machine (see README, "Tuning").
@dataclass(frozen=True, slots=True)
class ConsumerOptions:
    """How one handler consumes: which streams, as which group and consumer, how much at once,
    and what happens to entries that fail. Each field's meaning is in its `doc` metadata
    (and in the README's options table, made from it)."""

    streams: str | Partitioned | Sequence[str | Partitioned] = field(
        metadata=_doc(
            "one stream name, a `Partitioned` stream (all its partitions) or a list of them; "
            "one handler for several streams reads them in one `XREADGROUP` (on a cluster, "
            "one per hash slot)"
        )
    )
    _: KW_ONLY
    group: str = field(
        metadata=_doc(
            "the consumer group; created (with `MKSTREAM`) when missing, kept when it exists"
        )
    )
    consumer: str | None = field(
        default=None,
        metadata=_doc("the consumer name; by default unique per process: `host-pid-random`"),
    )
    concurrency: int = field(
        default=64, metadata=_doc("at most this many handlers (or batch calls) run at once")
    )
    key: str | Callable[[Any], Hashable] | None = field(
        default=None,
        metadata=_doc(
            "keeps the entries of one key in order: a field name of the entry (its value is "
            "the key), or a callable on what the handler takes (its Struct, else the fields "
            "as `dict[str, str]`, else the `Message`); entries with the same key run one at "
            "a time in id order, different keys at once (see [Ordering](#ordering)). "
            "`None`: no order is kept"
        ),
    )
    ordered: bool = field(
        default=False,
        metadata=_doc(
            "with a `Partitioned` stream and `key=`: each partition has one owner at a time "
            "among the group's live consumers, so a key's entries run in order across "
            "processes too (see [Ordering](#ordering))"
        ),
    )
    lease_ms: int = field(
        default=10_000,
        metadata=_doc(
            "with `ordered=True`: how long a partition's owner keeps it without renewing "
            "(it renews every quarter of it); a crashed owner's partitions move after this"
        ),
    )
    batch_size: int = field(
        default=500,
        metadata=_doc(
            "the most entries one `XREADGROUP` brings in (its `COUNT` is this divided among "
            "the streams, so at least one per stream) and one batch handler call gets; a "
            "pipeline's handler of one entry per call reads at most a third of the bound "
            "(`concurrency + batch_size`; one entry per stream at least), so that a read, "
            "the handlers and the commits overlap (see [Pipelines](#pipelines))"
        ),
    )
    block_ms: int = field(
        default=2_000, metadata=_doc("how long a read waits for new entries (`BLOCK`)")
    )
    start_id: str = field(
        default="0",
        metadata=_doc(
            'where a *new* group starts: `"0"` the whole stream (nothing written before the '
            'first deploy is skipped), `"$"` only what is added from now on'
        ),
    )
    max_deliveries: int | None = field(
        default=5,
        metadata=_doc(
            "how many times Redis may deliver an entry (its own delivery counter, so across "
            "processes and restarts) before it is dead-lettered; `None`: no limit"
        ),
    )
    retry_delay: float = field(
        default=1.0,
        metadata=_doc(
            "seconds before an entry whose handler raised runs again: "
            "`retry_delay * 2**(deliveries - 1)`, capped by `retry_max_delay`, with jitter "
            "(between half and all of it)"
        ),
    )
    retry_max_delay: float = field(default=30.0, metadata=_doc("the cap of that delay, in seconds"))
    pause_after_failures: int | None = field(
        default=10,
        metadata=_doc(
            "after this many handler runs in a row fail, the consumer pauses: it reads "
            "nothing new and retries one entry at a time until a run succeeds (see "
            "[Outages](#outages)); `None`: never pause"
        ),
    )
    dead_letter: str | None = field(
        default=DEFAULT_DEAD_LETTER,
        metadata=_doc(
            "the dead-letter stream; `{stream}` is replaced by the entry's stream (on a "
            "cluster, the default is `{<stream>}:dead-letter` where that keeps it in the "
            "stream's hash slot). `None`: "
            "none (an entry out of deliveries, or undecodable, then stays pending, is logged "
            "and is not run again)"
        ),
    )
    claim_idle_ms: int = field(
        default=60_000,
        metadata=_doc(
            "entries other consumers of the group left pending this long are claimed (their "
            "consumer crashed or hangs)"
        ),
    )
    max_payload_bytes: int | None = field(
        default=1 << 20,
        metadata=_doc(
            "entries larger than this (names and values together) are dead-lettered unread; "
            "`None`: no limit"
        ),
    )
    max_memory_bytes: int = field(
        default=32 << 20,
        metadata=_doc(
            "the most bytes of entries (names and values) read and not yet handled that the "
            "consumer keeps in memory; reading waits while they take more (an entry larger "
            "than this is still read, on its own)"
        ),
    )
    delete_idle_consumers_after: float | None = field(
        default=3600.0,
        metadata=_doc(
            "seconds; consumers of the group idle this long *with nothing pending* are "
            "deleted, so unique names do not pile up; `None`: never"
        ),
    )
    trim_acked_every: float | None = field(
        default=None,
        metadata=_doc(
            "seconds; this often, one process among those consuming the stream (a Redis "
            "lock per stream) removes the entries every group has read and acked, as "
            "`App.trim` does; `None`: never (the stream grows unless producers trim it)"
        ),
    )

    output: str | Partitioned | None = field(
        default=None,
        metadata=_doc(
            "where the handler's return value is published (a payload, a list of them, or "
            "`None` for nothing): a stream name (`{stream}` is replaced by the entry's "
            "stream) or a `Partitioned` stream; committed with the entry's ack in one step "
            "(see [Pipelines](#pipelines)). `None`: the return value is ignored"
        ),
    )
    output_key: str | Callable[[Any], Hashable] | None = field(
        default=None,
        metadata=_doc(
            "for a `Partitioned` output: a field name of the returned payload, or a callable "
            "on it, whose value picks the partition; `None`: the input's partition number "
            "(from a `Partitioned` input of as many partitions), else one picked by the "
            "input entry's id"
        ),
    )

    def __post_init__(self) -> None:
        owner = "consumer"
        given = self.streams
        items = (given,) if isinstance(given, (str, Partitioned)) else tuple(given)
        object.__setattr__(self, "streams", items)
        names = self.names
        if not names:
            raise ConfigurationError(f"{owner}: expected at least one stream name, got none")
        for stream in names:
            _name(owner, "a stream name", stream)
        if len(set(names)) != len(names):
            raise ConfigurationError(f"{owner}: stream names repeat in {list(names)!r}")
        _name(owner, "group", self.group)
        if self.consumer is not None:
            _name(owner, "consumer", self.consumer)
        _positive_int(owner, "concurrency", self.concurrency)
        if self.key is not None and not callable(self.key):
            _name(owner, "key (a field name, or a callable on the payload)", self.key)
        _positive_int(owner, "batch_size", self.batch_size)
        if self.batch_size < len(names):
            raise ConfigurationError(
                f"{owner}: batch_size ({self.batch_size}) must be at least the number of "
                f"streams ({len(names)}): XREADGROUP's COUNT applies to each stream, and "
                "COUNT 0 would read without any limit"
            )
        _positive_int(owner, "block_ms", self.block_ms)
        _name(owner, "start_id", self.start_id)
        if self.start_id == ">":
            raise ConfigurationError(
                f'{owner}: start_id must be "0", "$" or an entry id, got ">" '
                '(">" is what XREADGROUP reads with, not where a group starts)'
            )
        if self.max_deliveries is not None:
            _positive_int(owner, "max_deliveries", self.max_deliveries)
        _non_negative_number(owner, "retry_delay", self.retry_delay)
        _non_negative_number(owner, "retry_max_delay", self.retry_max_delay)
        if self.retry_max_delay < self.retry_delay:
            raise ConfigurationError(
                f"{owner}: retry_max_delay ({self.retry_max_delay!r}) must be at least "
                f"retry_delay ({self.retry_delay!r})"
            )
        if self.pause_after_failures is not None:
            _positive_int(owner, "pause_after_failures", self.pause_after_failures)
        if self.dead_letter is not None:
            _name(owner, "dead_letter", self.dead_letter)
            for stream in names:
                if self.dead_letter_stream(stream) in names:
                    raise ConfigurationError(
                        f"{owner}: dead_letter {self.dead_letter!r} names a stream this "
                        f"consumer reads ({stream!r}); expected another stream"
                    )
        self._check_output(owner, names)
        self._check_ordered(owner)
        _positive_int(owner, "claim_idle_ms", self.claim_idle_ms)
        if self.max_payload_bytes is not None:
            _positive_int(owner, "max_payload_bytes", self.max_payload_bytes)
        _positive_int(owner, "max_memory_bytes", self.max_memory_bytes)
        if self.trim_acked_every is not None:
            _positive_number(owner, "trim_acked_every", self.trim_acked_every)
        if self.delete_idle_consumers_after is not None:
            _non_negative_number(
                owner, "delete_idle_consumers_after", self.delete_idle_consumers_after
            )

    def _check_ordered(self, owner: str) -> None:
        if not isinstance(self.ordered, bool):
            raise ConfigurationError(
                f"{owner}: ordered must be True or False, got {self.ordered!r}"
            )
        _positive_int(owner, "lease_ms", self.lease_ms)
        if not self.ordered:
            return
        items: tuple[str | Partitioned, ...] = self.streams  # type: ignore[assignment]  # a tuple since __post_init__
        if len(items) != 1 or not isinstance(items[0], Partitioned):
            raise ConfigurationError(
                f"{owner}: ordered=True gives each partition of a Partitioned stream one owner "
                f"at a time; expected one Partitioned stream, got {self.label!r}"
            )
        if self.key is None:
            raise ConfigurationError(
                f"{owner}: ordered=True keeps the entries of each key in order across "
                "processes; expected key= (a field name or a callable) beside it, found none"
            )
        if self.lease_ms < 300:
            raise ConfigurationError(
                f"{owner}: lease_ms must be at least 300 (it is renewed every quarter of it), "
                f"got {self.lease_ms}"
            )
        if self.block_ms * 4 > self.lease_ms:
            raise ConfigurationError(
                f"{owner}: with ordered=True, block_ms must be at most a quarter of lease_ms "
                f"(a read must end before the lease can move), got block_ms={self.block_ms} "
                f"and lease_ms={self.lease_ms}"
            )

    @property
    def partitioned(self) -> Partitioned | None:
        """The one `Partitioned` stream read, with `ordered=True`; else None."""
        if not self.ordered:
            return None
        items: tuple[Partitioned, ...] = self.streams  # type: ignore[assignment]  # checked
        return items[0]

    def _check_output(self, owner: str, names: tuple[str, ...]) -> None:
        output = self.output
        if output is None:
            if self.output_key is not None:
                raise ConfigurationError(
                    f"{owner}: output_key picks the partition of a Partitioned output; "
                    "expected output=Partitioned(...) beside it, found no output"
                )
            return
        if not isinstance(output, (str, Partitioned)) or not output:
            raise ConfigurationError(
                f"{owner}: output must be a non-empty stream name or a Partitioned stream, "
                f"got {output!r}"
            )
        if isinstance(output, str):
            if self.output_key is not None:
                raise ConfigurationError(
                    f"{owner}: output_key picks the partition of a Partitioned output; "
                    f"expected output=Partitioned(...), found the stream {output!r}"
                )
            outputs = [output.replace("{stream}", stream) for stream in names]
        else:
            outputs = list(output.streams)
            if self.output_key is not None and not callable(self.output_key):
                _name(owner, "output_key (a field name, or a callable)", self.output_key)
        looped = sorted(set(outputs) & set(names))
        if looped:
            raise ConfigurationError(
                f"{owner}: output {output!r} names a stream this consumer reads "
                f"({looped[0]!r}); expected another stream"
            )

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the streams read: `streams`, with every partition of a `Partitioned`."""
        items: tuple[str | Partitioned, ...] = self.streams  # type: ignore[assignment]  # a tuple since __post_init__
        return tuple(
            name
            for item in items
            for name in (item.streams if isinstance(item, Partitioned) else (item,))
        )

    @property
    def label(self) -> str:
        """The streams read, for logs: a `Partitioned` as `name[partitions]`."""
        items: tuple[str | Partitioned, ...] = self.streams  # type: ignore[assignment]  # a tuple since __post_init__
        return ",".join(item.label if isinstance(item, Partitioned) else item for item in items)

    @property
    def limit(self) -> int:
        """The most entries the consumer holds at once: `concurrency + batch_size`."""
        return self.concurrency + self.batch_size

    def dead_letter_stream(self, stream: str, *, cluster: bool = False) -> str | None:
        """The dead-letter stream for entries of `stream`, or None without one.

        On a cluster, the default name is kept in the stream's hash slot, so that the move
        to it is one script: `{orders}:dead-letter` where `orders:dead-letter` would land
        elsewhere (a stream name with a hash tag, `{orders:3}`, keeps it as it is)."""
        if self.dead_letter is None:
            return None
        name = self.dead_letter.replace("{stream}", stream)
        if (
            cluster
            and self.dead_letter == DEFAULT_DEAD_LETTER
            and key_slot(name) != key_slot(stream)
        ):
            return f"{{{stream}}}:dead-letter"
        return name

    @classmethod
    def create(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ConsumerOptions:
        """`ConsumerOptions(*args, **kwargs)`, with a ConfigurationError naming a misspelled,
        missing or extra argument where Python would raise a bare TypeError."""
        known = [f.name for f in fields(cls) if f.name != "_"]
        unknown = [name for name in kwargs if name not in known]
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigurationError(
                f"consumer: unknown option {unknown[0]!r}{hint}; expected one of "
                f"{', '.join(known[1:])}"
            )
        if len(args) > 1:
            raise ConfigurationError(
                f"consumer: expected the streams as the one positional argument and every "
                f"option by name, found {len(args)} positional arguments"
            )
        given = {**dict(zip(known, args, strict=False)), **kwargs}
        for f in fields(cls):
            if f.name != "_" and f.default is MISSING and f.name not in given:
                raise ConfigurationError(f"consumer: expected {f.name}=..., {_first_line(f)}")
        return cls(*args, **kwargs)


def _first_line(f: Any) -> str:
    return str(f.metadata["doc"]).split(";")[0]


def options_table() -> str:
    """The README's table of consumer options, made from `ConsumerOptions`."""
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for f in fields(ConsumerOptions):
        if f.name == "_":
            continue
        default = "required" if f.default is MISSING else f"`{_python(f.default)}`"
        rows.append(f"| `{f.name}` | {default} | {f.metadata['doc']} |")
    return "\n".join(rows) + "\n"


def _python(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
        if value % (1 << 20) == 0:
            return f"{value >> 20} << 20"
        return f"{value:_}"
    return repr(value).replace("'", '"')


def _positive_int(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{owner}: {name} must be a positive integer, got {value!r}")


def _non_negative_number(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigurationError(f"{owner}: {name} must be a number >= 0, got {value!r}")


def _positive_number(owner: str, name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value < float("inf")
    ):
        raise ConfigurationError(f"{owner}: {name} must be a number > 0, got {value!r}")


def _name(owner: str, what: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{owner}: {what} must be a non-empty string, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class AppOptions:
    """Process-wide settings of an App.

    `max_connections` is the shared part of the connection pool (publish, group set-up,
    handlers' own commands); each consumer keeps two more of its own, for its blocking reads
    and for its acks (on a cluster: one pool per master, each as large; a consumer keeps
    one connection per hash slot it reads, and its acks use the pools).
    """

    url: str | None = None
    grace_period: float = DEFAULT_GRACE_PERIOD
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    cluster: bool | None = None

    def __post_init__(self) -> None:
        if self.url is not None:
            check_url(self.url)
        if self.cluster not in (None, True, False):
            raise ConfigurationError(
                f"App: cluster must be None (find out), True or False, got {self.cluster!r}"
            )
        _non_negative_number("App", "grace_period", self.grace_period)
        _positive_int("App", "max_connections", self.max_connections)


def check_url(url: object) -> str:
    """Return `url` if its scheme is one Redis speaks, else raise ConfigurationError."""
    if not isinstance(url, str) or not url:
        raise ConfigurationError(f"Redis URL must be a non-empty string, got {url!r}")
    scheme, separator, _ = url.partition("://")
    if not separator or scheme not in URL_SCHEMES:
        raise ConfigurationError(
            f"Redis URL must start with one of {', '.join(s + '://' for s in URL_SCHEMES)}; "
            f"got {scheme + '://' if separator else 'no scheme'} in {mask_url(url)}"
        )
    try:
        urlsplit(url).port  # noqa: B018 - parses the host and port, raising if malformed
    except ValueError as exc:
        raise ConfigurationError(f"Redis URL {mask_url(url)} is malformed: {exc}") from None
    return url


def resolve_url(cli_url: str | None, app_url: str | None) -> str:
    """The URL in effect: the CLI's --url, App(url), $ASYNCSTREAMS_URL, or the default."""
    for candidate in (cli_url, app_url, os.environ.get(URL_ENV) or None):
        if candidate is not None:
            return check_url(candidate)
    return DEFAULT_URL


def mask_url(url: str) -> str:
    """`url` with any password replaced by `***`, for logs and errors.

    Works on the text rather than a parse, so a malformed URL is masked too: whatever
    stands between the first `:` of the user info and its last `@` is the password, and so
    is the value of a `password=` query parameter.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    userinfo, at, rest = rest.rpartition("@")
    if at:
        userinfo = f"{userinfo.split(':', 1)[0]}:***@" if ":" in userinfo else userinfo + at
    rest, question, query = rest.partition("?")
    if question:
        query = "&".join(
            "password=***" if item.startswith("password=") else item for item in query.split("&")
        )
    return f"{scheme}{separator}{userinfo}{rest}{question}{query}"
