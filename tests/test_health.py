"""asyncstreams.health: /healthz, /readyz and /metrics over real HTTP, against Apps on real
redis-servers (the test's own where it pauses or kills it), as an ASGI app, and from a
supervisor that answers for worker processes on unix sockets."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import httpx
import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError
from starlette.applications import Starlette
from starlette.routing import Mount

from asyncstreams import App, ConfigurationError, Message, _exposition, _http, health
from asyncstreams._arguments import http_address
from asyncstreams._process import die_with_parent
from asyncstreams.embedded import free_port
from asyncstreams.health import (
    METRICS_CONTENT_TYPE,
    PID_HEADER,
    asgi_app,
    serve_supervisor_http,
    serve_worker_socket,
    serving,
    supervisor_endpoint,
    worker_sockets,
)

from .conftest import Names
from .helpers import ROOT, CliProcess, eventually, own_server, wait_for
from .test_cli import ledger_env, publish, stop, wait_until

anyio_test = pytest.mark.anyio

NO_METRICS = health.NO_METRICS.body


def register(app: App, names: Names, handled: list[str] | None = None) -> None:
    @app.consumer(names.stream, group=names.group, block_ms=100)
    async def handle(msg: Message) -> None:
        if handled is not None:
            handled.append(msg.id)


@contextlib.asynccontextmanager
async def http_client(app: App, **kwargs: object) -> AsyncIterator[httpx.AsyncClient]:
    """`serving(app)` on a free loopback port, and an HTTP client of it."""
    async with (
        serving(app, http=("127.0.0.1", 0), **kwargs) as port,  # type: ignore[arg-type]
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http,
    ):
        yield http


async def answer(http: httpx.AsyncClient, path: str) -> tuple[int, object]:
    response = await http.get(path)
    return response.status_code, response.json()


async def raw(port: int, request: bytes) -> bytes:
    """What the server sends back to `request` on a connection of its own, until it closes."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        return await read_all(stream)


async def read_all(stream: anyio.abc.ByteStream) -> bytes:
    received = b""
    with anyio.fail_after(5):
        while True:
            try:
                received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):  # closed, or reset
                return received


# -- one process ---------------------------------------------------------------------------


@anyio_test
async def test_the_probes_follow_the_app_from_start_to_stop_and_through_a_pause(
    names: Names,
) -> None:
    with own_server() as server:
        app = App(server.url)
        register(app, names)
        async with http_client(app) as http:
            assert await answer(http, "/healthz") == (200, {"status": "alive", "running": False})
            assert await answer(http, "/readyz") == (
                503,
                {"status": "not ready", "reason": "not running"},
            )
            async with app:
                assert await answer(http, "/readyz") == (200, {"status": "ready", "consumers": 1})
                server.pause()
                try:
                    status, body = await answer(http, "/readyz")
                    assert (status, body) == (
                        503,
                        {
                            "status": "not ready",
                            "reason": "redis unavailable",
                            "error": "TimeoutError: no reply to PING within 0.5 s",
                        },
                    )
                    assert await answer(http, "/healthz") == (
                        200,
                        {"status": "alive", "running": True},
                    )
                finally:
                    server.resume()

                async def ready() -> bool:
                    return (await http.get("/readyz")).status_code == 200

                await eventually(ready, what="/readyz 200 once Redis answers again")
            assert await answer(http, "/readyz") == (
                503,
                {"status": "not ready", "reason": "not running"},
            )
            assert await answer(http, "/healthz") == (200, {"status": "alive", "running": False})


@anyio_test
async def test_readyz_names_the_consumers_in_an_outage_and_recovers_after_a_restart(
    names: Names,
) -> None:
    with own_server() as server:
        app = App(server.url)
        register(app, names)
        async with http_client(app) as http, app:
            (consumer,) = app.consumers
            server.kill()
            outage = (
                503,
                {
                    "status": "not ready",
                    "reason": "redis unavailable",
                    "consumers": [consumer.where],
                },
            )

            async def in_outage() -> bool:
                return await answer(http, "/readyz") == outage

            await eventually(in_outage, what="/readyz naming the consumer in an outage")
            assert await answer(http, "/healthz") == (200, {"status": "alive", "running": True})
            server.start()

            async def ready() -> bool:
                return await answer(http, "/readyz") == (
                    200,
                    {"status": "ready", "consumers": 1},
                )

            await eventually(ready, timeout=20, what="/readyz 200 after the restart")


