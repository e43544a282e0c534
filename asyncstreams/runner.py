"""The process edge: event loop choice, signals, worker processes, exit codes.

Only this module installs signal handlers, always on the main thread, restoring what was
there afterwards. First SIGINT/SIGTERM (and, from the CLI, SIGHUP): graceful stop. Second:
stop now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType

import anyio

from ._process import die_with_parent
from .app import App, OnStarted
from .embedded import EmbeddedRedis
from .errors import AsyncstreamsError, ConfigurationError

log = logging.getLogger("asyncstreams.runner")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# `asyncstreams run` also stops on SIGHUP, as uvicorn does; `App.run()` leaves SIGHUP alone.
CLI_STOP_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)
# Set by a supervisor for its workers: the URL to use (as if given with --url; kept off the
# command line, where `ps` would show a password) and a pipe to write one byte to once started.
WORKER_URL_ENV = "_ASYNCSTREAMS_WORKER_URL"
WORKER_READY_FD_ENV = "_ASYNCSTREAMS_READY_FD"
RESTART_INTERVAL = 1.0


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
    loop: str = "auto"


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
    started = False

    def on_started() -> None:
        nonlocal started
        started = True
        if ready_fd is not None:
            _announce(int(ready_fd))

    factory = loop_factory(config.loop)
    with _embedded_redis(config) as url:
        app.configure(url=url, grace_period=config.grace_period)
        status = OnStarted(on_started)
        try:
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(serve_until_signal(app, signals=CLI_STOP_SIGNALS, task_status=status))
        except ForcedStop as exc:
            log.warning("%s", exc)
            return 1
        except Exception as exc:
            if not started:
                raise
            log.error("the app failed while running: %s; exiting with code 1", _failure(exc))
            return 1
    return 0


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
def _embedded_redis(config: RunConfig) -> Iterator[str | None]:
    if not config.embedded:
        yield config.url
        return
    with EmbeddedRedis() as server:
        log.info("embedded redis-server %s on %s (pid %d)", server.binary, server.url, server.pid)
        yield server.url


# -- workers ---------------------------------------------------------------------------


class _Worker:
    """One worker process of a supervisor, and the pipe it reports readiness on."""

    def __init__(self, index: int, command: list[str], env: dict[str, str]) -> None:
        self.index = index
        self._command = command
        self._env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.ready = False
        self._pipe = -1
        self.started_at = 0.0

    def start(self) -> None:
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        env = {**self._env, WORKER_READY_FD_ENV: str(write_end)}
        try:
            self.process = subprocess.Popen(
                self._command,
                env=env,
                pass_fds=(write_end,),
                start_new_session=True,  # Ctrl-C reaches the supervisor, which forwards it
                preexec_fn=die_with_parent(),
            )
        finally:
            os.close(write_end)
        self.ready = False
        self._pipe = read_end
        self.started_at = time.monotonic()

    def poll(self) -> int | None:
        """The exit code once the worker has exited; notes readiness on the way."""
        if not self.ready and self._pipe >= 0:
            with contextlib.suppress(BlockingIOError):
                if os.read(self._pipe, 1):
                    self.ready = True
        assert self.process is not None
        code = self.process.poll()
        if code is not None and self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1
        return code

    def send(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


def supervise(config: RunConfig) -> int:
    """Run `config.workers` processes of the app, each with its own consumers.

    A worker that dies after starting is restarted, with an error logged. A worker that dies
    before starting stops them all: the others would fail the same way. SIGINT or SIGTERM is
    passed on to every worker (twice: stop now); the exit code is 0 when all stopped cleanly.
    """
    command = [sys.executable, "-m", "asyncstreams", "run", config.target]
    command += ["--log-level", config.log_level, "--loop", config.loop]
    if config.grace_period is not None:
        command += ["--grace-period", repr(config.grace_period)]
    with _embedded_redis(config) as url:
        env = dict(os.environ)
        if url is not None:
            env[WORKER_URL_ENV] = url
        workers = [_Worker(index, command, env) for index in range(1, config.workers + 1)]
        received: list[int] = []

        def on_signal(signum: int, frame: FrameType | None) -> None:
            received.append(signum)
            for worker in workers:
                worker.send(signum)

        previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
        try:
            for worker in workers:
                worker.start()
                log.info("started worker %d (pid %d)", worker.index, worker.pid)
            return _watch(workers, received)
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def _watch(workers: list[_Worker], received: list[int]) -> int:
    running = {worker.index: worker for worker in workers}
    failed_to_start: int | None = None
    codes: list[int] = []
    while running:
        time.sleep(0.05)
        for worker in list(running.values()):
            code = worker.poll()
            if code is None:
                continue
            if received or failed_to_start is not None:
                codes.append(code)
                del running[worker.index]
            elif not worker.ready:
                log.error(
                    "worker %d (pid %d) exited with code %d before it started; stopping all",
                    worker.index,
                    worker.pid,
                    code,
                )
                failed_to_start = code or 1
                del running[worker.index]
                for other in running.values():
                    other.send(signal.SIGTERM)
            else:
                log.error(
                    "worker %d (pid %d) exited with code %d; restarting it",
                    worker.index,
                    worker.pid,
                    code,
                )
                # At most one restart a second: a worker that keeps dying must not spin.
                time.sleep(max(0.0, worker.started_at + RESTART_INTERVAL - time.monotonic()))
                if received:  # a stop signal came meanwhile: it was not sent to this one
                    del running[worker.index]
                    continue
                worker.start()
                log.info("restarted worker %d (pid %d)", worker.index, worker.pid)
                if received:  # the signal came between the check and the start
                    worker.send(received[-1])
    if failed_to_start is not None:
        return failed_to_start
    return 0 if all(code == 0 for code in codes) else 1
