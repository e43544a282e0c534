"""`App`: the registry of consumers, their lifespan, `publish`, and `async with` embedding."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from itertools import chain
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import anyio
import anyio.abc
import msgspec

from . import _commands, _moves, _transport, _trim, deadletter
from ._nodes import Nodes, discover
from ._tasks import first_failure
from .codec import HandlerPlan, encode_fields, encode_flat, plan_handler
from .consumer import Consumer
from .errors import ConfigurationError
from .middleware import Middleware, check_middleware
from .options import (
    DEFAULT_GRACE_PERIOD,
    DEFAULT_MAX_CONNECTIONS,
    AppOptions,
    ConsumerOptions,
    check_url,
    mask_url,
    resolve_url,
)
from .partitions import Partitioned

log = logging.getLogger("asyncstreams")

H = TypeVar("H", bound=Callable[..., Awaitable[Any]])
P = ParamSpec("P")
Lifespan = Callable[["App"], AbstractAsyncContextManager[None]]


class Register(Protocol):
    """What `@app.consumer(...)` gives: it registers a handler and returns it unchanged."""

    def __call__(self, handler: H, /) -> H: ...


def _takes_options(
    options: Callable[P, ConsumerOptions],
) -> Callable[
    [Callable[[App, ConsumerOptions], Register]], Callable[Concatenate[App, P], Register]
]:
    """Give the decorated method the signature of `options` (ConsumerOptions): its keyword
    arguments, their types and defaults are declared once, there."""

    def wrap(
        method: Callable[[App, ConsumerOptions], Register],
    ) -> Callable[Concatenate[App, P], Register]:
        @functools.wraps(method)
        def consumer(self: App, /, *args: P.args, **kwargs: P.kwargs) -> Register:
            return method(self, ConsumerOptions.create(args, kwargs))

        own = inspect.signature(options)
        self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        consumer.__signature__ = own.replace(  # type: ignore[attr-defined]
            parameters=[self_parameter, *own.parameters.values()], return_annotation=Register
        )
        return consumer

    return wrap


def default_consumer_name() -> str:
    """Unique per process: host, pid and a random part, so restarts never reuse a name."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@asynccontextmanager
async def _no_lifespan(app: App) -> AsyncIterator[None]:
    yield


@dataclass(frozen=True, slots=True)
class Registration:
    plan: HandlerPlan
    options: ConsumerOptions


