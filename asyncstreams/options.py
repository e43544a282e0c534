"""Options, declared once: frozen keyword-only dataclasses validated when they are created."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import ConfigurationError

DEFAULT_URL = "redis://localhost:6379/0"
URL_ENV = "ASYNCSTREAMS_URL"
URL_SCHEMES = ("redis", "rediss", "unix")

# Defaults, chosen from `python -m benchmarks` runs on a 2-core machine (see README, "Tuning").
DEFAULT_CONCURRENCY = 64
DEFAULT_BATCH_SIZE = 500
DEFAULT_BLOCK_MS = 2_000
DEFAULT_START_ID = "0"
DEFAULT_GRACE_PERIOD = 10.0
DEFAULT_MAX_CONNECTIONS = 32
# Delivery guarantees (see README, "Delivery guarantees").
DEFAULT_MAX_DELIVERIES = 5
DEFAULT_RETRY_DELAY = 1.0
DEFAULT_RETRY_MAX_DELAY = 30.0
DEFAULT_DEAD_LETTER = "{stream}:dead-letter"
DEFAULT_CLAIM_IDLE_MS = 60_000
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 20
DEFAULT_DELETE_IDLE_CONSUMERS_AFTER = 3600.0


def _positive_int(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{owner}: {name} must be a positive integer, got {value!r}")


def _non_negative_number(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigurationError(f"{owner}: {name} must be a number >= 0, got {value!r}")


def _name(owner: str, what: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{owner}: {what} must be a non-empty string, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ConsumerOptions:
    """How one handler consumes: which streams, as which group and consumer, how much at once,
    and what happens to entries that fail.

    `concurrency` bounds the handlers running at once; `batch_size` is the most entries one
    XREADGROUP asks for. Entries delivered to the consumer and not yet acked never number more
    than `concurrency + batch_size`. `start_id` is only where a new group starts reading;
    entries are always read with `>`.

    An entry whose handler raises stays pending and runs again after `retry_delay` seconds,
    doubling up to `retry_max_delay` (with jitter), until Redis has delivered it
    `max_deliveries` times (None: no limit); then it moves to the `dead_letter` stream
    (`{stream}` is replaced by the stream's name; None: no dead-letter stream, the entry is
    left pending). Entries that cannot be decoded or are larger than `max_payload_bytes` move
    there at once. Entries other consumers of the group left idle for `claim_idle_ms` are
    claimed; consumers idle for `delete_idle_consumers_after` seconds with nothing pending
    are deleted from the group (None: never).
    """

    streams: tuple[str, ...]
    group: str
    consumer: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    batch_size: int = DEFAULT_BATCH_SIZE
    block_ms: int = DEFAULT_BLOCK_MS
    start_id: str = DEFAULT_START_ID
    max_deliveries: int | None = DEFAULT_MAX_DELIVERIES
    retry_delay: float = DEFAULT_RETRY_DELAY
    retry_max_delay: float = DEFAULT_RETRY_MAX_DELAY
    dead_letter: str | None = DEFAULT_DEAD_LETTER
    claim_idle_ms: int = DEFAULT_CLAIM_IDLE_MS
    max_payload_bytes: int | None = DEFAULT_MAX_PAYLOAD_BYTES
    delete_idle_consumers_after: float | None = DEFAULT_DELETE_IDLE_CONSUMERS_AFTER

    def __post_init__(self) -> None:
        owner = "consumer"
        if not self.streams:
            raise ConfigurationError(f"{owner}: expected at least one stream name, got none")
        for stream in self.streams:
            _name(owner, "a stream name", stream)
        if len(set(self.streams)) != len(self.streams):
            raise ConfigurationError(f"{owner}: stream names repeat in {list(self.streams)!r}")
        _name(owner, "group", self.group)
        if self.consumer is not None:
            _name(owner, "consumer", self.consumer)
        _positive_int(owner, "concurrency", self.concurrency)
        _positive_int(owner, "batch_size", self.batch_size)
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
        if self.dead_letter is not None:
            _name(owner, "dead_letter", self.dead_letter)
            for stream in self.streams:
                if self.dead_letter_stream(stream) in self.streams:
                    raise ConfigurationError(
                        f"{owner}: dead_letter {self.dead_letter!r} names a stream this "
                        f"consumer reads ({stream!r}); expected another stream"
                    )
        _positive_int(owner, "claim_idle_ms", self.claim_idle_ms)
        if self.max_payload_bytes is not None:
            _positive_int(owner, "max_payload_bytes", self.max_payload_bytes)
        if self.delete_idle_consumers_after is not None:
            _non_negative_number(
                owner, "delete_idle_consumers_after", self.delete_idle_consumers_after
            )
        if self.concurrency + self.batch_size < len(self.streams):
            raise ConfigurationError(
                f"{owner}: concurrency + batch_size ({self.concurrency + self.batch_size}) "
                f"must be at least the number of streams ({len(self.streams)})"
            )

    def dead_letter_stream(self, stream: str) -> str | None:
        """The dead-letter stream for entries of `stream`, or None without one."""
        if self.dead_letter is None:
            return None
        return self.dead_letter.replace("{stream}", stream)


@dataclass(frozen=True, kw_only=True, slots=True)
class AppOptions:
    """Process-wide settings of an App.

    `max_connections` is the shared part of the connection pool (publish, group set-up,
    handlers' own commands); each consumer keeps two more of its own, for its blocking reads
    and for its acks.
    """

    url: str | None = None
    grace_period: float = DEFAULT_GRACE_PERIOD
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __post_init__(self) -> None:
        if self.url is not None:
            check_url(self.url)
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
