"""Health checks and metrics over HTTP, for an orchestrator and for Prometheus.

    GET /healthz  liveness: 200 while no consumer has failed; 503 naming the failure
    GET /readyz   readiness: 200 while the consumers run and Redis answers; 503 otherwise
    GET /metrics  the Prometheus text format of `metrics()`; 404 without one

`serve_http` serves them on a TCP port (what `asyncstreams run --http HOST:PORT` starts),
`asgi_app` as an ASGI app to mount in a web service of your own. Under `--workers N` the
supervisor serves the port: each worker serves the same routes on a unix socket of its own
(`serve_worker_socket`), and the supervisor asks them all at once and answers for the lot
(`serve_supervisor_http`): alive when every worker is, ready when every worker is, and the
workers' metrics merged into one exposition.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.from_thread

from . import _exposition, _http, _transport
from ._http import ASGIApp, Response, Route, json_response
from ._tasks import cancel_and_wait
from .errors import ConfigurationError
from .prometheus import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .prometheus import EXTRA

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("asyncstreams.health")

__all__ = [
    "WORKER_SOCKET_ENV",
    "asgi_app",
    "serve_http",
    "serve_supervisor_http",
    "serve_worker_socket",
    "serving",
    "supervisor_endpoint",
    "worker_sockets",
]

# What makes /metrics: an exposition in the text format, or an awaitable of one (e.g.
# `instrument(app).scrape`, which reads the group figures first).
Metrics = Callable[[], bytes | Awaitable[bytes]]

# Set by a supervisor for each of its workers: the unix socket to serve the routes on.
WORKER_SOCKET_ENV = "_ASYNCSTREAMS_HEALTH_SOCKET"
NO_METRICS = Response(
    404,
    f"no metrics here; they need prometheus_client: {EXTRA}\n".encode(),
    "text/plain; charset=utf-8",
)
# How long /readyz waits for Redis to answer a PING (an orchestrator's probe gives up
# after 1 s by default).
PING_TIMEOUT = 0.5
# How long the supervisor waits for a worker's answer to /healthz and /readyz, and to
# /metrics (which may read the group figures from Redis first), and the largest it reads.
WORKER_TIMEOUT = 1.0
WORKER_METRICS_TIMEOUT = 5.0
MAX_WORKER_REPLY_BYTES = 32 * 1024 * 1024
# A worker's answers carry its pid: the supervisor tells its processes apart by it.
PID_HEADER = "Asyncstreams-Pid"
# How long the servers of `serving` get to stop.
STOP_TIMEOUT = 5.0


# -- one process ----------------------------------------------------------------------------


def liveness(app: App) -> Response:
    """Alive unless a consumer has failed: one of its own tasks raised (Redis refused its
    reads, say; never what a handler raises), which stops the app and is kept as
    `app.failure`. An app starting, running, stopping or stopped cleanly is alive: the event
    loop answered."""
    failure = app.failure
    if failure is None:
        return json_response(200, status="alive", running=app.running)
    return json_response(
        503, status="dead", error=_transport.explain(failure), consumer=app.failed_consumer
    )


async def readiness(app: App) -> Response:
    """Ready once the consumers run (the lifespan entered, every consumer started), while
    none stops or meets an outage and Redis answers a PING (on a connection of its own,
    within PING_TIMEOUT)."""
    if not app.running:
        return _not_ready("not running")
    if app.failure is not None:
        return _not_ready("failed", error=_transport.explain(app.failure))
    consumers = app.consumers
    if not app.started:
        return _not_ready("starting")
    if any(c.ledger.closed for c in consumers):
        return _not_ready("stopping")
    outages = [c.where for c in consumers if c.figures().in_outage]
    if outages:
        return _not_ready("redis unavailable", consumers=outages)
    try:
        await _transport.ping(app.url, PING_TIMEOUT)
    except Exception as exc:
        return _not_ready("redis unavailable", error=_transport.explain(exc))
    return json_response(200, status="ready", consumers=len(consumers))


def _not_ready(reason: str, **details: object) -> Response:
    return json_response(503, status="not ready", reason=reason, **details)


async def exposition(metrics: Metrics | None) -> Response:
    if metrics is None:
        return NO_METRICS
    body = metrics()
    if inspect.isawaitable(body):
        body = await body
    return Response(200, body, METRICS_CONTENT_TYPE)


def app_routes(app: App, metrics: Metrics | None) -> dict[str, Route]:
    async def healthz() -> Response:
        return liveness(app)

    async def readyz() -> Response:
        return await readiness(app)

    async def metrics_() -> Response:
        return await exposition(metrics)

    return {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics_}


async def serve_http(
    app: App,
    host: str | None,
    port: int,
    *,
    metrics: Metrics | None = None,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /healthz, /readyz and /metrics of `app` on `host`:`port` until cancelled.

    `host` None (or "") listens on every interface; `port` 0 on a free port. The port bound
    is given to `task_status.started()` once it listens. `metrics` makes the exposition (e.g.
    `asyncstreams.prometheus.instrument(app).exposition`); without it /metrics is 404.
    """
    await _serve_tcp(host, port, app_routes(app, metrics), task_status)


