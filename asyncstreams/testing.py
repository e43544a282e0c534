"""Testing your handlers on a real Redis: `TestApp` runs an app's consumers on a private
redis-server, publishes, waits until nothing is left to do, and reads back what happened.

    from asyncstreams.testing import TestApp

    async def test_order_is_billed() -> None:
        async with TestApp(app, record=True) as t:
            await t.publish("orders", Order(id="o1", amount=5))
            await t.drain()
            assert await t.dead_letters("orders") == []
            assert [call.args[0] for call in t.calls(bill)] == [Order(id="o1", amount=5)]

The server is one per process (so one per pytest-xdist worker), started on first use and
stopped at exit; each TestApp gets a database of its own, emptied first (see
`_testserver.py`). The pytest plugin (`asyncstreams.pytest_plugin`, loaded by entry point)
gives the same server and databases as fixtures.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any

import msgspec

from . import _commands, _testserver, deadletter
from ._drain import Call, ObservedPlan, Observer, account, nothing_left
from .app import App, Registration
from .errors import ConfigurationError
from .message import decode_fields
from .options import ConsumerOptions
from .partitions import Partitioned

__all__ = ["FAST_CLAIM_IDLE_MS", "FAST_DIVISOR", "Call", "StreamEntry", "TestApp", "at_test_speed"]

# fast=True: waits measured in seconds are taken in milliseconds (see `at_test_speed`).
FAST_DIVISOR = 1000
# ... but entries are claimed from another consumer only once idle this long at least:
# three times the 50 ms at which a live consumer renews what it holds, so it keeps them.
FAST_CLAIM_IDLE_MS = 150
# How often `drain` looks again while work is left.
POLL_INTERVAL = 0.002

Handler = Callable[..., Awaitable[Any]]


def at_test_speed(options: ConsumerOptions) -> ConsumerOptions:
    """`options` with its waits at test speed, as `TestApp(fast=True)` runs a handler:
    `retry_delay` and `retry_max_delay` divided by FAST_DIVISOR (the default backoff of
    1 s, capped at 30 s, becomes 1 ms, capped at 30 ms) and `claim_idle_ms` too, but at
    least FAST_CLAIM_IDLE_MS (the default 60 s becomes 150 ms). Every other option is kept:
    `max_deliveries`, the dead-letter stream, `concurrency`, `batch_size`, `block_ms`,
    `pause_after_failures` and the rest behave as in production."""
    return dataclasses.replace(
        options,
        retry_delay=options.retry_delay / FAST_DIVISOR,
        retry_max_delay=options.retry_max_delay / FAST_DIVISOR,
        claim_idle_ms=max(options.claim_idle_ms // FAST_DIVISOR, FAST_CLAIM_IDLE_MS),
    )


@dataclasses.dataclass(frozen=True, slots=True)
class StreamEntry:
    """An entry of a stream, read back with XRANGE: its id and its fields as stored."""

    id: str
    raw: dict[bytes, bytes]

    @property
    def fields(self) -> dict[str, str]:
        """The fields as text; raises DecodeError if a name or value is not UTF-8."""
        flat = [item for pair in self.raw.items() for item in pair]
        return decode_fields(flat)


class TestApp:
    """Run `app`'s consumers for the `async with` block, on a test server, isolated.

    - `url=None`: a database of this process's private redis-server, lent to this TestApp
      alone and emptied first; `url="redis://..."`: that server and database, used as they
      are (nothing is emptied: isolation is then up to you, e.g. the `asyncstreams_url`
      fixture's clean database).
    - `fast=True`: each handler runs with its retry delays and claim idle times at test
      speed (`at_test_speed` says exactly what changes); the app's code is not changed.
    - `record=True`: what each handler is called with is kept, for `calls(handler)`.
    - `raise_errors=True`: the first exception a handler raises is raised by `drain()` (at
      once, while it waits), or else when the block ends, instead of only being logged.
      Retries and dead letters go on as usual meanwhile.

    While the block runs, the app's URL and its handlers' options are the TestApp's; both
    are put back when it ends (an app serves one TestApp at a time). Entering costs a few
    milliseconds (the first in a process also starts the server: see the README's figures).
    asyncio (and uvloop) only, as the App itself.
    """

    __test__ = False  # for pytest: a tool, not a class of tests

    def __init__(
        self,
        app: App,
        *,
        url: str | None = None,
        raise_errors: bool = False,
        record: bool = False,
        fast: bool = True,
    ) -> None:
        self.app = app
        self._url = url
        self._fast = fast
        self._raise_errors = raise_errors
        self._record = record
        self._observer = Observer(record=record)
        self._database: int | None = None
        self._saved: tuple[list[Registration], str | None] | None = None
        self._handlers: dict[Handler, list[ObservedPlan]] = {}

    @property
    def url(self) -> str:
        """The URL the app runs on (a database of the test server, or the one given)."""
        return self.app.url

    # -- the block -----------------------------------------------------------------------

    async def __aenter__(self) -> TestApp:
        app = self.app
        if self._saved is not None or app.running:
            raise RuntimeError("TestApp: this app is running already; expected one at a time")
        # Entered again: what the handlers did is counted afresh.
        self._observer = Observer(record=self._record)
        self._handlers = {}
        url = self._url
        if url is None:
            # In a thread: the first call starts the server, and FLUSHDB is a blocking call.
            self._database = await asyncio.to_thread(_testserver.lend_database)
            url = _testserver.database_url(self._database)
        # The app's URL and registrations are the TestApp's for the block (App keeps them
        # in `_cli_url`, the CLI's --url, and `_registrations`); put back in `_restore`.
        registrations = app._registrations
        self._saved = (list(registrations), app._cli_url)
        try:
            await app.aclose()  # a client made for another URL (a publish before) goes
            app.configure(url=url)
            registrations[:] = [self._observed(r) for r in registrations]
            await app.__aenter__()
        except BaseException:
            self._restore()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.app.__aexit__(exc_type, exc, tb)
        finally:
            self._restore()
        if exc is None and self._raise_errors:
            self._observer.raise_first_error()

    def _observed(self, registration: Registration) -> Registration:
        plan = ObservedPlan.of(registration.plan, self._observer, registration.options.group)
        self._handlers.setdefault(registration.plan.handler, []).append(plan)
        options = registration.options
        return Registration(plan, at_test_speed(options) if self._fast else options)

    def _restore(self) -> None:
        saved, self._saved = self._saved, None
        if saved is not None:
            registrations, cli_url = saved
            self.app._registrations[:] = registrations
            self.app._cli_url = cli_url
        database, self._database = self._database, None
        if database is not None:
            _testserver.give_back(database)

    def _running(self, what: str) -> None:
        if self._saved is None or not self.app.running:
            raise RuntimeError(f"TestApp.{what}: expected inside `async with TestApp(app)`")

    # -- acting and waiting --------------------------------------------------------------

    async def publish(
        self,
        stream: str | Partitioned,
        payload: msgspec.Struct | Mapping[str, Any],
        *,
        key: str | bytes | None = None,
    ) -> str:
        """XADD `payload` to `stream`, as `App.publish` does; returns the new entry's id."""
        self._running("publish")
        return await self.app.publish(stream, payload, key=key)

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait until nothing is left to do: on every stream the app consumes, each group
        has read every entry (no lag) and has nothing pending, and the consumers hold
        nothing (queued, running, waiting for a retry or an ack, parked).

        Raises AssertionError after `timeout` seconds with an account, per stream and
        group, of what is left: entries not read yet, each pending entry (its consumer,
        delivery count, what the consumer is doing with it, the last error its handler
        raised). With `raise_errors=True`, raises the first handler exception instead, as
        soon as there is one.
        """
        self._running("drain")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        observer = self._observer
        while True:
            if self._raise_errors:
                observer.raise_first_error()
            if await nothing_left(self.app):
                return
            if loop.time() >= deadline:
                raise AssertionError(
                    await account(self.app, observer, timeout=timeout, fast=self._fast)
                )
            await observer.wait_for_error(POLL_INTERVAL)

    # -- what happened -------------------------------------------------------------------

    async def entries(self, stream: str) -> list[StreamEntry]:
        """Every entry of `stream`, oldest first (XRANGE)."""
        self._running("entries")
        return [
            StreamEntry(entry_id.decode(), dict(zip(flat[::2], flat[1::2], strict=True)))
            for entry_id, flat in await self._read_all(stream)
        ]

    async def dead_letters(self, stream: str) -> list[deadletter.DeadLetterEntry]:
        """The entries of `stream` that were dead-lettered, read back from the dead-letter
        stream of each handler of `stream` (its `dead_letter` option), oldest first.

        ConfigurationError if no handler of the app consumes `stream`, or none of those
        that do has a dead-letter stream."""
        self._running("dead_letters")
        nodes = await self.app.servers()
        options = [r.options for r in self.app.registrations if stream in r.options.names]
        if not options:
            consumed = sorted({name for r in self.app.registrations for name in r.options.names})
            raise ConfigurationError(
                f"dead_letters: expected a stream the app consumes ({', '.join(consumed)}), "
                f"got {stream!r}"
            )
        targets = [o.dead_letter_stream(stream, cluster=nodes.cluster) for o in options]
        named = list(dict.fromkeys(t for t in targets if t is not None))
        if not named:
            raise ConfigurationError(
                f"dead_letters: the handlers of {stream!r} have no dead-letter stream "
                "(dead_letter=None): what fails stays pending (drain reports it as parked)"
            )
        letters = [
            deadletter.parse(entry_id, flat, target)
            for target in named
            for entry_id, flat in await self._read_all(target)
        ]
        return [letter for letter in letters if letter.letter.stream == stream]

    def calls(self, handler: Handler) -> list[Call]:
        """The calls of `handler` in this block (or the last one), in the order they
        started (`record=True`)."""
        if not self._record:
            raise ConfigurationError(
                "calls: expected TestApp(app, record=True); calls are not recorded by default"
            )
        plans = self._handlers.get(handler)
        if plans is None:
            names = ", ".join(sorted({p.name for ps in self._handlers.values() for p in ps}))
            name = getattr(handler, "__qualname__", repr(handler))
            raise ConfigurationError(
                f"calls: {name} is not a handler of the app; expected one of: {names}"
            )
        return self._observer.calls_of(plans)

    async def _read_all(self, stream: str) -> list[tuple[bytes, list[bytes]]]:
        nodes = await self.app.servers()
        entries: list[tuple[bytes, list[bytes]]] = []
        after: bytes | str = "-"
        while True:
            page = await _commands.entries(nodes, stream, after=after, count=500)
            entries += page
            if len(page) < 500:
                return entries
            after = page[-1][0]
