"""asyncstreams.testing on real redis-servers: TestApp's drain, retries at test speed, dead
letters, raise_errors, recording, isolation; the pytest plugin's fixtures under
pytest-asyncio, under anyio's plugin and under pytest-xdist (each worker a server of its
own); the per-process server after a fork."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgspec
import psutil
import pytest
import redis
import redis.asyncio as aioredis

from asyncstreams import App, ConfigurationError, Message
from asyncstreams._testserver import DATABASES, clean_database, shared_server
from asyncstreams.embedded import EmbeddedRedis
from asyncstreams.options import ConsumerOptions
from asyncstreams.testing import FAST_CLAIM_IDLE_MS, TestApp, at_test_speed

pytestmark = pytest.mark.anyio


class Order(msgspec.Struct):
    id: str
    amount: int


def orders_app(**options: object) -> tuple[App, list[str]]:
    """An app billing "orders"; an order whose id starts with "fail" always raises, one
    with "flaky" raises on its first two deliveries."""
    app = App()
    billed: list[str] = []

    @app.consumer("orders", group="billing", **options)  # type: ignore[arg-type]
    async def bill(order: Order, msg: Message) -> None:
        if order.id.startswith("fail"):
            raise RuntimeError(f"cannot bill {order.id}")
        if order.id.startswith("flaky") and msg.deliveries <= 2:
            raise ValueError(f"flaky {msg.deliveries}")
        billed.append(order.id)

    return app, billed


def handler_of(app: App) -> object:
    """The app's first handler (outside a TestApp: inside, the plan's handler is watched)."""
    return app.registrations[0].plan.handler


async def pending(url: str, stream: str, group: str) -> int:
    client = aioredis.Redis.from_url(url, protocol=2)
    try:
        return int((await client.xpending(stream, group))["pending"])
    finally:
        await client.aclose()


# -- drain --------------------------------------------------------------------------------


async def test_drain_returns_once_every_entry_is_handled_and_acked() -> None:
    app = App()
    handled: list[str] = []

    @app.consumer("orders", group="billing", concurrency=4)
    async def bill(order: Order) -> None:
        await asyncio.sleep(0.005)
        handled.append(order.id)

    async with TestApp(app) as t:
        for n in range(20):
            await t.publish("orders", Order(id=f"o{n}", amount=n))
        await t.drain()
        assert sorted(handled) == sorted(f"o{n}" for n in range(20))
        assert await pending(t.url, "orders", "billing") == 0
        assert all(not c.ledger.held for c in app.consumers)


async def test_drain_follows_entries_a_handler_publishes_to_another_stream() -> None:
    app = App()
    shipped: list[str] = []

    @app.consumer("orders", group="billing")
    async def bill(order: Order) -> None:
        await asyncio.sleep(0.01)
        await app.publish("invoices", order)

    @app.consumer("invoices", group="shipping")
    async def ship(order: Order) -> None:
        await asyncio.sleep(0.01)
        shipped.append(order.id)

    async with TestApp(app) as t:
        for n in range(5):
            await t.publish("orders", Order(id=f"o{n}", amount=n))
        await t.drain()
        assert sorted(shipped) == [f"o{n}" for n in range(5)]


async def test_drain_times_out_with_an_account_of_what_is_left() -> None:
    app = App()
    release = asyncio.Event()

    @app.consumer("orders", group="billing", concurrency=1, batch_size=1)
    async def bill(order: Order) -> None:
        await release.wait()

    async with TestApp(app) as t:
        for n in range(4):
            await t.publish("orders", Order(id=f"o{n}", amount=n))
        started = time.monotonic()
        with pytest.raises(AssertionError) as failed:
            await t.drain(timeout=0.2)
        assert 0.2 <= time.monotonic() - started < 1.0
        account = str(failed.value)
        assert account.startswith("drain: work left after 0.2 s\n"), account
        assert "stream 'orders', group 'billing' (handler " in account
        assert "entries not read by the group yet" in account
        assert "2 pending:" in account  # concurrency + batch_size
        assert "delivered 1 time(s)" in account
        assert "running, or waiting for its ack" in account
        assert "queued" in account
        release.set()
        await t.drain()


async def test_the_account_names_a_parked_entry_and_its_last_error() -> None:
    app, _ = orders_app(dead_letter=None, max_deliveries=2)
    async with TestApp(app) as t:
        entry_id = await t.publish("orders", Order(id="fail-1", amount=1))
        with pytest.raises(AssertionError) as failed:
            await t.drain(timeout=0.3)
        account = str(failed.value)
        assert f"{entry_id}: consumer {app.consumer_name}, delivered 2 time(s)" in account
        assert "parked: out of deliveries, and no dead-letter stream" in account
        assert "last error (delivery 2): RuntimeError: cannot bill fail-1" in account
        assert "holds 1 parked" in account


async def test_drain_without_fast_reports_the_retry_it_waits_for() -> None:
    app, billed = orders_app()  # retry_delay 1 s: the retry is 0.5 to 1 s away
    async with TestApp(app, fast=False) as t:
        await t.publish("orders", Order(id="flaky-1", amount=1))
        with pytest.raises(AssertionError) as failed:
            await t.drain(timeout=0.2)
        account = str(failed.value)
        assert "waiting for its retry (due in 0." in account, account
        assert "last error (delivery 1): ValueError: flaky 1" in account
        assert "fast=False" in account
        assert billed == []


# -- retries and dead letters at test speed ------------------------------------------------


async def test_a_handler_failing_twice_then_succeeding_drains_within_a_second() -> None:
    app, billed = orders_app()  # the defaults: retry_delay 1 s, so 1 s then 2 s in production
    bill = handler_of(app)
    async with TestApp(app, record=True) as t:
        await t.publish("orders", Order(id="flaky-1", amount=1))
        started = time.monotonic()
        await t.drain(timeout=1.0)
        assert time.monotonic() - started < 1.0
        assert billed == ["flaky-1"]
        calls = t.calls(bill)  # type: ignore[arg-type]
        assert [c.entries[0][2] for c in calls] == [1, 2, 3]
        assert [type(c.error) for c in calls] == [ValueError, ValueError, type(None)]
        assert all(c.done for c in calls)
        assert await t.dead_letters("orders") == []


def test_every_public_name_of_the_testing_module_resolves() -> None:
    import asyncstreams.testing

    for name in asyncstreams.testing.__all__:
        assert getattr(asyncstreams.testing, name) is not None, name


def test_at_test_speed_changes_the_waits_and_nothing_else() -> None:
    options = ConsumerOptions("orders", group="billing")
    fast = at_test_speed(options)
    assert (fast.retry_delay, fast.retry_max_delay, fast.claim_idle_ms) == (0.001, 0.03, 150)
    changed = {"retry_delay", "retry_max_delay", "claim_idle_ms"}
    for name in ConsumerOptions.__dataclass_fields__:
        if name not in changed and name != "_":
            assert getattr(fast, name) == getattr(options, name), name
    slow = ConsumerOptions("orders", group="g", retry_delay=5, claim_idle_ms=600_000)
    assert (at_test_speed(slow).retry_delay, at_test_speed(slow).claim_idle_ms) == (0.005, 600)
    assert FAST_CLAIM_IDLE_MS == 150


async def test_dead_letters_are_read_back_parsed() -> None:
    app, billed = orders_app(max_deliveries=3)
    async with TestApp(app) as t:
        ok = await t.publish("orders", Order(id="o1", amount=1))
        failing = await t.publish("orders", Order(id="fail-1", amount=2))
        undecodable = await t.publish("orders", {"id": "o2", "amount": "many"})
        await t.drain(timeout=2.0)
        assert billed == ["o1"]
        letters = {letter.letter.id: letter for letter in await t.dead_letters("orders")}
        assert set(letters) == {failing, undecodable}
        failed = letters[failing].letter
        assert (failed.reason, failed.error, failed.deliveries) == ("failed", "RuntimeError", 3)
        assert failed.message == "cannot bill fail-1"
        assert letters[failing].fields == {b"id": b"fail-1", b"amount": b"2"}
        assert letters[undecodable].letter.reason == "undecodable"
        assert [e.id for e in await t.entries("orders")] == [ok, failing, undecodable]
        assert (await t.entries("orders"))[0].fields == {"id": "o1", "amount": "1"}
        assert await t.entries("orders:dead-letter") != []
        assert await t.entries("nothing-here") == []


async def test_dead_letters_of_a_stream_without_them_is_an_error() -> None:
    app, _ = orders_app(dead_letter=None)
    async with TestApp(app) as t:
        with pytest.raises(ConfigurationError, match="no dead-letter stream"):
            await t.dead_letters("orders")
        with pytest.raises(ConfigurationError, match=r"a stream the app consumes \(orders\)"):
            await t.dead_letters("order")


# -- raise_errors -----------------------------------------------------------------------


async def test_raise_errors_raises_the_first_handler_exception_from_drain() -> None:
    app, billed = orders_app()
    async with TestApp(app, raise_errors=True) as t:
        entry_id = await t.publish("orders", Order(id="flaky-1", amount=1))
        with pytest.raises(ValueError, match="flaky 1") as raised:
            await t.drain()
        assert raised.value.__notes__ == [
            f"raised by handler {app.registrations[0].plan.name} on entry {entry_id} of "
            "orders (delivery 1), and raised again here by TestApp(raise_errors=True)"
        ]
        # Raised once: the entry's retries go on, and the next drain sees them through.
        await t.drain()
        assert billed == ["flaky-1"]


async def test_raise_errors_raises_when_the_block_ends_if_drain_did_not() -> None:
    app = App()
    raised = asyncio.Event()

    @app.consumer("orders", group="billing")
    async def bill(order: Order) -> None:
        raised.set()
        raise KeyError(order.id)

    async def publish_and_leave() -> None:
        async with TestApp(app, raise_errors=True) as t:
            await t.publish("orders", Order(id="o1", amount=1))
            await raised.wait()

    with pytest.raises(KeyError, match="o1"):
        await publish_and_leave()
    assert not app.running


async def test_without_raise_errors_handler_exceptions_are_only_logged() -> None:
    app, _ = orders_app(max_deliveries=1)
    async with TestApp(app) as t:
        await t.publish("orders", Order(id="fail-1", amount=1))
        await t.drain()
        assert len(await t.dead_letters("orders")) == 1


# -- recording --------------------------------------------------------------------------


async def test_calls_record_what_each_handler_got() -> None:
    app = App()

    @app.consumer("orders", group="billing")
    async def bill(order: Order, *, msg: Message) -> None:
        pass

    @app.consumer("orders", group="audit", batch_size=50)
    async def audit(orders: list[Order]) -> None:
        pass

    async with TestApp(app, record=True) as t:
        ids = [await t.publish("orders", Order(id=f"o{n}", amount=n)) for n in range(3)]
        await t.drain()
        calls = t.calls(bill)
        assert [c.args for c in calls] == [(Order(id=f"o{n}", amount=n),) for n in range(3)]
        assert [c.kwargs["msg"].id for c in calls] == ids
        assert [c.entries for c in calls] == [(("orders", i, 1),) for i in ids]
        batches = t.calls(audit)
        assert [o for c in batches for o in c.args[0]] == [calls[n].args[0] for n in range(3)]
        assert [e[1] for c in batches for e in c.entries] == ids
        with pytest.raises(ConfigurationError, match="is not a handler of the app"):
            t.calls(test_calls_record_what_each_handler_got)  # type: ignore[arg-type]


async def test_calls_need_record() -> None:
    app, _ = orders_app()
    bill = handler_of(app)
    async with TestApp(app) as t:
        with pytest.raises(ConfigurationError, match=r"record=True"):
            t.calls(bill)  # type: ignore[arg-type]


# -- isolation and the app put back ---------------------------------------------------------


async def test_two_test_apps_at_once_see_only_their_own_entries() -> None:
    first, billed_first = orders_app()
    second, billed_second = orders_app()
    async with TestApp(first) as a, TestApp(second) as b:
        assert a.url != b.url
        await a.publish("orders", Order(id="a", amount=1))
        await b.publish("orders", Order(id="b", amount=2))
        await a.drain()
        await b.drain()
        assert [e.fields["id"] for e in await a.entries("orders")] == ["a"]
        assert [e.fields["id"] for e in await b.entries("orders")] == ["b"]
    assert (billed_first, billed_second) == (["a"], ["b"])


async def test_the_next_test_app_starts_on_an_empty_database() -> None:
    app, billed = orders_app()
    async with TestApp(app) as t:
        await t.publish("orders", Order(id="o1", amount=1))
        await t.drain()
    async with TestApp(app) as t:
        assert await t.entries("orders") == []
        await t.drain()
    assert billed == ["o1"]


async def test_a_test_app_entered_again_counts_afresh() -> None:
    app, billed = orders_app()
    bill = handler_of(app)
    t = TestApp(app, record=True, raise_errors=True)
    async with t:
        await t.publish("orders", Order(id="flaky-1", amount=1))
        with pytest.raises(ValueError, match="flaky 1"):
            await t.drain()
        await t.drain()
    assert len(t.calls(bill)) == 3  # type: ignore[arg-type]
    async with t:
        await t.publish("orders", Order(id="o2", amount=2))
        await t.drain()
    assert [c.args[0].id for c in t.calls(bill)] == ["o2"]  # type: ignore[arg-type]
    assert billed == ["flaky-1", "o2"]


async def test_the_app_is_put_back_as_it_was() -> None:
    app, _ = orders_app()
    before = app.registrations
    url = app.url
    async with TestApp(app) as t:
        assert app.url == t.url != url
        assert app.registrations[0].options.claim_idle_ms == FAST_CLAIM_IDLE_MS
        assert app.registrations[0].options.group == "billing"
        with pytest.raises(RuntimeError, match="running already"):
            async with TestApp(app):
                pass
    assert app.registrations == before
    assert app.url == url
    assert not app.running
    with pytest.raises(RuntimeError, match=r"expected inside `async with TestApp\(app\)`"):
        await t.drain()


async def test_a_given_url_is_used_as_it_is(asyncstreams_url: str) -> None:
    client = redis.Redis.from_url(asyncstreams_url, protocol=2)
    client.set("mine", "kept")
    app, billed = orders_app()
    async with TestApp(app, url=asyncstreams_url) as t:
        assert t.url == asyncstreams_url
        await t.publish("orders", Order(id="o1", amount=1))
        await t.drain()
    assert billed == ["o1"]
    assert client.get("mine") == b"kept"
    assert client.xlen("orders") == 1
    client.close()


# -- the plugin's fixtures and the server ----------------------------------------------------


def test_the_server_fixture_is_the_test_apps_server(asyncstreams_server: EmbeddedRedis) -> None:
    assert asyncstreams_server is shared_server()
    assert asyncstreams_server.process is not None
    with redis.Redis(port=asyncstreams_server.port) as client:
        assert client.config_get("databases") == {"databases": str(DATABASES)}


def test_the_url_fixture_gives_a_database_of_its_own(
    asyncstreams_server: EmbeddedRedis, asyncstreams_url: str
) -> None:
    assert asyncstreams_url.startswith(f"redis://127.0.0.1:{asyncstreams_server.port}/")
    database = int(asyncstreams_url.rsplit("/", 1)[1])
    assert 0 < database < DATABASES
    with redis.Redis.from_url(asyncstreams_url) as client:
        assert client.dbsize() == 0
    with clean_database() as other:
        assert other != asyncstreams_url


def test_a_database_is_emptied_before_it_is_lent_again() -> None:
    with clean_database() as url, redis.Redis.from_url(url) as client:
        client.set("left", "behind")
    with clean_database() as again, redis.Redis.from_url(again) as client:
        assert again == url  # the same database, lent again
        assert client.dbsize() == 0


def _server_of_a_forked_child(queue: multiprocessing.Queue[tuple[int, int]]) -> None:
    server = shared_server()
    assert server.process is not None
    queue.put((server.port, server.process.pid))


def test_a_forked_child_starts_a_server_of_its_own_and_leaves_the_parents() -> None:
    parent = shared_server()
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[tuple[int, int]] = context.Queue()
    child = context.Process(target=_server_of_a_forked_child, args=(queue,))
    child.start()
    port, pid = queue.get(timeout=10)
    child.join(10)
    assert child.exitcode == 0
    assert port != parent.port
    # The child's server went with the child (the parent-death signal); the parent's runs.
    deadline = time.monotonic() + 5
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the child's redis-server outlived the child"
        time.sleep(0.01)
    assert shared_server() is parent
    with redis.Redis(port=parent.port) as client:
        assert client.ping()


# -- the plugin in pytest runs of their own ---------------------------------------------------

PLUGIN_TEST = """
import msgspec
import pytest
import redis

