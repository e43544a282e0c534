"""The supervisor of `asyncstreams run --workers N` (and of `--reload`): it starts the
worker processes, passes stop signals on, restarts a worker that died (with a growing
pause), restarts them all one at a time on SIGHUP or, with `--reload`, on a change to a
.py file, and gives up on a worker that keeps dying.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from types import FrameType

from . import health
from ._backoff import Backoff
from ._process import die_with_parent
from ._reload import Watcher
from ._run_options import environment_names
from .runner import (
    CLI_STOP_SIGNALS,
    STOP_SIGNALS,
    WORKER_READY_FD_ENV,
    WORKER_URL_ENV,
    RunConfig,
    embedded_redis,
    loop_factory,
)

log = logging.getLogger("asyncstreams.runner")

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

    With `config.reload`, a change to a .py file under the working folder restarts the
    workers as SIGHUP does, and a worker that exits by itself, before or after it started,
    waits for the next change to start again (the code must be fixed first).
    """
    loop_factory(config.loop)  # --loop uvloop without uvloop: say so once, not per worker
    with embedded_redis(config) as url, contextlib.ExitStack() as stack:
        env = _worker_env()
        if url is not None:
            env[WORKER_URL_ENV] = url
        command = _worker_command(config)
        # With --http, each worker answers on a unix socket of its own (in a private folder)
        # and this process on HOST:PORT for them all (asyncstreams.health).
        sockets: list[str | None] = [None] * config.workers
        if config.http is not None:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="asyncstreams-"))
            paths = health.worker_sockets(folder, config.workers)
            port = stack.enter_context(health.supervisor_endpoint(*config.http, paths))
            log.info(
                "serving /healthz, /readyz and /metrics of %d workers on %s:%d",
                config.workers,
                config.http[0] or "*",
                port,
            )
            sockets = list(paths)
        workers = [
            _Worker(
                index,
                command,
                env if path is None else {**env, health.WORKER_SOCKET_ENV: path},
            )
            for index, path in enumerate(sockets, start=1)
        ]
        received: list[int] = []

        def on_signal(signum: int, frame: FrameType | None) -> None:
            received.append(signum)  # acted on by the watch loop, within WATCH_INTERVAL

        watcher = Watcher(os.getcwd()) if config.reload else None
        previous = {sig: signal.signal(sig, on_signal) for sig in CLI_STOP_SIGNALS}
        try:
            if watcher is not None:
                watcher.start()  # before the workers: no change after their import is missed
            for worker in workers:
                worker.start()
                log.info("started worker %d (pid %d)", worker.index, worker.pid)
            return _Supervisor(workers, received, watcher).watch()
        finally:
            if watcher is not None:
                watcher.stop()
            for sig, old in previous.items():
                signal.signal(sig, old)


def _worker_command(config: RunConfig) -> list[str]:
    """A worker's command line: the supervisor's settings, given as flags."""
    command = [sys.executable, "-m", "asyncstreams", "run", config.target]
    command += ["--log-level", config.log_level, "--log-format", config.log_format]
    command += ["--loop", config.loop]
    if config.grace_period is not None:
        command += ["--grace-period", repr(config.grace_period)]
    return command


def _worker_env() -> dict[str, str]:
    """The supervisor's environment, less the variables of `run`'s options: a worker is
    told its settings as flags, and must not take ASYNCSTREAMS_WORKERS (or _EMBEDDED, or
    _RELOAD) from there as its own. ASYNCSTREAMS_URL stays: the App reads it."""
    ours = environment_names()
    return {name: value for name, value in os.environ.items() if name not in ours}


class _Supervisor:
    """The watch loop of `supervise`: signals, exits, restarts, SIGHUP restarts."""

    def __init__(
        self, workers: list[_Worker], received: list[int], watcher: Watcher | None = None
    ) -> None:
        self.workers = workers
        self.received = received  # appended to by the signal handler
        self.watcher = watcher  # --reload: the changed files, when asked
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
            if self.watcher is not None:
                self._on_change(self.watcher.take())
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
            self._restart_all()
            return
        self.stop_signals += 1
        self.stopping = True
        for worker in self.workers:
            # A worker stopping for a SIGHUP restart was sent SIGTERM already: this
            # signal counts as the first for it too, not as a second that stops it now.
            if worker.signals_sent < self.stop_signals:
                worker.send(signum)

    def _on_change(self, changed: list[str]) -> None:
        """--reload: .py files changed; restart the workers as SIGHUP does, and start
        those that wait for a change."""
        if not changed or self.stopping:
            return
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if changed[3:] else "")
        count = len(self.workers)
        what = "the app" if count == 1 else f"the {count} workers one at a time"
        log.info("changed: %s; restarting %s", shown, what)
        self._restart_all()

    def _restart_all(self) -> None:
        """Restart the workers started before now, one at a time (`_reload_next`), and
        start at once those that wait for a change (--reload)."""
        now = time.monotonic()
        self.reload_at = now
        for worker in self.workers:
            if worker.process is None and worker.restart_at == math.inf:
                worker.restart_at = now

    def _on_exit(self, worker: _Worker, code: int) -> None:
        pid = worker.pid
        now = time.monotonic()
        uptime = now - worker.started_at
        worker.process = None
        if worker.replacing:
            log.info("worker %d (pid %d) stopped with code %d", worker.index, pid, code)
            worker.restart_at = now
            return
        if self.watcher is not None:
            log.error(
                "worker %d (pid %d) exited with code %d; it starts again once a .py file changes",
                worker.index,
                pid,
                code,
            )
            worker.restart_at = math.inf
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