async def _serve_tcp(
    host: str | None, port: int, routes: dict[str, Route], task_status: anyio.abc.TaskStatus[int]
) -> None:
    try:
        await _http.serve_tcp(
            host, port, functools.partial(_http.route, routes), task_status=task_status
        )
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve HTTP on {host or '*'}:{port} ({exc.strerror or exc}); expected a "
            "local address and a free port"
        ) from None


async def serve_worker_socket(
    app: App,
    path: str,
    *,
    metrics: Metrics | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """`serve_http`'s routes on the unix socket `path` (replacing a socket left there), for
    a supervisor to ask; the socket file is removed when done. Answers carry the pid."""
    await _http.serve_unix(
        path,
        functools.partial(_http.route, app_routes(app, metrics)),
        headers=[(PID_HEADER, str(os.getpid()))],
        task_status=task_status,
    )


def asgi_app(app: App, metrics: Metrics | None = None) -> ASGIApp:
    """The same routes as an ASGI app, to mount in a service of your own; with FastAPI:
    `api.mount("/ops", asgi_app(app))` serves /ops/healthz, /ops/readyz and /ops/metrics."""
    routes = app_routes(app, metrics)
    return _http.asgi(functools.partial(_http.route, routes))


@contextlib.asynccontextmanager
async def serving(
    app: App,
    *,
    http: tuple[str | None, int] | None = None,
    socket: str | None = None,
    metrics: Metrics | None = None,
) -> AsyncIterator[int | None]:
    """Serve `app`'s routes while the block runs, on `http` (host, port) and on the unix
    socket `socket`, each if given; yields the port bound for `http` (None without it).

    For the runner, around `serve_until_signal`: the servers are asyncio tasks of their own,
    so what the block raises comes out as it is, not in an exception group. They start
    before the block (an address in use raises here) and stop after it.
    """
    port: int | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        if http is not None:
            port = await _start(tasks, serve_http, app, *http, metrics=metrics)
        if socket is not None:
            await _start(tasks, serve_worker_socket, app, socket, metrics=metrics)
        yield port
    finally:
        with anyio.CancelScope(shield=True):
            await cancel_and_wait(tasks, STOP_TIMEOUT)


async def _start(
    tasks: list[asyncio.Task[None]],
    serve: Callable[..., Coroutine[Any, Any, None]],
    *args: Any,
    **kwargs: Any,
) -> Any:
    """Run `serve` as a task added to `tasks`; what it gives `task_status.started()`."""
    loop = asyncio.get_running_loop()
    started: asyncio.Future[Any] = loop.create_future()
    task = loop.create_task(serve(*args, task_status=_Started(started), **kwargs))
    tasks.append(task)
    await asyncio.wait([started, task], return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        task.result()  # raises what it failed with
        raise RuntimeError(f"{serve.__name__} returned before it started")
    return started.result()


class _Started(anyio.abc.TaskStatus[Any]):
    def __init__(self, future: asyncio.Future[Any]) -> None:
        self._future = future

    def started(self, value: Any = None) -> None:
        if not self._future.done():
            self._future.set_result(value)


# -- a supervisor and its workers ------------------------------------------------------------


def worker_sockets(directory: str | os.PathLike[str], count: int) -> list[str]:
    """Where each of `count` workers serves its routes, in `directory` (worker 1 first)."""
    return [str(Path(directory, f"worker-{n}.sock")) for n in range(1, count + 1)]


class _Workers:
    """The supervisor's routes: each asks every worker at once and answers for them all."""

    def __init__(self, sockets: Sequence[str], timeout: float, metrics_timeout: float) -> None:
        self._sockets = list(sockets)
        self._timeout = timeout
        self._metrics_timeout = metrics_timeout
        self._parts = [_exposition.WorkerPart() for _ in self._sockets]

    def routes(self) -> dict[str, Route]:
        return {"/healthz": self.healthz, "/readyz": self.readyz, "/metrics": self.metrics}

    async def _ask(self, target: str, timeout: float) -> list[_http.Reply | str]:
        """Each worker's reply to GET `target`, or what kept it from answering."""
        answers: list[_http.Reply | str] = [""] * len(self._sockets)

        async def ask(index: int, path: str) -> None:
            try:
                answers[index] = await _http.get_unix(
                    path, target, timeout=timeout, max_bytes=MAX_WORKER_REPLY_BYTES
                )
            except TimeoutError:
                answers[index] = f"no answer within {timeout:g} s"
            except (OSError, _http.BadReply) as exc:
                answers[index] = f"no answer ({_transport.explain(exc)})"

        async with anyio.create_task_group() as asking:
            for index, path in enumerate(self._sockets):
                asking.start_soon(ask, index, path)
        return answers

    async def healthz(self) -> Response:
        return await self._all("/healthz", "alive", "dead")

    async def readyz(self) -> Response:
        return await self._all("/readyz", "ready", "not ready")

    async def _all(self, target: str, good: str, bad: str) -> Response:
        answers = await self._ask(target, self._timeout)
        failing = [
            _failing(number, answer)
            for number, answer in enumerate(answers, 1)
            if not (isinstance(answer, _http.Reply) and answer.status == 200)
        ]
        if failing:
            return json_response(503, status=bad, workers=failing)
        return json_response(200, status=good, workers=len(answers))

    async def metrics(self) -> Response:
        answers = await self._ask("/metrics", self._metrics_timeout)
        parts: list[_exposition.Families] = []
        statuses = set()
        for number, (part, answer) in enumerate(zip(self._parts, answers, strict=True), 1):
            if isinstance(answer, _http.Reply):
                statuses.add(answer.status)
                if answer.status == 200:
                    try:
                        families = _exposition.parse(answer.body.decode())
                    except (UnicodeDecodeError, ValueError) as exc:
                        log.warning("worker %d: its metrics could not be read (%s)", number, exc)
                    else:
                        parts.append(
                            part.answered(answer.headers.get(PID_HEADER.lower(), ""), families)
                        )
                        continue
            parts.append(part.silent())
        if 404 in statuses and 200 not in statuses:
            return NO_METRICS
        return Response(200, _exposition.render(_exposition.merge(parts)), METRICS_CONTENT_TYPE)


def _failing(number: int, answer: _http.Reply | str) -> dict[str, object]:
    if isinstance(answer, str):
        return {"worker": number, "error": answer}
    try:
        said = json.loads(answer.body)
    except ValueError:
        said = answer.body[:200].decode(errors="replace")
    return {"worker": number, "status": answer.status, "answer": said}


async def serve_supervisor_http(
    host: str | None,
    port: int,
    sockets: Sequence[str],
    *,
    timeout: float = WORKER_TIMEOUT,
    metrics_timeout: float = WORKER_METRICS_TIMEOUT,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /healthz, /readyz and /metrics for the workers that serve theirs on `sockets`
    (`serve_worker_socket`; worker 1 first), on `host`:`port` until cancelled.

    Each request asks every worker at once, waiting up to `timeout` seconds for each
    (`metrics_timeout` for /metrics).
    /healthz and /readyz are 200 when every worker's is, else 503 listing the others with
    what they said (or why they did not answer). /metrics merges the workers' expositions
    (see `asyncstreams._exposition`); a worker that does not answer keeps its counters at
    their last values.
    """
    workers = _Workers(sockets, timeout, metrics_timeout)
    await _serve_tcp(host, port, workers.routes(), task_status)


@contextlib.contextmanager
def supervisor_endpoint(
    host: str | None,
    port: int,
    sockets: Sequence[str],
    *,
    timeout: float = WORKER_TIMEOUT,
    metrics_timeout: float = WORKER_METRICS_TIMEOUT,
) -> Iterator[int]:
    """`serve_supervisor_http` in a thread of its own (with its own event loop) while the
    block runs, for a supervisor that has none; yields the port bound."""
    serve = functools.partial(
        serve_supervisor_http,
        host,
        port,
        sockets,
        timeout=timeout,
        metrics_timeout=metrics_timeout,
    )
    with anyio.from_thread.start_blocking_portal(name="asyncstreams http") as portal:
        future, bound = portal.start_task(serve, name="asyncstreams http")
        try:
            yield bound
        finally:
            future.cancel()
