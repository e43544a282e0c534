"""The ceiling: the fastest consumer and publisher Python can be, on a bare socket.

No client library: commands packed by `hiredis.pack_command`, replies parsed by a
`hiredis.Reader`, one TCP socket driven by the event loop's `sock_sendall`/`sock_recv`.

- `baseline-socket` (consume): an inline loop. XREADGROUP COUNT 500 BLOCK 100; a no-op
  `async def` handler awaited for each entry of the reply; then one XACK for the whole
  batch, written together with the next XREADGROUP (one write, two replies). At the stop,
  the last batch's XACK goes alone.
- `socket-pipeline` (publish): XADD in pipelines of `spec.chunk` (1,000), each pipeline one
  write and its replies read back before the next.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis

from ..ledger import Sink
from ..payload import task_fields
from ..specs import ConsumeSpec, PublishSpec

READ_COUNT = 500
BLOCK_MS = 100
RECV_BYTES = 1 << 18
STOP_TIMEOUT = 10.0


def pack(args: tuple[str | bytes, ...]) -> bytes:
    """A command in RESP, packed by hiredis."""
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]  # the stub: a 1-tuple
    return packed


class Connection:
    """One socket, the commands written to it and the replies read from it, in order."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._parser = hiredis.Reader()

    @classmethod
    async def open(cls, url: str) -> Connection:
        parts = urlsplit(url)
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(parts.hostname or "127.0.0.1", parts.port or 6379,
                                       type=socket.SOCK_STREAM)  # fmt: skip
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(sock, address)
        connection = cls(sock)
        setup: list[tuple[str, ...]] = []
        if parts.password:
            setup.append(("AUTH", unquote(parts.username or "default"), unquote(parts.password)))
        if parts.path.strip("/") not in ("", "0"):
            setup.append(("SELECT", parts.path.strip("/")))
        if setup:
            await connection.send(b"".join(pack(args) for args in setup))
            for _ in setup:
                await connection.reply()
        return connection

    async def send(self, packed: bytes) -> None:
        await self._loop.sock_sendall(self._sock, packed)

    async def reply(self) -> Any:
        """The next reply; an error reply is raised."""
        parser = self._parser
        reply = parser.gets()
        while reply is False:
            data = await self._loop.sock_recv(self._sock, RECV_BYTES)
            if not data:
                raise ConnectionError("redis-server closed the connection")
            parser.feed(data)
            reply = parser.gets()
        if isinstance(reply, hiredis.ReplyError):
            raise reply
        return reply

    def close(self) -> None:
        self._sock.close()


async def inline_loop(
    connection: Connection,
    spec: ConsumeSpec,
    handle: Callable[[list[bytes]], Awaitable[None]],
    stop: asyncio.Event,
) -> None:
    consumer = f"bench-{os.getpid()}"
    read = pack(("XREADGROUP", "GROUP", spec.group, consumer, "COUNT", str(READ_COUNT),
                 "BLOCK", str(BLOCK_MS), "STREAMS", spec.stream, ">"))  # fmt: skip
    ack_head = ("XACK", spec.stream, spec.group)
    ack = b""
    while not stop.is_set():
        await connection.send(ack + read)  # the last batch's XACK rides with the next read
        if ack:
            await connection.reply()
        reply = await connection.reply()  # RESP2: [[stream, [[id, [field, value, ...]], ...]]]
        entries = reply[0][1] if reply else ()
        for _, fields in entries:
            await handle(fields)
        ack = pack((*ack_head, *(entry_id for entry_id, _ in entries))) if entries else b""
    if ack:
        await connection.send(ack)
        await connection.reply()


def _handler(sink: Sink) -> Callable[[list[bytes]], Awaitable[None]]:
    record = sink.record
    delay = sink.delay
    sleep = asyncio.sleep

    async def handle(fields: list[bytes]) -> None:
        # The task shape's fields, in the order they were written: task_id, data, created_at.
        record(fields[1], fields[5])
        if delay:
            await sleep(delay)

    return handle


@asynccontextmanager
async def consuming(spec: ConsumeSpec, sink: Sink) -> AsyncIterator[None]:
    connection = await Connection.open(spec.url)
    stop = asyncio.Event()
    task = asyncio.create_task(inline_loop(connection, spec, _handler(sink), stop))

    def on_done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            sink.failure = task.exception()

    task.add_done_callback(on_done)
    try:
        yield
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, STOP_TIMEOUT)
        except TimeoutError:
            raise TimeoutError(f"the consumer loop did not stop in {STOP_TIMEOUT:.0f} s") from None
        finally:
            connection.close()


async def publish(spec: PublishSpec) -> float:
    """XADD `spec.entries` entries in pipelines of `spec.chunk`, packed as they go out."""
    now = time.time()
    payloads = [task_fields(seq, spec.size, now) for seq in range(spec.entries)]
    connection = await Connection.open(spec.url)
    head = ("XADD", spec.stream, "*")
    try:
        await connection.send(pack(("PING",)))
        await connection.reply()
        started = time.perf_counter()
        for start in range(0, len(payloads), spec.chunk):
            chunk = payloads[start : start + spec.chunk]
            await connection.send(
                b"".join(
                    pack((*head, *(part for item in fields.items() for part in item)))
                    for fields in chunk
                )
            )
            for _ in chunk:
                await connection.reply()
        return time.perf_counter() - started
    finally:
        connection.close()