from asyncstreams import App
from asyncstreams.testing import TestApp


class Order(msgspec.Struct):
    id: str


app = App()
billed = []


@app.consumer("orders", group="billing")
async def bill(order: Order) -> None:
    billed.append(order.id)


{marks}
async def test_test_app(asyncstreams_url):
    async with TestApp(app, url=asyncstreams_url) as t:
        await t.publish("orders", Order(id="o1"))
        await t.drain()
    assert billed[-1:] == ["o1"]


{marks}
async def test_test_app_on_its_own_database():
    async with TestApp(app, record=True) as t:
        assert await t.entries("orders") == []
        await t.publish("orders", Order(id="o2"))
        await t.drain()
        assert [call.args for call in t.calls(bill)] == [(Order(id="o2"),)]


def test_clean_database(asyncstreams_url):
    with redis.Redis.from_url(asyncstreams_url) as client:
        assert client.dbsize() == 0
        client.set("dirty", "1")
"""

XDIST_TEST = """
import json
import os

import pytest
import redis


@pytest.mark.parametrize("n", range(6))
def test_where(n, asyncstreams_server, asyncstreams_url, tmp_path_factory):
    with redis.Redis.from_url(asyncstreams_url) as client:
        assert client.dbsize() == 0
        client.set("mine", n)
    out = os.environ["WHERE_DIR"]
    record = {{
        "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
        "pid": os.getpid(),
        "port": asyncstreams_server.port,
        "server_pid": asyncstreams_server.pid,
    }}
    with open(os.path.join(out, f"{{n}}.json"), "w") as f:
        json.dump(record, f)
