"""A small, strict HTTP/1.1 server for the health endpoints, the same routes as an ASGI app,
and the client the supervisor asks its workers with.

One request per connection (`Connection: close`), GET and HEAD only, no request body. What
a request may cost is bounded: its head (request line and headers) in size and in time, and
the connections open at once. A bad request is answered 400 and closed; nothing a client
sends reaches the consumers, whose event loop this runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import anyio
import anyio.abc

log = logging.getLogger("asyncstreams.health")

# The request line and headers together; a probe's head is about 100 bytes.
MAX_HEAD_BYTES = 8192
# How long a client may take to send the head, and to take the response.
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 5.0
# Connections served at once; more are closed as they come.
MAX_CONNECTIONS = 64
# After the response, what the client still sends is read and dropped, for so long and so
# much at most, before the connection is closed (see `_linger`).
LINGER_TIMEOUT = 1.0
LINGER_BYTES = 65536
# How long the connections still open get to stop when the server does.
STOP_TIMEOUT = 5.0

JSON = "application/json"
METHODS = ("GET", "HEAD")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()


def json_response(code: int, /, **fields: object) -> Response:
    return Response(code, json.dumps(fields, separators=(",", ":")).encode() + b"\n")


Route = Callable[[], Awaitable[Response]]


async def route(routes: Mapping[str, Route], method: str, path: str) -> Response:
    """The response of `routes[path]`: 404 for another path, 405 for a method but GET and
    HEAD, 500 (logged) if the route raises."""
    answer = routes.get(path)
    if answer is None:
        return json_response(404, error=f"no route {path[:100]!r}", routes=sorted(routes))
    if method not in METHODS:
        return Response(
            405,
            json_response(405, error=f"method {method} not allowed").body,
            headers=(("Allow", ", ".join(METHODS)),),
        )
    try:
        return await answer()
    except Exception as exc:
        log.exception("health endpoint %s failed", path)
        return json_response(500, error=f"{type(exc).__name__} in {path}")


# -- the server ------------------------------------------------------------------------------


class BadRequest(Exception):
    """Raised when a request head is not one this server accepts."""


def parse_head(head: bytes) -> tuple[str, str]:
    """The method and path (query string dropped) of a request head, CRLF line endings and
    the final blank line excluded; BadRequest saying what is wrong otherwise."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("expected an ASCII request head") from None
    request_line, *fields = text.split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        raise BadRequest(f"expected 'METHOD /path HTTP/1.1', got {request_line[:60]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest(f"expected HTTP/1.1 or HTTP/1.0, got {version[:20]!r}")
    if not target.startswith("/") or not _FIELD_VALUE.fullmatch(target):
        raise BadRequest(f"expected a path starting with '/', got {target[:60]!r}")
    hosts = 0
    for field in fields:
        name, colon, value = field.partition(":")
        if not colon or not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise BadRequest(f"expected a header line 'Name: value', got {field[:60]!r}")
        hosts += name.lower() == "host"
    if version == "HTTP/1.1" and hosts != 1:
        raise BadRequest(f"expected one Host header in an HTTP/1.1 request, got {hosts}")
    return method, target.partition("?")[0]


def encode(response: Response, *, head_only: bool, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    status = HTTPStatus(response.status)
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in (*response.headers, *extra)),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


Respond = Callable[[str, str], Awaitable[Response]]
Connected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# asyncio's streams, not anyio's: on asyncio, anyio's UNIX socket streams wait for a socket
# with a future that a cancellation can leave set twice (InvalidStateError, logged by the
# loop: agronholm/anyio#1267 and its kin); asyncio's transports have no such race.
async def serve_tcp(
    host: str | None,
    port: int,
    respond: Respond,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Answer the connections to `host`:`port` with `respond(method, path)` until
    cancelled; the port bound goes to `task_status.started()`.

    One socket: a host None (or "") is every interface, IPv6 and IPv4 where the system
    has both; a name or an IPv4 address binds IPv4, an address with a colon IPv6 (as
    uvicorn does). OSError if it cannot bind.
    """
    if not host:
        dual = socket.has_dualstack_ipv6()
        family = socket.AF_INET6 if dual else socket.AF_INET
        sock = socket.create_server(("", port), family=family, dualstack_ipv6=dual)
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family)

    async def start(connected: Connected) -> asyncio.Server:
        return await asyncio.start_server(connected, sock=sock, limit=MAX_HEAD_BYTES)

    try:
        await _serve(start, respond, (), lambda: task_status.started(sock.getsockname()[1]))
    finally:
        sock.close()


async def serve_unix(
    path: str,
    respond: Respond,
    *,
    headers: Sequence[tuple[str, str]] = (),
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """`serve_tcp` on the unix socket `path`, readable and writable by this user only (a
    socket left there is replaced; the socket is removed when done); `headers` go into
    every response."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)

    async def start(connected: Connected) -> asyncio.Server:
        server = await asyncio.start_unix_server(connected, path, limit=MAX_HEAD_BYTES)
        os.chmod(path, 0o600)
        return server

    try:
        await _serve(start, respond, headers, task_status.started)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


async def _serve(
    start: Callable[[Connected], Awaitable[asyncio.Server]],
    respond: Respond,
    headers: Sequence[tuple[str, str]],
    started: Callable[[], None],
) -> None:
    """Serve until cancelled; then cancel the connections still open, and wait for them.

    Each connection runs in a cancel scope of its own, which the stop cancels: its task then
    ends without raising CancelledError, which asyncio 3.11's server would log as an error
    (its callback asks a cancelled task for its exception).
    """
    connections: dict[asyncio.Task[Any], anyio.CancelScope] = {}

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(connections) >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        with anyio.CancelScope() as scope:
            connections[task] = scope
            try:
                await _connection(reader, writer, respond, headers)
            finally:
                del connections[task]

    server = await start(connected)
    try:
        started()
        await anyio.sleep_forever()
    finally:
        server.close()
        with anyio.CancelScope(shield=True):
            open_ = list(connections.items())
            for _, scope in open_:
                scope.cancel()
            if open_:
                await asyncio.wait([task for task, _ in open_], timeout=STOP_TIMEOUT)
            with anyio.move_on_after(STOP_TIMEOUT):
                await server.wait_closed()


async def _connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    respond: Respond,
    headers: Sequence[tuple[str, str]],
) -> None:
    try:
        method, response = await _answer(reader, respond)
        if response is not None:
            writer.write(encode(response, head_only=method == "HEAD", extra=headers))
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.drain()
            await _linger(reader, writer)
    except (OSError, TimeoutError) as exc:
        log.debug("health endpoint: connection lost (%s)", exc)
    except Exception:
        log.exception("health endpoint: a connection failed")
    finally:
        if writer.transport.get_write_buffer_size():
            writer.transport.abort()  # a client that does not read: no waiting for it
        else:
            writer.close()


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Close our side for writing, then drop what the client still sends until it closes
    too (bounded): closing a socket with unread data resets the connection, and a client
    that is still sending (a request too large, say) could lose the response."""
    if writer.can_write_eof():
        writer.write_eof()
    with anyio.move_on_after(LINGER_TIMEOUT):
        dropped = 0
        while dropped < LINGER_BYTES:
            data = await reader.read(LINGER_BYTES)
            if not data:
                return
            dropped += len(data)


async def _answer(reader: asyncio.StreamReader, respond: Respond) -> tuple[str, Response | None]:
    """The method and response of the connection's request; no response for a client that
    went away or was too slow to send its head (the connection is closed)."""
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
    except (TimeoutError, asyncio.IncompleteReadError):
        return "", None
    except asyncio.LimitOverrunError:
        error = f"expected a request line and headers of at most {MAX_HEAD_BYTES} bytes"
        return "", json_response(400, error=error)
    try:
        method, path = parse_head(head[:-4])
    except BadRequest as exc:
        return "", json_response(400, error=str(exc))
    return method, await respond(method, path)


# -- ASGI ------------------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def asgi(respond: Respond) -> ASGIApp:
    """`respond` as an ASGI 3 app: HTTP requests, and a lifespan with nothing to do."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1000})
            return
        method = scope["method"]
        response = await respond(method, route_path(scope))
        headers = [
            (b"content-type", response.content_type.encode()),
            (b"content-length", str(len(response.body)).encode()),
            (b"cache-control", b"no-store"),
            *((name.lower().encode(), value.encode()) for name, value in response.headers),
        ]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        body = b"" if method == "HEAD" else response.body
        await send({"type": "http.response.body", "body": body})

    return app


def route_path(scope: Scope) -> str:
    """The path below where the app is mounted (Starlette's `get_route_path`: `path` holds
    `root_path` in front)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


# -- the client ------------------------------------------------------------------------------


class BadReply(Exception):
    """Raised when a worker's reply is not an HTTP response this module would send."""


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


async def get_unix(path: str, target: str, *, timeout: float, max_bytes: int) -> Reply:
    """GET `target` from the server on the unix socket `path`, within `timeout` seconds
    (TimeoutError), its reply at most `max_bytes` long (BadReply)."""
    request = f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    received = bytearray()
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(request.encode())
            while data := await reader.read(65536):
                received += data
                if len(received) > max_bytes:
                    raise BadReply(f"reply longer than {max_bytes} bytes")
        finally:
            writer.close()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    code = rest.partition(" ")[0]
    if version != "HTTP/1.1" or not code.isdigit():
        raise BadReply(f"expected an HTTP/1.1 status line, got {status_line[:60]!r}")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("content-length") != str(len(body)):
        raise BadReply(f"body of {len(body)} bytes, Content-Length {headers.get('content-length')}")
    return Reply(int(code), headers, body)
