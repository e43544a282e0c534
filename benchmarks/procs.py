"""Child processes of the suite: started, read with deadlines, and ended by their own pid."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TypeVar

import msgspec

S = TypeVar("S", bound=msgspec.Struct)
ROOT = Path(__file__).resolve().parent.parent
PR_SET_PDEATHSIG = 1


class ChildError(Exception):
    """Raised when a child exits, fails or times out before saying what was expected."""


def _die_with_parent() -> None:  # runs in the child before exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """A process whose stdout is read line by line; stderr goes to a file shown on failure."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115  # closed in close()
        preexec: Callable[[], None] | None = _die_with_parent if sys.platform == "linux" else None
        self.process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            start_new_session=True,  # a Ctrl-C reaches the suite, which ends its children
            preexec_fn=preexec,
        )
        self._buffer = b""

    @classmethod
    def python(
        cls, module: str, *args: str, name: str, env: Mapping[str, str] | None = None
    ) -> Child:
        return cls([sys.executable, "-m", module, *args], name=name, env=env)

    @property
    def pid(self) -> int:
        return self.process.pid

    def read_line(self, deadline: float) -> str:
        """The next line of stdout; ChildError at EOF or the deadline."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChildError(f"{self.name}: no answer in time (pid {self.pid})")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    code = self.process.wait(5)
                    raise ChildError(f"{self.name}: exited with code {code}: {self.stderr_tail()}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def wait_ready(self, timeout: float) -> None:
        line = self.read_line(time.monotonic() + timeout)
        if line != "READY":
            self._unexpected(line)

    def result(self, kind: type[S], timeout: float) -> S:
        """The RESULT line decoded as `kind`; then the process is waited for."""
        deadline = time.monotonic() + timeout
        line = self.read_line(deadline)
        while line == "READY":
            line = self.read_line(deadline)
        if not line.startswith("RESULT "):
            self._unexpected(line)
        value = msgspec.json.decode(line.removeprefix("RESULT "), type=kind)
        try:
            self.process.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise ChildError(f"{self.name}: did not exit after its result") from None
        return value

    def send_line(self, line: str) -> None:
        assert self.process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.write(line.encode() + b"\n")
            self.process.stdin.flush()

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ChildError(f"{self.name}: still running after {timeout:.0f} s") from None

    def stderr_tail(self, lines: int = 12) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:]) or "(no output on stderr)"

    def _unexpected(self, line: str) -> None:
        raise ChildError(f"{self.name}: unexpected output {line[:200]!r}: {self.stderr_tail()}")

    def close(self) -> None:
        """End the process if it still runs (SIGTERM, then SIGKILL), by its pid."""
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._stderr.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