class OnStarted(anyio.abc.TaskStatus[None]):
    """A task status that calls `callback` once `serve()` has its consumers running."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback

    def started(self, value: None = None) -> None:
        self._callback()


class App:
    """An asyncstreams application: handlers registered with `@app.consumer`, run together.

    `url` is where Redis is; the CLI's `--url` overrides it, and without either asyncstreams
    uses `$ASYNCSTREAMS_URL`, then `redis://localhost:6379/0`. The URL may be any node of
    a Redis Cluster: the app finds out at start (CLUSTER SLOTS) and logs it; `cluster=True`
    requires a cluster, `cluster=False` never asks. `grace_period` is how long handlers get
    to finish when the app stops. `lifespan`, if given, is entered before the consumers
    start and left after they stop (open your database pool there). `middleware` runs
    around every handler call, the first outermost (see `asyncstreams.middleware`).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        grace_period: float = DEFAULT_GRACE_PERIOD,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        lifespan: Lifespan | None = None,
        cluster: bool | None = None,
        middleware: Iterable[Middleware] = (),
    ) -> None:
        self._middleware = [check_middleware(m) for m in middleware]
        self._options = AppOptions(
            url=url, grace_period=grace_period, max_connections=max_connections, cluster=cluster
        )
        self._cli_url: str | None = None
        self._lifespan: Lifespan = lifespan or _no_lifespan
        self._registrations: list[Registration] = []
        self._client: _transport.Redis | None = None
        self._nodes: Nodes | None = None
        self._spread = 0
        self._stop: anyio.Event | None = None
        self._stop_requested = False
        self._failure: BaseException | None = None
        self._failed_consumer: str | None = None
        self._started = False
        self._consumers: tuple[Consumer, ...] = ()
        self._background: asyncio.Task[None] | None = None
        self._host: asyncio.Task[Any] | None = None
        self._host_cancelled = False
        self.consumer_name = default_consumer_name()

    # -- registration ------------------------------------------------------------------

    @_takes_options(ConsumerOptions)
    def consumer(self, options: ConsumerOptions) -> Register:
        """Register the decorated `async def` to handle the entries of `streams` in `group`.

        The handler's parameters decide what it receives: a `msgspec.Struct` type is decoded
        from the entry's fields, `Message` gets the envelope, `dict[str, str]` gets the fields.
        Up to `concurrency` handlers run at once; each XREADGROUP brings in up to
        `batch_size` entries and blocks up to `block_ms`. A new group starts at `start_id`
        ("0": the whole stream; "$": only entries added from now on). Retries, the
        dead-letter stream, claiming and the rest: see `ConsumerOptions`, whose fields are
        this method's keyword arguments. The handler is returned unchanged.
        """

        def register(handler: H) -> H:
            plan = plan_handler(handler)
            for other in self._registrations:
                shared = set(other.options.names) & set(options.names)
                if shared and other.options.group == options.group:
                    raise ConfigurationError(
                        f"handler {plan.name}: stream {sorted(shared)[0]!r} in group "
                        f"{options.group!r} is already consumed by handler {other.plan.name}; "
                        "expected one handler per stream and group (raise its concurrency, "
                        "or use another group)"
                    )
            self._registrations.append(Registration(plan, options))
            return handler

        return register

    def add_middleware(self, middleware: Middleware) -> None:
        """Run `middleware` around every handler call, inside those added before it.

        Raises ConfigurationError once the app is running (its consumers have their
        middleware), or when `middleware` is not a Middleware instance.
        """
        if self.running:
            raise ConfigurationError(
                f"add_middleware({type(middleware).__name__}): expected an app not yet "
                "running, found it running; add middleware before `serve()` or `async with`"
            )
        self._middleware.append(check_middleware(middleware))

    @property
    def middleware(self) -> tuple[Middleware, ...]:
        """The middleware registered, outermost first."""
        return tuple(self._middleware)

    @property
    def registrations(self) -> tuple[Registration, ...]:
        return tuple(self._registrations)

    # -- configuration and the client --------------------------------------------------

    def configure(self, *, url: str | None = None, grace_period: float | None = None) -> None:
        """Override settings from the process edge (the CLI's --url and --grace-period)."""
        if url is not None:
            self._cli_url = check_url(url)
        if grace_period is not None:
            self._options = AppOptions(
                url=self._options.url,
                grace_period=grace_period,
                max_connections=self._options.max_connections,
                cluster=self._options.cluster,
            )

    @property
    def url(self) -> str:
        """The Redis URL in effect (may hold a password: log `display_url` instead)."""
        return resolve_url(self._cli_url, self._options.url)

    @property
    def display_url(self) -> str:
        return mask_url(self.url)

    @property
    def grace_period(self) -> float:
        return self._options.grace_period

    @property
    def redis(self) -> _transport.Redis:
        """The app's Redis client. Handlers may use it; it shares the consumers' pool.

        Replies are bytes (the client does not decode responses). On a Redis Cluster it is
        the client of the URL's node: commands about keys of other nodes get MOVED (use
        redis-py's `RedisCluster` for those).
        """
        if self._client is None:
            self._client = _transport.create_client(
                self.url, max_connections=self._options.max_connections + self._own_connections
            )
        return self._client

    @property
    def _own_connections(self) -> int:
        # Each consumer keeps two connections of its own on top of the shared ones: its
        # blocking reads and its acks never wait for one another or for a handler's command.
        # (On a cluster, where it reads each hash slot apart, `serve` reserves the rest.)
        return 2 * len(self._registrations)

    @property
    def consumers(self) -> tuple[Consumer, ...]:
        """The consumers running now, one per handler (none unless running): what
        `asyncstreams.testing` asks whether they still hold anything."""
        return self._consumers

    @property
    def running(self) -> bool:
        """True from the start of `serve()` (or `async with app`) until it returns."""
        return self._stop is not None

    async def servers(self) -> Nodes:
        """The servers of the URL: one, or the masters of a cluster (found out once). For
        asyncstreams' own commands (the CLI's among them): each goes to the server of its
        key."""
        if self._nodes is None:
            self._nodes = await discover(self.redis, cluster=self._options.cluster)
        return self._nodes

    async def aclose(self) -> None:
        """Close the app's Redis clients and their pools (new ones are made if used again)."""
        nodes, self._nodes = self._nodes, None
        client, self._client = self._client, None
        if nodes is not None:
            await nodes.aclose()
        if client is not None:
            await client.aclose()

    # -- publishing --------------------------------------------------------------------

    # Set by `asyncstreams.otel.instrument_tracing`: the fields that carry the current trace
    # context (`traceparent`, ...), added to each entry published. None: nothing is added.
    _trace_fields: Callable[[], Mapping[str, str]] | None = None

    async def publish(
        self,
        stream: str | Partitioned,
        payload: msgspec.Struct | Mapping[str, Any],
        *,
        key: str | bytes | None = None,
        maxlen: int | None = None,
        approximate: bool = True,
    ) -> str:
        """XADD `payload` to `stream` as a flat field map; returns the new entry's id.

        Scalars are written as text, bytes as they are and nested values as JSON, so any
        Redis client can read the entry and a handler taking the same Struct type gets an
        equal value back. To a `Partitioned` stream, `key` picks the partition (the same
        key, the same partition, always); without one, entries are spread over them.
        `maxlen` trims the stream (each partition, for a `Partitioned`; approximately,
        unless `approximate=False`). Outside a running app, close the pool when done:
        `await app.aclose()`, or publish inside `async with app:`.
        """
        keys = None if key is None else [key]
        ids = await self.publish_many(
            stream, [payload], keys=keys, maxlen=maxlen, approximate=approximate
        )
        return ids[0]

    async def publish_many(
        self,
        stream: str | Partitioned,
        payloads: Iterable[msgspec.Struct | Mapping[str, Any]],
        *,
        keys: Iterable[str | bytes] | None = None,
        maxlen: int | None = None,
        approximate: bool = True,
    ) -> list[str]:
        """`publish` for many payloads at once, pipelined (on a cluster, one pipeline per
        server, the servers at once); returns the ids in order. `keys`, one per payload,
        pick the partitions of a `Partitioned` stream. On an error, some of the payloads
        may have been added (on a cluster, those of the masters that answered): publishing
        is at-least-once, as a consumer's handling is."""
        if maxlen is not None and (
            isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 0
        ):
            raise ConfigurationError(f"publish: maxlen must be an integer >= 0, got {maxlen!r}")
        carried = self._trace_fields() if self._trace_fields is not None else None
        flats: list[list[str | bytes]]
        if carried:
            # The payload's own field of the same name, if any, is kept.
            maps = [{**carried, **encode_fields(p)} for p in payloads]
            flats = [list(chain.from_iterable(fields.items())) for fields in maps]
        else:
            flats = [encode_flat(p) for p in payloads]
        streams = self._streams_for(stream, keys, len(flats))
        return await _commands.add(
            await self.servers(),
            list(zip(streams, flats, strict=True)),
            maxlen=maxlen,
            approximate=approximate,
        )

    def _streams_for(
        self, stream: str | Partitioned, keys: Iterable[str | bytes] | None, count: int
    ) -> list[str]:
        """The stream each of `count` payloads goes to."""
        if not isinstance(stream, Partitioned):
            if keys is not None:
                raise ConfigurationError(
                    f"publish to {stream!r}: keys pick a partition of a Partitioned stream; "
                    "expected a Partitioned stream or no keys"
                )
            return [stream] * count
        if keys is None:
            start, self._spread = self._spread, self._spread + count
            partitions = stream.streams
            return [partitions[(start + i) % len(partitions)] for i in range(count)]
        streams = [stream.stream(key) for key in keys]
        if len(streams) != count:
            raise ConfigurationError(
                f"publish to {stream.name!r}: expected one key per payload, got {len(streams)} "
                f"keys for {count} payloads"
            )
        return streams

    async def dead_letters(
        self, dead_letter: str, *, limit: int = 100
    ) -> list[deadletter.DeadLetterEntry]:
        """The first `limit` entries of the dead-letter stream `dead_letter`, read back."""
        nodes = await self.servers()
        page = await _commands.entries(nodes, dead_letter, after="-", count=limit)
        return [deadletter.parse(entry_id, flat, dead_letter) for entry_id, flat in page]

    async def replay_dead_letters(self, dead_letter: str, *, limit: int | None = None) -> int:
        """Move entries of the stream `dead_letter` back to the streams they came from.

               Each goes back with its original fields, as a new entry (a new id), in one MULTI with
               its XDEL from `dead_letter` (on a cluster, where the two streams are in different
               hash slots: the XADD, then the XDEL; a crash between them leaves a copy in both).
        Returns how many were moved (at most `limit`).
        """
        nodes = await self.servers()
        moved = 0
        after: bytes | str = "-"
        while limit is None or moved < limit:
            page = await _commands.entries(nodes, dead_letter, after=after, count=100)
            if not page:
                break
            for entry_id, flat in page[: None if limit is None else limit - moved]:
                entry = deadletter.parse(entry_id, flat, dead_letter)
                original = list(chain.from_iterable(entry.fields.items()))
                await _moves.move_back(
                    nodes, dead_letter, entry_id, flat, entry.letter.stream, original
                )
                moved += 1
            after = page[-1][0]
        return moved

    async def trim(
        self, stream: str, *, max_age: float | None = None, dry_run: bool = False
    ) -> _trim.TrimResult:
        """Remove the entries of `stream` that every group has read and acked: XTRIM MINID
        to the lowest, over its groups, of each group's oldest pending entry and the first
        entry after its last-delivered id. One script reads the groups and trims, so an
        entry a consumer reads meanwhile is never removed before it is acked.

        `max_age` (seconds) also removes entries older than that, read or not (the result's
        `losing` names the groups that lose entries they have not acked). `dry_run` removes
        nothing and says what would go. Raises NotFoundError for a stream that does not
        exist or has no groups (nothing then says which entries are done with).
        """
        return await _trim.trim(await self.servers(), stream, max_age=max_age, dry_run=dry_run)

    # -- running -----------------------------------------------------------------------

    @property
    def failure(self) -> BaseException | None:
        """What stopped the app: the exception a consumer failed with (one of its own
        tasks; what a handler raises is its entry's failure, except KeyboardInterrupt and
        SystemExit, which stop the app and land here too); None while it runs well or after
        a clean stop. A health check can report it."""
        return self._failure

    @property
    def failed_consumer(self) -> str | None:
        """Which consumer `failure` came from (its handler, streams, group and name); None
        when `failure` is None or came from no consumer."""
        return self._failed_consumer

    @property
    def started(self) -> bool:
        """True once every consumer runs (after the lifespan was entered), until the app
        starts to stop: what a readiness check asks."""
        return self._started

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run every consumer until `stop()` is called or this task is cancelled.

        Installs no signal handlers: that is `run()`'s job, or the CLI's. Raises
        RedisUnavailableError if Redis cannot be reached at start, RedisRefusedError if it
        refuses the app (login, ACL, a read-only replica), and, after stopping the others
        gracefully, what a consumer failed with.
        """
        if self._stop is not None:
            raise RuntimeError("this App is already running")
        stop = self._stop = anyio.Event()
        if self._stop_requested:
            stop.set()
        self._failure = None
        self._failed_consumer = None
        try:
            consumers = await self._start(stop)
            if consumers is None:
                return
            self._consumers = tuple(consumers)
            async with self._lifespan(self), anyio.create_task_group() as tg:
                for consumer in consumers:
                    await tg.start(self._run_consumer, consumer, stop)
                log.info(
                    "asyncstreams running %d consumer(s) on %s",
                    len(consumers),
                    consumers[0].nodes.describe() if consumers else self.display_url,
                )
                self._started = True
                task_status.started()
                await stop.wait()
                self._started = False
            if self._failure is not None:
                raise self._failure
        finally:
            self._started = False
            self._stop = None
            self._stop_requested = False
            self._consumers = ()
            with anyio.CancelScope(shield=True):
                await self.aclose()

    async def _start(self, stop: anyio.Event) -> list[Consumer] | None:
        """Reach Redis (one server or a cluster), make the consumers and create their
        groups; None if `stop` came first (it ends a start that waits for Redis at once)."""
        consumers: list[Consumer] = []
        try:
            async with anyio.create_task_group() as tg:

                async def stop_starting() -> None:
                    await stop.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(stop_starting)
                await _transport.check_reachable(self.redis)
                nodes = await self.servers()
                consumers = [
                    Consumer(
                        r.plan,
                        r.options,
                        nodes,
                        r.options.consumer or self.consumer_name,
                        self._middleware,
                    )
                    for r in self._registrations
                ]
                nodes.reserve(
                    self._options.max_connections + sum(c.own_connections for c in consumers)
                )
                # Groups first: what the lifespan publishes is read even by a group at "$".
                for consumer in consumers:
                    await consumer.prepare()
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise first_failure(group) from None
        return None if stop.is_set() else consumers

    async def _run_consumer(
        self,
        consumer: Consumer,
        stop: anyio.Event,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run one consumer; if it fails, the others stop gracefully and `serve` raises."""
        try:
            await consumer.run(stop, self.grace_period, task_status=task_status)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if self._failure is None:
                self._failure = exc
                self._failed_consumer = consumer.where
            if consumer.exit is not exc:
                log.error(
                    "%s: failed (%s); stopping the app",
                    consumer.where,
                    _transport.explain(exc),
                    exc_info=exc,
                )
            stop.set()

    def stop(self) -> None:
        """Ask a running app to stop gracefully: stop reading, drain, ack, close."""
        if self._stop is not None:
            self._stop.set()
        else:
            self._stop_requested = True

    async def run(self) -> None:
        """Serve until cancelled, SIGINT or SIGTERM (a second signal stops at once)."""
        from .runner import serve_until_signal

        await serve_until_signal(self)

    async def __aenter__(self) -> App:
        """Start the consumers in the background; they run until the block is left.

        As with a task group: if the app fails while the block runs, the block is cancelled
        and the failure is raised where it ends. A block cancelled while the app is
        starting leaves nothing running.
        """
        loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = loop.create_future()
        self._host = asyncio.current_task()
        self._host_cancelled = False

        def on_started() -> None:
            if not started.done():
                started.set_result(None)

        async def serve() -> None:
            try:
                await self.serve(task_status=OnStarted(on_started))
            except BaseException as exc:
                if not started.done():
                    started.set_exception(exc)
                elif not isinstance(exc, asyncio.CancelledError) and self._host is not None:
                    # The block is still running: cancel it, and raise this where it ends.
                    self._host_cancelled = True
                    self._host.cancel()
                raise

        task = self._background = loop.create_task(serve(), name="asyncstreams app")
        try:
            await started
        except BaseException:
            self._background = None
            self.stop()
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait([task])
            if not task.cancelled():
                task.exception()  # retrieved: raised below, or superseded by a cancellation
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._background = self._background, None
        host, self._host = self._host, None
        if task is None:
            return
        self.stop()
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            if not (self._host_cancelled and task.done()):
                # Cancelled again while the consumers drain: stop them now.
                task.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.wait([task])
                raise
            # The app's own cancellation of the block, landing as it ended: the failure that
            # caused it is raised below instead.
        finally:
            if self._host_cancelled and host is not None:
                host.uncancel()
                self._host_cancelled = False
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
