"""`asyncstreams run --reload`: a thread that watches the .py files under a folder with
watchfiles and keeps what changed until the supervisor's watch loop asks (runner.py), which
then restarts the app as SIGHUP does: gracefully, one process at a time."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from .errors import ConfigurationError

log = logging.getLogger("asyncstreams.runner")

INSTALL = 'pip install "asyncstreams[reload]"'
# How long the watcher may take to set itself up (inotify on every folder of the tree).
READY_TIMEOUT = 10.0
# How often the watching thread looks at its stop event when nothing changes.
TIMEOUT_MS = 200


def check_installed() -> None:
    """Raise ConfigurationError, naming the extra, when watchfiles is not installed."""
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            f"--reload needs watchfiles, which is not installed; install it with: {INSTALL}"
        ) from None


class Watcher:
    """Watches the .py files under `root` (watchfiles' PythonFilter: .py, .pyx and .pyd, not
    in .git, __pycache__, .venv, node_modules and the like) from a thread of its own."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._changed: set[str] = set()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="asyncstreams reload", daemon=True)
        self._failure: BaseException | None = None

    def start(self) -> None:
        """Start watching; returns once changes from now on will be seen."""
        check_installed()
        # watchfiles logs each change at INFO; the supervisor says what it does about it.
        logging.getLogger("watchfiles").setLevel(logging.WARNING)
        self._thread.start()
        if not self._ready.wait(READY_TIMEOUT) or self._failure is not None:
            self.stop()
            raise ConfigurationError(
                f"--reload: cannot watch {self.root}: {self._failure or 'no answer in time'}"
            )
        log.info("watching for changes to .py files under %s", self.root)

    def take(self) -> list[str]:
        """The files changed since the last call, relative to `root`, sorted."""
        with self._lock:
            changed, self._changed = self._changed, set()
        return sorted(os.path.relpath(path, self.root) for path in changed)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(READY_TIMEOUT)

    def _watch(self) -> None:
        import watchfiles

        try:
            # A timeout yields an empty set: the first yield says the watcher is set up.
            for changes in watchfiles.watch(
                Path(self.root),
                watch_filter=watchfiles.PythonFilter(),
                stop_event=self._stop,
                rust_timeout=TIMEOUT_MS,
                yield_on_timeout=True,
                raise_interrupt=False,
            ):
                self._ready.set()
                if changes:
                    with self._lock:
                        self._changed.update(path for _, path in changes)
        except Exception as exc:  # the tree cannot be watched (any more)
            if self._ready.is_set():
                log.error("--reload: stopped watching %s: %s", self.root, exc)
            self._failure = exc
            self._ready.set()
