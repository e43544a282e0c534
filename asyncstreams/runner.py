"""The process edge: event loop choice, signals, exit codes; the supervisor of worker
processes is in _supervisor.py.

Only these two modules install signal handlers, always on the main thread, restoring what
was there afterwards. First SIGINT/SIGTERM (and, from the CLI, SIGHUP): graceful stop. Second:
stop now. A supervisor of `--workers` takes SIGHUP as "restart the workers one at a time",
and so does one of `--reload` a change to a .py file.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import anyio

from . import health, prometheus
from .app import App, OnStarted
from .embedded import EmbeddedCluster, EmbeddedRedis
from .errors import AsyncstreamsError, ConfigurationError

log = logging.getLogger("asyncstreams.runner")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# `asyncstreams run` also stops on SIGHUP, as uvicorn does; `App.run()` leaves SIGHUP alone.
CLI_STOP_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)
# Set by a supervisor for its workers: the URL to use (as if given with --url; kept off the
# command line, where `ps` would show a password) and a pipe to write one byte to once started.
WORKER_URL_ENV = "_ASYNCSTREAMS_WORKER_URL"
WORKER_READY_FD_ENV = "_ASYNCSTREAMS_READY_FD"


class ForcedStop(AsyncstreamsError):
    """Raised when a second signal stopped the app before its handlers finished."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Process-level settings: the CLI's flags, and nothing a consumer option already says."""

    target: str
    url: str | None = None
    workers: int = 1
    log_level: str = "info"
    grace_period: float | None = None
    embedded: bool = False
    embedded_cluster: bool = False
    loop: str = "auto"
    reload: bool = False
    log_format: str = "text"
    http: tuple[str | None, int] | None = None  # (host, port) of /healthz, /readyz, /metrics


def loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """`auto`: uvloop where it is installed; `uvloop`: uvloop or an error; `asyncio`: plain."""
    if loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if loop == "uvloop":
            raise ConfigurationError("--loop uvloop: uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


async def serve_until_signal(
    app: App,
    *,
    signals: tuple[signal.Signals, ...] = STOP_SIGNALS,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` until cancelled or signalled; raises ForcedStop after a second signal."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        name = signal.Signals(signum).name
        if len(received) == 1:
            log.info(
                "%s received: stopping; handlers get up to %.1f s to finish "
                "(send it again to stop now)",
                name,
                app.grace_period,
            )
            app.stop()
        else:
            log.warning(
                "%s received again: stopping now; running handlers are cancelled and "
                "their entries stay pending",
                name,
            )
            main.cancel()

    with _loop_signal_handlers(loop, signals, on_signal):
        try:
            await app.serve(task_status=task_status)
        except asyncio.CancelledError:
            if len(received) < 2:
                raise
            main.uncancel()
            raise ForcedStop("stopped by a second signal before handlers finished") from None


@contextlib.contextmanager
def _loop_signal_handlers(
    loop: asyncio.AbstractEventLoop,
    signals: tuple[signal.Signals, ...],
    handler: Callable[[int], None],
) -> Iterator[None]:
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        loop.add_signal_handler(sig, handler, sig)
    try:
        yield
    finally:
        for sig, old in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, old)


def run(app: App, config: RunConfig) -> int:
    """Run `app` in this process until signalled; returns the exit code.

    Errors before the app has started are raised. Once it has started, a second signal
    returns 1, and so does a failure of the app, logged in one line that names it and where
    it was raised (a consumer that failed has logged its traceback already).
    """
    ready_fd = os.environ.pop(WORKER_READY_FD_ENV, None)
    # A worker of a supervisor serving --http answers its routes on this unix socket.
    health_socket = os.environ.pop(health.WORKER_SOCKET_ENV, None)
    metrics = app_metrics(app) if config.http or health_socket else None
    started = False

    def on_started() -> None:
        nonlocal started
        started = True
        if ready_fd is not None:
            _announce(int(ready_fd))

    factory = loop_factory(config.loop)
    with embedded_redis(config) as url:
        app.configure(url=url, grace_period=config.grace_period)
        status = OnStarted(on_started)
        try:
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(_serve(app, config, status, health_socket, metrics))
        except ForcedStop as exc:
            log.warning("%s", exc)
            return 1
        except Exception as exc:
            if not started:
                raise
            log.error("the app failed while running: %s; exiting with code 1", _failure(exc))
            return 1
    return 0


async def _serve(
    app: App,
    config: RunConfig,
    status: OnStarted,
    socket: str | None,
    metrics: health.Metrics | None,
) -> None:
    """`serve_until_signal`, with the health routes served meanwhile where asked for."""
    async with health.serving(app, http=config.http, socket=socket, metrics=metrics) as port:
        if config.http is not None:
            log.info(
                "serving /healthz, /readyz and /metrics on %s:%d%s",
                config.http[0] or "*",
                port,
                "" if metrics is not None else f" (no metrics: {prometheus.EXTRA})",
            )
        await serve_until_signal(app, signals=CLI_STOP_SIGNALS, task_status=status)


def app_metrics(app: App) -> health.Metrics | None:
    """What /metrics serves: the app's Prometheus metrics (`instrument(app)`, made now if the
    app's code did not), or None where prometheus_client is not installed."""
    if importlib.util.find_spec("prometheus_client") is None:
        return None
    metrics = prometheus.metrics_of(app) or prometheus.instrument(app)
    return metrics.scrape


def _failure(exc: BaseException) -> str:
    """`Type: message (at file:line in function)`, where the innermost frame raised it."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return text
    where = frames[-1]
    return f"{text} (at {display_path(where.filename)}:{where.lineno} in {where.name})"


def display_path(filename: str) -> str:
    """`filename` relative to the working directory when it is under it."""
    relative = os.path.relpath(filename)
    return filename if relative.startswith("..") else relative


def _announce(fd: int) -> None:
    """Readiness for a supervisor: one byte down the pipe it gave us."""
    with contextlib.suppress(OSError):
        os.write(fd, b"1")
        os.close(fd)


@contextlib.contextmanager
def embedded_redis(config: RunConfig) -> Iterator[str | None]:
    if config.embedded_cluster:
        with EmbeddedCluster() as cluster:
            log.info(
                "embedded redis cluster of %d masters (redis-server %s) on %s (ports %s; pids %s)",
                cluster.masters,
                cluster.binary,
                cluster.url,
                ", ".join(str(node.port) for node in cluster.nodes),
                ", ".join(str(pid) for pid in cluster.pids),
            )
            yield cluster.url
        return
    if not config.embedded:
        yield config.url
        return
    with EmbeddedRedis() as server:
        log.info("embedded redis-server %s on %s (pid %d)", server.binary, server.url, server.pid)
        yield server.url