@anyio_test
async def test_healthz_is_503_once_a_consumer_has_failed(names: Names) -> None:
    with own_server() as server:
        app = App(server.url)
        register(app, names)
        async with http_client(app) as http, anyio.create_task_group() as tasks:

            async def serve() -> None:
                with pytest.raises(NoPermissionError):
                    await app.serve()

            tasks.start_soon(serve)

            async def ready() -> bool:
                return (await http.get("/readyz")).status_code == 200

            await eventually(ready, what="/readyz 200")
            admin = aioredis.Redis.from_url(server.url, protocol=2)
            try:
                # The consumer's next read is refused: it fails, and the app stops.
                await admin.execute_command("ACL", "SETUSER", "default", "-xreadgroup")
            finally:
                await admin.aclose()
            with anyio.fail_after(10):
                while app.running:
                    await anyio.sleep(0.02)
            status, body = await answer(http, "/healthz")
            assert status == 503
            assert isinstance(body, dict)
            assert body["status"] == "dead"
            assert body["error"].startswith("NoPermissionError: ")
            assert "xreadgroup" in body["error"]
            assert body["consumer"] == app.failed_consumer
            assert f"group={names.group}" in body["consumer"]
            assert await answer(http, "/readyz") == (
                503,
                {"status": "not ready", "reason": "not running"},
            )


@anyio_test
async def test_readyz_waits_for_the_lifespan_and_the_consumers(
    redis_url: str, names: Names
) -> None:
    entered, release = anyio.Event(), anyio.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app: App) -> AsyncIterator[None]:
        entered.set()
        await release.wait()  # a slow start: a database pool, say
        yield

    app = App(redis_url, lifespan=lifespan)
    register(app, names)
    async with http_client(app) as http, anyio.create_task_group() as tasks:
        tasks.start_soon(app.serve)
        with anyio.fail_after(10):
            await entered.wait()
        assert await answer(http, "/readyz") == (
            503,
            {"status": "not ready", "reason": "starting"},
        )
        release.set()

        async def ready() -> bool:
            return (await http.get("/readyz")).status_code == 200

        await eventually(ready, what="/readyz 200 once the lifespan is entered")
        assert app.started
        app.stop()
    assert not app.started


