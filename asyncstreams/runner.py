"""The process edge: event loop choice, signals, worker processes, exit codes.

Only this module installs signal handlers, always on the main thread, restoring what was
there afterwards. First SIGINT/SIGTERM (and, from the CLI, SIGHUP): graceful stop. Second:
stop now. A supervisor of `--workers` takes SIGHUP as "restart the workers one at a time".
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
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType

import anyio

from ._backoff import Backoff
from ._process import die_with_parent
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
# A worker that exits after it started is restarted after a pause: up to RESTART_DELAY s the
# first time, doubling with each exit up to RESTART_MAX_DELAY (each pause drawn from the
# upper half of its range, so that workers that died together do not start together). A
# worker that ran for RESTART_RESET_AFTER seconds starts again from the first pause. One that
# exits GIVE_UP_EXITS times within GIVE_UP_WINDOW seconds stops the supervisor: it would only
# die again.
RESTART_DELAY = 0.5
RESTART_MAX_DELAY = 30.0
RESTART_RESET_AFTER = 60.0
GIVE_UP_EXITS = 5
GIVE_UP_WINDOW = 60.0
WATCH_INTERVAL = 0.05


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


# -- workers ---------------------------------------------------------------------------


class _Worker:
    """One worker process of a supervisor: its process, its readiness pipe, its restarts."""

    def __init__(self, index: int, command: list[str], env: dict[str, str]) -> None:
        self.index = index
        self._command = command
        self._env = env
        self.process: subprocess.Popen[bytes] | None = None  # None: waiting to be restarted
        self.ready = False
        self.ever_ready = False  # this slot ran once: failing to start again is a restart
        self._pipe = -1
        self.started_at = 0.0
        self.signals_sent = 0  # stop signals sent to the current process
        self.replacing = False  # stopped by a SIGHUP restart, to be replaced at once
        self.restart_at = 0.0
        self.exits: deque[float] = deque()
        self.backoff = Backoff(base=RESTART_DELAY, cap=RESTART_MAX_DELAY)

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
        self.signals_sent = 0
        self.replacing = False

    def poll(self) -> int | None:
        """The exit code once the worker has exited; notes readiness on the way."""
        assert self.process is not None
        if not self.ready and self._pipe >= 0:
            with contextlib.suppress(BlockingIOError):
                if os.read(self._pipe, 1):
                    self.ready = self.ever_ready = True
        code = self.process.poll()
        if code is not None and self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1
        return code

    def send(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.signals_sent += 1
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


def supervise(config: RunConfig) -> int:
    """Run `config.workers` processes of the app, each with its own consumers.

    SIGINT or SIGTERM is passed on to every worker (twice: stop now); the exit code is 0 when
    all stopped cleanly. SIGHUP restarts the workers one at a time. A worker that dies before
    it ever started stops them all (the others would fail the same way), with its exit code.
    One that dies later is restarted with a growing pause; if it keeps dying (GIVE_UP_EXITS
    exits within GIVE_UP_WINDOW seconds) all are stopped and the exit code is 1.
    """
    loop_factory(config.loop)  # --loop uvloop without uvloop: say so once, not per worker
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
            received.append(signum)  # acted on by the watch loop, within WATCH_INTERVAL

        previous = {sig: signal.signal(sig, on_signal) for sig in CLI_STOP_SIGNALS}
        try:
            for worker in workers:
                worker.start()
                log.info("started worker %d (pid %d)", worker.index, worker.pid)
            return _Supervisor(workers, received).watch()
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


class _Supervisor:
    """The watch loop of `supervise`: signals, exits, restarts, SIGHUP restarts."""

    def __init__(self, workers: list[_Worker], received: list[int]) -> None:
        self.workers = workers
        self.received = received  # appended to by the signal handler
        self.handled = 0  # how many of `received` were acted on
        self.stop_signals = 0  # SIGINT/SIGTERM received: the second stops the workers now
        self.stopping = False
        self.exit_code: int | None = None  # set when the supervisor stops all on its own
        self.codes: list[int] = []  # exit codes of the workers that stopped with the rest
        self.reload_at: float | None = None  # workers started before it are to be restarted

    def watch(self) -> int:
        running = set(self.workers)
        while running:
            time.sleep(WATCH_INTERVAL)
            while self.handled < len(self.received):
                self.handled += 1
                self._on_signal(signal.Signals(self.received[self.handled - 1]))
            for worker in list(running):
                if worker.process is None:
                    if self.stopping:
                        running.discard(worker)
                    elif time.monotonic() >= worker.restart_at:
                        worker.start()
                        log.info("restarted worker %d (pid %d)", worker.index, worker.pid)
                    continue
                code = worker.poll()
                if code is None:
                    continue
                if self.stopping:
                    # A worker still starting has no signal handlers yet: the stop signal
                    # passed on to it ends it outright, which is a clean stop all the same.
                    stopped_early = not worker.ready and -code in STOP_SIGNALS
                    self.codes.append(0 if stopped_early else code)
                    running.discard(worker)
                else:
                    self._on_exit(worker, code)
            if not self.stopping:
                self._reload_next()
        if self.exit_code is not None:
            return self.exit_code
        return 0 if all(code == 0 for code in self.codes) else 1

    def _on_signal(self, signum: signal.Signals) -> None:
        if signum == signal.SIGHUP:
            if self.stopping:
                log.info("SIGHUP received while stopping: ignored")
                return
            log.info("SIGHUP received: restarting the %d workers one at a time", len(self.workers))
            self.reload_at = time.monotonic()
            return
        self.stop_signals += 1
        self.stopping = True
        for worker in self.workers:
            # A worker stopping for a SIGHUP restart was sent SIGTERM already: this
            # signal counts as the first for it too, not as a second that stops it now.
            if worker.signals_sent < self.stop_signals:
                worker.send(signum)

    def _on_exit(self, worker: _Worker, code: int) -> None:
        pid = worker.pid
        now = time.monotonic()
        uptime = now - worker.started_at
        worker.process = None
        if worker.replacing:
            log.info("worker %d (pid %d) stopped with code %d", worker.index, pid, code)
            worker.restart_at = now
            return
        if not worker.ever_ready:
            log.error(
                "worker %d (pid %d) exited with code %d before it started; stopping all",
                worker.index,
                pid,
                code,
            )
            self._stop_all(code if code > 0 else 1)  # 1 for a signal (negative) or 0
            return
        worker.exits.append(now)
        while worker.exits[0] < now - GIVE_UP_WINDOW:
            worker.exits.popleft()
        if len(worker.exits) >= GIVE_UP_EXITS:
            log.error(
                "worker %d (pid %d) exited %d times within %.1f s, the last time with code %d; "
                "giving up: stopping all workers",
                worker.index,
                pid,
                len(worker.exits),
                now - worker.exits[0],
                code,
            )
            self._stop_all(1)
            return
        if uptime >= RESTART_RESET_AFTER:
            worker.backoff.reset()
        delay = worker.backoff.next_delay()
        worker.restart_at = now + delay
        log.error(
            "worker %d (pid %d) exited with code %d after %.1f s; restarting it in %.1f s",
            worker.index,
            pid,
            code,
            uptime,
            delay,
        )

    def _stop_all(self, code: int) -> None:
        self.exit_code = code
        self.stopping = True
        for worker in self.workers:
            if worker.signals_sent == 0:
                worker.send(signal.SIGTERM)

    def _reload_next(self) -> None:
        """SIGHUP: SIGTERM one worker started before it; the next once its new one runs."""
        if self.reload_at is None:
            return
        if not all(
            worker.process is not None and worker.ready and not worker.replacing
            for worker in self.workers
        ):
            return  # one is stopping, starting or waiting for its restart: one at a time
        due = [worker for worker in self.workers if worker.started_at < self.reload_at]
        if not due:
            log.info("restarted all %d workers", len(self.workers))
            self.reload_at = None
            return
        worker = due[0]
        log.info("restarting worker %d (pid %d): SIGTERM sent", worker.index, worker.pid)
        worker.replacing = True
        worker.send(signal.SIGTERM)
