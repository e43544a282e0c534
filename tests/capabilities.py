"""What the suite's redis-server binary can do, found out by trying it.

The suite runs one binary: $ASYNCSTREAMS_TEST_REDIS_SERVER, else the one `EmbeddedRedis`
finds (redis-server on PATH, else the Redis 6.2 of the `embedded` extra), as the session's
`redis_server` fixture does. A test that needs what only some builds have (TLS is a build
option, and the `embedded` extra's binary was built without it) asks here, and is skipped
with the binary's own refusal as the reason when it lacks it. Anything else that goes wrong
while asking is a failure, not a skip.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

from asyncstreams.embedded import find_redis_server, free_port

PROBE_TIMEOUT = 10.0
# What a redis-server built without TLS says when started with --tls-port: Redis 6 and 7.0
# do not know the option at all; 7.2 and later know it but have no TLS connection type.
NO_TLS = ("Bad directive or wrong number of arguments", "Missing implement of connection type")


def server_binary() -> str:
    """The redis-server binary the suite runs."""
    return os.environ.get("ASYNCSTREAMS_TEST_REDIS_SERVER") or find_redis_server()


@functools.cache
def server_version(binary: str) -> str:
    """The version `binary --version` reports, e.g. "6.2.14"."""
    done = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=True
    )
    for word in done.stdout.split():
        if word.startswith("v="):
            return word.removeprefix("v=")
    raise AssertionError(f"{binary} --version printed no version: {done.stdout!r}")


@functools.cache
def tls_missing(binary: str, cert: Path, key: Path, ca: Path) -> str | None:
    """None when `binary` serves TLS with this certificate; otherwise why not, for a skip.

    Starts it with only a TLS port (no plain one) and PINGs it over TLS. A binary that
    refuses the TLS options as a build without TLS does is reported; one that fails in any
    other way (a bad certificate, a crash, no answer) fails the caller. Cached, so a session
    asks once.
    """
    with tempfile.TemporaryDirectory(prefix="asyncstreams-tls-probe-") as directory:
        port = free_port()
        output = Path(directory) / "redis.out"
        command = [
            binary,
            "--port", "0",
            "--tls-port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", directory,
            "--tls-cert-file", str(cert),
            "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(ca),
            "--tls-auth-clients", "no",
        ]  # fmt: skip
        with output.open("wb") as out:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + PROBE_TIMEOUT
            while not _tls_ping(port, ca):
                if process.poll() is not None:
                    said = output.read_text(errors="replace")
                    refusal = _refusal(said)
                    if refusal is None:
                        raise AssertionError(
                            f"{binary} exited when started with TLS options:\n{said[-2000:]}"
                        )
                    return (
                        f"the suite's redis-server ({binary}, Redis {server_version(binary)}) "
                        f"has no TLS: started with --tls-port it said {refusal}. TLS is a "
                        "build option (BUILD_TLS=yes); point $ASYNCSTREAMS_TEST_REDIS_SERVER "
                        "at a redis-server built with it, or put one on PATH"
                    )
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"{binary} started with TLS options did not answer over TLS "
                        f"within {PROBE_TIMEOUT} s"
                    )
                time.sleep(0.05)
            return None
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _refusal(output: str) -> str | None:
    """The line of a redis-server's output that refuses TLS as a build without it does."""
    if "tls" not in output.lower():
        return None
    lines = [line.strip() for line in output.splitlines()]
    for index, line in enumerate(lines):
        if any(words in line for words in NO_TLS):
            # Redis 6 names the option it refused on the line before: >>> 'tls-port "6380"'
            before = lines[index - 1] if index else ""
            return f"{before.removeprefix('>>> ')}: {line}" if before.startswith(">>>") else line
    return None


def _tls_ping(port: int, ca: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca))
    with (
        contextlib.suppress(OSError),  # not listening yet, or not speaking TLS
        socket.create_connection(("127.0.0.1", port), timeout=1.0) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"PING\r\n")
        return tls.recv(64).startswith(b"+PONG")
    return False