BAD_REQUESTS = [
    (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 9000 + b"\r\n\r\n",
        "expected a request line and headers of at most 8192 bytes",
    ),
    (
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "expected a request line and headers of at most 8192 bytes",
    ),
    (b"GARBAGE\r\n\r\n", "expected 'METHOD /path HTTP/1.1', got 'GARBAGE'"),
    (b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", "expected HTTP/1.1 or HTTP/1.0, got 'HTTP/2.0'"),
    (
        b"GET healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        "expected a path starting with '/', got 'healthz'",
    ),
    (b"GET /healthz HTTP/1.1\r\n\r\n", "expected one Host header in an HTTP/1.1 request, got 0"),
    (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        "expected one Host header in an HTTP/1.1 request, got 2",
    ),
    (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n",
        "expected a header line 'Name: value', got 'no colon'",
    ),
    (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
        "expected a header line 'Name: value', got ' folded'",
    ),
    (b"GET /healthz HTTP/1.1\r\nHost: \xff\r\n\r\n", "expected an ASCII request head"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\x00\r\n\r\n", "expected a header line 'Name: value'"),
]


@anyio_test
async def test_a_bad_request_gets_400_and_the_server_and_the_consumers_go_on(
    redis_url: str, names: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_http, "READ_TIMEOUT", 0.3)
    handled: list[str] = []
    app = App(redis_url)
    register(app, names, handled)
    async with app, serving(app, http=("127.0.0.1", 0)) as port:
        assert port is not None
        silent = await anyio.connect_tcp("127.0.0.1", port)  # sends nothing at all
        half = await anyio.connect_tcp("127.0.0.1", port)
        await half.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never ends its head
        for request, error in BAD_REQUESTS:
            reply = await raw(port, request)
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (request[:40], reply)
            assert b"\r\nConnection: close" in head
            assert json.loads(body)["error"].startswith(error), request[:40]
        ok = await raw(port, b"GET /readyz?verbose=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 OK\r\n")
        assert ok.endswith(b'\r\n\r\n{"status":"ready","consumers":1}\n')
        # The clients too slow to send their heads are dropped without an answer.
        for stream in (silent, half):
            async with stream:
                assert await read_all(stream) == b""
        # The consumers went on meanwhile.
        entry = await app.publish(names.stream, {"n": "1"})

        async def handled_it() -> bool:
            return entry in handled

        await eventually(handled_it, what="the entry handled")
        assert app.failure is None


@anyio_test
async def test_connections_beyond_the_limit_are_closed_until_there_is_room(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_http, "MAX_CONNECTIONS", 2)
    monkeypatch.setattr(_http, "READ_TIMEOUT", 0.5)
    app = App(redis_url)
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    async with serving(app, http=("127.0.0.1", 0)) as port:
        assert port is not None
        idle = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(2)]

        async def refused() -> bool:  # once the server has taken both idle ones in
            return await raw(port, request) == b""

        await eventually(refused, what="a third connection closed unanswered")
        for stream in idle:
            async with stream:
                assert await read_all(stream) == b""  # dropped after READ_TIMEOUT
        assert (await raw(port, request)).startswith(b"HTTP/1.1 200 OK\r\n")


@anyio_test
async def test_other_paths_are_404_other_methods_405_and_head_has_no_body(redis_url: str) -> None:
    app = App(redis_url)
    async with http_client(app) as http:
        missing = await http.get("/health")
        assert (missing.status_code, missing.json()) == (
            404,
            {"error": "no route '/health'", "routes": ["/healthz", "/metrics", "/readyz"]},
        )
        for method in ("POST", "PUT", "DELETE", "OPTIONS"):
            refused = await http.request(method, "/healthz")
            assert refused.status_code == 405, method
            assert refused.headers["allow"] == "GET, HEAD"
            assert refused.json() == {"error": f"method {method} not allowed"}
        head = await http.head("/healthz")
        assert head.status_code == 200
        assert head.content == b""
        assert int(head.headers["content-length"]) == len((await http.get("/healthz")).content)


@anyio_test
async def test_metrics_come_from_the_callable_in_the_text_format(redis_url: str) -> None:
    app = App(redis_url)
    exposition = b"# TYPE jobs_total counter\njobs_total 3.0\n"
    async with http_client(app, metrics=lambda: exposition) as http:
        response = await http.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert response.content == exposition

    async def scrape() -> bytes:
        await anyio.lowlevel.checkpoint()
        return exposition

    async with http_client(app, metrics=scrape) as http:
        assert (await http.get("/metrics")).content == exposition
    async with http_client(app) as http:
        off = await http.get("/metrics")
        assert (off.status_code, off.content) == (404, NO_METRICS)
        assert off.headers["content-type"] == "text/plain; charset=utf-8"

    def broken() -> bytes:
        raise RuntimeError("the registry is broken")

    async with http_client(app, metrics=broken) as http:
        failed = await http.get("/metrics")
        assert (failed.status_code, failed.json()) == (500, {"error": "RuntimeError in /metrics"})
        assert (await http.get("/healthz")).status_code == 200


@anyio_test
async def test_serving_raises_what_its_block_raises_and_says_when_the_port_is_taken(
    redis_url: str,
) -> None:
    app = App(redis_url)
    with pytest.raises(KeyError):
        async with serving(app, http=("127.0.0.1", 0)):
            raise KeyError("from the block")
    async with serving(app, http=("127.0.0.1", 0)) as port:
        with pytest.raises(
            ConfigurationError, match=rf"^cannot serve HTTP on 127\.0\.0\.1:{port} "
        ):
            async with serving(app, http=("127.0.0.1", port)):
                pass


def test_http_addresses() -> None:
    assert http_address("127.0.0.1:9000") == ("127.0.0.1", 9000)
    assert http_address("[::1]:9000") == ("::1", 9000)
    assert http_address(":9000") == (None, 9000)
    assert http_address("localhost:0") == ("localhost", 0)
    for bad in ("9000", "host:", "host:port", "::1:9000", "host:70000"):
        with pytest.raises(Exception, match="expected"):
            http_address(bad)


# -- ASGI ----------------------------------------------------------------------------------


@anyio_test
async def test_the_asgi_app_answers_the_same_mounted_or_not(redis_url: str, names: Names) -> None:
    app = App(redis_url)
    register(app, names)
    exposition = b"jobs_total 1.0\n"
    ops = asgi_app(app, metrics=lambda: exposition)
    service = Starlette(routes=[Mount("/ops", app=ops)])
    for asgi, prefix in ((ops, ""), (service, "/ops")):
        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            assert await answer(http, f"{prefix}/healthz") == (
                200,
                {"status": "alive", "running": False},
            )
            assert (await http.get(f"{prefix}/readyz")).status_code == 503
            async with app:
                assert await answer(http, f"{prefix}/readyz") == (
                    200,
                    {"status": "ready", "consumers": 1},
                )
            metrics = await http.get(f"{prefix}/metrics")
            assert metrics.headers["content-type"] == METRICS_CONTENT_TYPE
            assert metrics.content == exposition
            assert (await http.get(f"{prefix}/nope")).status_code == 404
            refused = await http.post(f"{prefix}/readyz")
            assert (refused.status_code, refused.headers["allow"]) == (405, "GET, HEAD")
            head = await http.head(f"{prefix}/healthz")
            assert (head.status_code, head.content) == (200, b"")
    transport = httpx.ASGITransport(app=asgi_app(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        off = await http.get("/metrics")
        assert (off.status_code, off.content) == (404, NO_METRICS)


# -- the text format, merged -----------------------------------------------------------------

WORKER_1 = """\
# HELP jobs_total Jobs done.
# TYPE jobs_total counter
jobs_total{queue="a",stream="s\\"x\\\\y\\nz"} 3.0
jobs_total{queue="b"} 1.0
# HELP jobs_created Jobs done.
# TYPE jobs_created gauge
jobs_created{queue="b"} 1700000100.0
# TYPE in_flight gauge
in_flight{consumer="c1"} 2.0
# TYPE lag gauge
lag{group="g"} 7.0
# TYPE seconds histogram
seconds_bucket{le="0.1"} 1.0
seconds_bucket{le="+Inf"} 2.0
seconds_count 2.0
seconds_sum 0.5
# TYPE build_info gauge
build_info{version="1.0"} 1.0
"""

WORKER_2 = """\
# HELP jobs_total Jobs done.
# TYPE jobs_total counter
jobs_total{queue="b"} 4.0
jobs_total{stream="s\\"x\\\\y\\nz", queue="a"} 2.0 1700000000000
# TYPE jobs_created gauge
jobs_created{queue="b"} 1700000000.0
# TYPE in_flight gauge
in_flight{consumer="c2"} 5.0
# TYPE lag gauge
lag{group="g"} 6.0
# TYPE seconds histogram
seconds_bucket{le="0.1"} 0.0
seconds_bucket{le="+Inf"} 1.0
seconds_count 1.0
seconds_sum 2.25
# TYPE build_info gauge
build_info{version="1.0"} 1.0
untyped_thing NaN
"""

MERGED = """\
# HELP jobs_total Jobs done.
# TYPE jobs_total counter
jobs_total{queue="a",stream="s\\"x\\\\y\\nz"} 5.0
jobs_total{queue="b"} 5.0
# HELP jobs_created Jobs done.
# TYPE jobs_created gauge
jobs_created{queue="b"} 1700000000.0
# TYPE in_flight gauge
in_flight{consumer="c1"} 2.0
in_flight{consumer="c2"} 5.0
# TYPE lag gauge
lag{group="g"} 7.0
# TYPE seconds histogram
seconds_bucket{le="0.1"} 1.0
seconds_bucket{le="+Inf"} 3.0
seconds_count 3.0
seconds_sum 2.75
# TYPE build_info gauge
build_info{version="1.0"} 1.0
# TYPE untyped_thing untyped
untyped_thing NaN
"""


def test_expositions_merge_by_name_and_labels() -> None:
    parts = [_exposition.parse(WORKER_1), _exposition.parse(WORKER_2)]
    assert _exposition.render(_exposition.merge(parts)).decode() == MERGED
    assert _exposition.render(_exposition.parse(WORKER_1)).decode() == WORKER_1
    assert _exposition.render({}) == b""


def test_a_counter_family_named_without_total_keeps_its_samples() -> None:
    families = _exposition.parse("# TYPE acked counter\nacked_total 2\n")
    assert list(families) == ["acked"]
    assert families["acked"].samples == {("acked_total", ""): 2}
    assert _exposition.monotonic(families)["acked"].samples == {("acked_total", ""): 2}


@pytest.mark.parametrize(
    "line",
    [
        "jobs_total",
        "jobs_total{queue=a} 1",
        'jobs_total{queue="a" 1',
        'jobs_total{queue="a"}1',
        "jobs_total one",
        "jobs_total 1 2 3",
        "9jobs 1",
    ],
)
def test_a_line_that_is_not_a_sample_is_an_error(line: str) -> None:
    with pytest.raises(ValueError, match=r"^line 2: expected"):
        _exposition.parse(f"# TYPE jobs_total counter\n{line}\n")


def test_a_worker_part_keeps_its_counters_across_restarts_and_silences() -> None:
    def families(jobs: float, gauge: float) -> _exposition.Families:
        return _exposition.parse(
            f"# TYPE jobs_total counter\njobs_total {jobs}\n# TYPE held gauge\nheld {gauge}\n"
        )

    def values(part: _exposition.Families) -> dict[str, float]:
        return {name: value for f in part.values() for (name, _), value in f.samples.items()}

    part = _exposition.WorkerPart()
    assert values(part.silent()) == {}
    assert values(part.answered("100", families(5, 2))) == {"jobs_total": 5, "held": 2}
    assert values(part.answered("100", families(7, 1))) == {"jobs_total": 7, "held": 1}
    assert values(part.silent()) == {"jobs_total": 7}  # its gauge is gone with it
    assert values(part.answered("101", families(1, 3))) == {"jobs_total": 8, "held": 3}
    assert values(part.answered("102", families(0, 0))) == {"jobs_total": 8, "held": 0}


def test_prometheus_client_expositions_merge_into_one_it_reads() -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    registry = prometheus_client.CollectorRegistry()
    counter = prometheus_client.Counter("acked", "Entries acked.", ["stream"], registry=registry)
    counter.labels('odd "name"\\').inc(3)
    histogram = prometheus_client.Histogram(
        "handler_seconds", "Time in the handler.", registry=registry, buckets=(0.1, 1.0)
    )
    histogram.observe(0.5)
    prometheus_client.Info("build", "Build.", registry=registry).info({"version": "1"})
    text = prometheus_client.generate_latest(registry).decode()
    merged = _exposition.render(
        _exposition.merge([_exposition.parse(text), _exposition.parse(text)])
    ).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(merged)
        for s in family.samples
    }
    assert samples[("acked_total", (("stream", 'odd "name"\\'),))] == 6
    assert samples[("handler_seconds_bucket", (("le", "1.0"),))] == 2
    assert samples[("handler_seconds_sum", ())] == 1.0
    assert samples[("build_info", (("version", "1"),))] == 1
    original = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("acked_created", (("stream", 'odd "name"\\'),))] == original["acked_created"]


# -- a supervisor and its workers ------------------------------------------------------------


@anyio_test
async def test_the_supervisor_answers_for_its_workers_and_merges_their_metrics(
    redis_url: str, names: Names, tmp_path: Path
) -> None:
    sockets = worker_sockets(tmp_path, 2)
    assert sockets == [str(tmp_path / "worker-1.sock"), str(tmp_path / "worker-2.sock")]
    apps = [App(redis_url), App(redis_url)]
    for app in apps:
        register(app, names)
    texts = [WORKER_1.encode(), WORKER_2.encode()]
    async with contextlib.AsyncExitStack() as stack, anyio.create_task_group() as tasks:
        for app in apps:
            await stack.enter_async_context(app)
        workers = [anyio.CancelScope(), anyio.CancelScope()]

        async def worker(index: int, *, task_status: anyio.abc.TaskStatus[None]) -> None:
            with workers[index]:
                metrics = functools.partial(lambda text: text, texts[index])
                await serve_worker_socket(
                    apps[index], sockets[index], metrics=metrics, task_status=task_status
                )

        for index in range(2):
            await tasks.start(worker, index)
        port = await tasks.start(serve_supervisor_http, "127.0.0.1", 0, sockets)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            assert await answer(http, "/healthz") == (200, {"status": "alive", "workers": 2})
            assert await answer(http, "/readyz") == (200, {"status": "ready", "workers": 2})
            metrics = await http.get("/metrics")
            assert metrics.headers["content-type"] == METRICS_CONTENT_TYPE
            assert metrics.text == MERGED

            # Worker 2's app stops: it is alive, and not ready.
            await apps[1].__aexit__(None, None, None)
            assert await answer(http, "/healthz") == (200, {"status": "alive", "workers": 2})
            assert await answer(http, "/readyz") == (
                503,
                {
                    "status": "not ready",
                    "workers": [
                        {
                            "worker": 2,
                            "status": 503,
                            "answer": {"status": "not ready", "reason": "not running"},
                        }
                    ],
                },
            )

            # Worker 2 is gone: its counters stay, its gauges go.
            workers[1].cancel()
            with anyio.fail_after(5):
                while await anyio.Path(sockets[1]).exists():
                    await anyio.sleep(0.01)
            status, body = await answer(http, "/healthz")
            assert status == 503
            assert isinstance(body, dict)
            (failing,) = body["workers"]
            assert failing["worker"] == 2
            assert failing["error"].startswith("no answer (FileNotFoundError: ")
            without = _exposition.parse((await http.get("/metrics")).text)
            assert without["jobs_total"].samples[("jobs_total", '{queue="b"}')] == 5
            assert without["seconds"].samples[("seconds_count", "")] == 3
            assert list(without["in_flight"].samples) == [("in_flight", '{consumer="c1"}')]
            assert "untyped_thing" not in without
        tasks.cancel_scope.cancel()


@anyio_test
async def test_the_supervisor_merges_the_metrics_of_instrumented_apps(
    redis_url: str, names: Names, tmp_path: Path
) -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from asyncstreams.prometheus import instrument

    sockets = worker_sockets(tmp_path, 2)
    handled: list[str] = []
    apps = [App(redis_url), App(redis_url)]
    scrapes = []
    for app in apps:
        register(app, names, handled)
        scrapes.append(instrument(app).scrape)
    async with contextlib.AsyncExitStack() as stack, anyio.create_task_group() as tasks:
        for app in apps:
            await stack.enter_async_context(app)
        for app, socket, scrape in zip(apps, sockets, scrapes, strict=True):
            await tasks.start(functools.partial(serve_worker_socket, app, socket, metrics=scrape))
        port = await tasks.start(serve_supervisor_http, "127.0.0.1", 0, sockets)
        for n in range(6):
            await apps[0].publish(names.stream, {"n": str(n)})

        async def all_handled() -> bool:
            return len(handled) == 6

        await eventually(all_handled, what="6 entries handled")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            async def samples() -> dict[tuple[str, str], float]:
                text = (await http.get("/metrics")).text
                return {
                    (s.name, s.labels.get("outcome", s.labels.get("consumer", ""))): s.value
                    for family in text_string_to_metric_families(text)
                    for s in family.samples
                    if s.name in ("asyncstreams_processed_total", "asyncstreams_consumer_limit")
                }

            async def all_acked() -> bool:
                return (await samples())[("asyncstreams_processed_total", "acked")] == 6

            await eventually(all_acked, what="the 6 acks counted by the two workers together")
            limits = {k for k in await samples() if k[0] == "asyncstreams_consumer_limit"}
            assert limits == {("asyncstreams_consumer_limit", app.consumer_name) for app in apps}
        tasks.cancel_scope.cancel()


@anyio_test
async def test_the_supervisor_says_so_when_the_workers_have_no_metrics(
    redis_url: str, tmp_path: Path
) -> None:
    (socket,) = worker_sockets(tmp_path, 1)
    async with anyio.create_task_group() as tasks:
        await tasks.start(functools.partial(serve_worker_socket, App(redis_url), socket))
        port = await tasks.start(serve_supervisor_http, "127.0.0.1", 0, [socket])
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            off = await http.get("/metrics")
            assert (off.status_code, off.content) == (404, NO_METRICS)
        # A worker's answers carry its pid.
        reply = await _http.get_unix(socket, "/healthz", timeout=5, max_bytes=1000)
        assert reply.headers[PID_HEADER.lower()] == str(os.getpid())
        tasks.cancel_scope.cancel()


@anyio_test
async def test_a_worker_that_does_not_answer_in_time_is_reported(tmp_path: Path) -> None:
    (socket,) = worker_sockets(tmp_path, 1)
    listener = await anyio.create_unix_listener(socket)  # accepts, and never answers
    async with listener, anyio.create_task_group() as tasks:
        port = await tasks.start(
            functools.partial(serve_supervisor_http, "127.0.0.1", 0, [socket], timeout=0.2)
        )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert await answer(http, "/readyz") == (
                503,
                {
                    "status": "not ready",
                    "workers": [{"worker": 1, "error": "no answer within 0.2 s"}],
                },
            )
        tasks.cancel_scope.cancel()


@contextlib.contextmanager
def worker_process(
    socket: str, url: str, stream: str, jobs: int
) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.apps.health_worker", socket, url, stream, str(jobs)],
        cwd=ROOT,
        preexec_fn=die_with_parent(),
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def test_a_supervisor_of_real_workers_keeps_counting_across_a_restart(
    redis_url: str, names: Names, tmp_path: Path
) -> None:
    sockets = worker_sockets(tmp_path, 2)
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(worker_process(sockets[0], redis_url, names.stream, 3))
        second = stack.enter_context(worker_process(sockets[1], redis_url, names.stream, 4))
        port = stack.enter_context(supervisor_endpoint("127.0.0.1", 0, sockets))
        http = stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5))

        def status(path: str) -> int:
            return http.get(path).status_code

        def series(name: str) -> dict[str, float]:
            families = _exposition.parse(http.get("/metrics").text)
            return {labels: value for (_, labels), value in families[name].samples.items()}

        wait_for(lambda: status("/readyz") == 200, timeout=20, what="both workers ready")
        assert status("/healthz") == 200
        assert series("jobs_total") == {'{queue="q"}': 7}
        assert set(series("in_flight")) == {f'{{pid="{first.pid}"}}', f'{{pid="{second.pid}"}}'}

        second.send_signal(signal.SIGKILL)
        second.wait(10)
        wait_for(lambda: status("/healthz") == 503, what="/healthz 503 without worker 2")
        body = http.get("/healthz").json()
        assert [w["worker"] for w in body["workers"]] == [2]
        assert status("/readyz") == 503
        assert series("jobs_total") == {'{queue="q"}': 7}
        assert set(series("in_flight")) == {f'{{pid="{first.pid}"}}'}

        # A new worker 2 counts from 0 again (1 here): the merged counter goes on from 7.
        third = stack.enter_context(worker_process(sockets[1], redis_url, names.stream, 1))
        wait_for(lambda: status("/readyz") == 200, timeout=20, what="the new worker 2 ready")
        assert series("jobs_total") == {'{queue="q"}': 8}
        assert set(series("in_flight")) == {f'{{pid="{first.pid}"}}', f'{{pid="{third.pid}"}}'}


