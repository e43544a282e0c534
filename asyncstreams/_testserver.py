"""The test server of `asyncstreams.testing`: one private redis-server per process, started on
first use and stopped at exit by its pid, and its databases lent out one at a time.

Per process, not per machine: each pytest-xdist worker is a process of its own, so it gets a
server of its own, and nothing is shared between workers. A process made by `fork` starts
afresh: the parent's server stays the parent's (neither used nor stopped by the child).

Isolation is a database per `TestApp` (or `asyncstreams_url` fixture): databases 1 to
DATABASES - 1 are lent out, each emptied (FLUSHDB) when lent, and given back when done;
database 0 is never lent, for whoever uses the server's own URL directly.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from .embedded import EmbeddedRedis
from .errors import AsyncstreamsError

# The server's number of databases (redis-server --databases); all but 0 are lent out.
DATABASES = 64
# Which redis-server to run; unset: the one on PATH, else the `embedded` extra's.
BINARY_ENV = "ASYNCSTREAMS_TEST_REDIS_SERVER"


class _State:
    """This process's server and which of its databases are lent out."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.server: EmbeddedRedis | None = None
        self.owner = os.getpid()
        self.free = list(range(DATABASES - 1, 0, -1))  # popped from the end: 1 first


_state = _State()


def _forget_parent() -> None:
    # In a child made by fork: the parent's server (and its lock, maybe held by a thread
    # that does not exist here) are the parent's.
    global _state
    _state = _State()


os.register_at_fork(after_in_child=_forget_parent)


def shared_server() -> EmbeddedRedis:
    """This process's test server, started on first use (a fraction of a second, once)."""
    state = _state
    with state.lock:
        if state.server is None or state.owner != os.getpid():
            state.server = _start()
            state.owner = os.getpid()
        return state.server


def _start() -> EmbeddedRedis:
    """Start the server from a thread that lives as long as the process.

    On Linux the server gets SIGTERM when the thread that started it ends (it is started
    with PR_SET_PDEATHSIG, so a crashed test run leaves nothing behind); that thread must
    not be one of a pool that ends when idle, nor a short-lived event loop's.
    """
    started: list[EmbeddedRedis | BaseException] = []
    ready = threading.Event()

    def keep() -> None:
        try:
            server = EmbeddedRedis(
                ["--databases", str(DATABASES)], binary=os.environ.get(BINARY_ENV) or None
            )
            started.append(server.start())
        except BaseException as exc:
            started.append(exc)
            ready.set()
            return
        ready.set()
        threading.Event().wait()  # until the process exits (a daemon thread: never joined)

    threading.Thread(target=keep, name="asyncstreams test server", daemon=True).start()
    ready.wait()
    result = started[0]
    if isinstance(result, BaseException):
        raise result
    atexit.register(_stop, result, os.getpid())
    return result


def _stop(server: EmbeddedRedis, owner: int) -> None:
    """At exit: stop the server by its pid, if this process started it."""
    if os.getpid() == owner:
        server.close()


def lend_database() -> int:
    """A database of the test server no one else uses now, emptied; give it back with
    `give_back`."""
    server = shared_server()
    state = _state
    with state.lock:
        if not state.free:
            raise AsyncstreamsError(
                f"all {DATABASES - 1} databases of the test server are in use: expected each "
                "TestApp to be left (async with) and each asyncstreams_url test to end"
            )
        database = state.free.pop()
    try:
        with redis.Redis(host="127.0.0.1", port=server.port, db=database, protocol=2) as client:
            client.flushdb()
    except BaseException:
        give_back(database)
        raise
    return database


def give_back(database: int) -> None:
    """Database `database`, lent by `lend_database`, may be lent again."""
    state = _state
    with state.lock:
        if database not in state.free:
            state.free.append(database)


def database_url(database: int) -> str:
    server = shared_server()
    return f"redis://127.0.0.1:{server.port}/{database}"


@contextmanager
def clean_database() -> Iterator[str]:
    """The URL of a database of the test server of its own, empty, for the block."""
    database = lend_database()
    try:
        yield database_url(database)
    finally:
        give_back(database)