"""


def run_pytest(
    tmp_path: Path, source: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """pytest on one test file of its own, in a fresh process: asyncstreams' plugin loads
    by its entry point (no conftest)."""
    (tmp_path / "test_plugin_user.py").write_text(textwrap.dedent(source))
    full_env = {k: v for k, v in os.environ.items() if k != "PYTEST_DISABLE_PLUGIN_AUTOLOAD"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("plugin", "marks", "off"),
    [
        pytest.param("pytest-asyncio", "@pytest.mark.asyncio", "anyio", id="pytest-asyncio"),
        pytest.param(
            "anyio",
            '@pytest.mark.anyio\n@pytest.mark.parametrize("anyio_backend", ["asyncio"])',
            "asyncio",
            id="anyio",
        ),
    ],
)
def test_the_plugin_under_each_async_test_plugin(
    tmp_path: Path, plugin: str, marks: str, off: str
) -> None:
    done = run_pytest(tmp_path, PLUGIN_TEST.format(marks=marks), "-p", f"no:{off}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout, done.stdout


def test_each_xdist_worker_has_a_server_of_its_own(tmp_path: Path) -> None:
    where = tmp_path / "where"
    where.mkdir()
    done = run_pytest(tmp_path, XDIST_TEST.format(), "-n", "2", env={"WHERE_DIR": str(where)})
    assert done.returncode == 0, done.stdout + done.stderr
    records = [json.loads(path.read_text()) for path in where.iterdir()]
    assert len(records) == 6
    workers = {r["worker"]: (r["pid"], r["port"], r["server_pid"]) for r in records}
    assert set(workers) == {"gw0", "gw1"}, records
    for r in records:
        assert workers[r["worker"]] == (r["pid"], r["port"], r["server_pid"]), records
    (pid0, port0, server0), (pid1, port1, server1) = workers.values()
    assert pid0 != pid1
    assert port0 != port1
    assert server0 != server1
    # Each worker stopped its server when it exited.
    for server_pid in (server0, server1):
        assert not psutil.pid_exists(server_pid) or (
            psutil.Process(server_pid).status() == psutil.STATUS_ZOMBIE
        ), f"redis-server {server_pid} outlived its xdist worker"