@pytest.mark.parametrize("workers", [1, 2])
def test_run_with_http_serves_the_routes_of_the_app_or_of_its_workers(
    tmp_path: Path, redis_url: str, names: Names, workers: int
) -> None:
    """`asyncstreams run --http`: one process, or a supervisor answering for its workers,
    with the metrics of `instrument(app)` made for it."""
    port = free_port()
    cli = CliProcess(
        ["run", "tests.apps.ledger_app:app", "--url", redis_url, "--workers", str(workers)],
        env={
            **ledger_env(names, tmp_path / "ledger.jsonl"),
            "ASYNCSTREAMS_HTTP": f"127.0.0.1:{port}",
        },
        log_path=tmp_path / "cli.log",
    )
    client = redis.Redis.from_url(redis_url, decode_responses=True, protocol=2)
    try:

        def get(path: str) -> httpx.Response | None:
            try:
                return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
            except httpx.TransportError:
                return None

        def ready() -> bool:
            response = get("/readyz")
            return response is not None and response.status_code == 200

        wait_until(ready, what="/readyz 200", timeout=30, cli=cli)
        publish(client, names.stream, 40)

        def acked() -> float:
            response = get("/metrics")
            assert response is not None
            assert response.status_code == 200, response.text
            return sum(
                float(line.rpartition(" ")[2])
                for line in response.text.splitlines()
                if line.startswith("asyncstreams_processed_total{") and 'outcome="acked"' in line
            )

        wait_until(lambda: acked() == 40, what="40 acked in /metrics", timeout=30, cli=cli)
        health = get("/healthz")
        assert health is not None
        assert health.status_code == 200
        assert health.json()["status"] == "alive"
        assert stop(cli) == 0, cli.output()
    finally:
        client.close()
        cli.stop()
    assert f"and /metrics{' of 2 workers' if workers == 2 else ''} on 127.0.0.1:{port}" in (
        cli.output()
    )
