"""The `asyncstreams` command: `run module:app` (argument parsing, importing the app, logging
set-up, exit codes) and `dead-letters STREAM`."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Sequence

from redis.exceptions import RedisError

from . import __version__, _commands, _ops_cli, describe
from ._arguments import positive_int, url
from .app import App
from .deadletter import DeadLetterEntry
from .errors import AsyncstreamsError, ConfigurationError, RedisRefusedError
from .runner import WORKER_URL_ENV, RunConfig, display_path, run, supervise

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LOOPS = ("auto", "uvloop", "asyncio")


class TargetError(AsyncstreamsError):
    """Raised when `module:attribute` does not lead to an App."""


def import_app(target: str) -> App:
    """Import `module:attribute` (the attribute may be dotted) and check it is an App."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise TargetError(
            f'invalid target "{target}": expected "module:attribute", e.g. "tasks:app"'
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does, for the console script too
    try:
        module = importlib.import_module(module_name)
    except ConfigurationError as exc:
        # Raised by the module's own code, e.g. `@app.consumer(..., concurrency=0)`: name
        # the line that did it (the traceback would only show asyncstreams' internals too).
        raise ConfigurationError(f"{_caller(exc)}{exc}") from None
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise TargetError(
                f'cannot import "{target}": no module named "{missing}"; '
                'expected "module:attribute" with module importable from here'
            ) from None
        raise  # the module exists but an import inside it failed: show its traceback
    found: object = module
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise TargetError(
                f'cannot import "{target}": module "{module_name}" has no attribute '
                f'"{attribute}"; expected "module:attribute"'
            ) from None
    if not isinstance(found, App):
        raise TargetError(
            f'"{target}" is {type(found).__name__} {found!r:.60}; expected an asyncstreams App'
        )
    return found


def _caller(exc: BaseException) -> str:
    """`file:line: ` of the innermost frame outside asyncstreams (and importlib), or ""."""
    package = os.path.dirname(os.path.abspath(__file__))
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename.startswith("<") or frame.filename.startswith(package + os.sep):
            continue
        return f"{display_path(frame.filename)}:{frame.lineno}: "
    return ""


def _grace_period(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds as a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncstreams", description="Run Redis Streams consumers written with asyncstreams."
    )
    parser.add_argument("--version", action="version", version=f"asyncstreams {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    runp = commands.add_parser("run", help="run the consumers of an app until SIGINT/SIGTERM")
    runp.add_argument("target", help='where the App is, as "module:attribute" (e.g. tasks:app)')
    runp.add_argument("--url", type=url, help="Redis URL; overrides App(url) and $ASYNCSTREAMS_URL")
    runp.add_argument(
        "--workers", type=positive_int, default=1, metavar="N", help="processes to run (default 1)"
    )
    runp.add_argument(
        "--log-level",
        type=str.lower,  # INFO and Info are info
        choices=LOG_LEVELS,
        default="info",
        help="critical, error, warning, info (default) or debug, in any case",
    )
    runp.add_argument(
        "--grace-period",
        type=_grace_period,
        metavar="SECONDS",
        help="how long running handlers may finish after a stop signal (default: the App's)",
    )
    runp.add_argument(
        "--embedded",
        action="store_true",
        help="start a private redis-server on a free loopback port and use it",
    )
    runp.add_argument(
        "--embedded-cluster",
        action="store_true",
        help="start a private Redis Cluster (3 masters on free loopback ports) and use it",
    )
    runp.add_argument(
        "--loop",
        choices=LOOPS,
        default="auto",
        help="event loop: uvloop when installed (auto), or plain asyncio",
    )
    describe.add_parser(commands)
    dlq = commands.add_parser(
        "dead-letters",
        help="list the entries of a dead-letter stream, or move them back (--replay)",
    )
    dlq.add_argument("stream", help='the dead-letter stream, e.g. "task_queue:dead-letter"')
    dlq.add_argument("--url", type=url, help="Redis URL (default: $ASYNCSTREAMS_URL)")
    dlq.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        metavar="N",
        help="at most N entries (default: 100 listed, all replayed)",
    )
    how = dlq.add_mutually_exclusive_group()
    how.add_argument(
        "--replay",
        action="store_true",
        help="move them back to the streams they came from, as new entries",
    )
    how.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per entry and line: {"id", "dlq": {the !dlq: metadata}, '
        '"fields": {the original fields}}; a byte that is not UTF-8 is a \\udc80-\\udcff '
        "escape (Python's surrogateescape)",
    )
    _ops_cli.add_parsers(commands)
    return parser


PREVIEW_CHARS = 60  # a longer field value is cut in the listing (not with --json)
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _dead_letters(args: argparse.Namespace) -> int:
    """`asyncstreams dead-letters STREAM`: two lines (or one JSON line) per entry, or
    --replay them."""
    app = App(args.url)

    async def list_or_replay() -> None:
        try:
            await _check_is_stream(app, args.stream)
            if args.replay:
                moved = await app.replay_dead_letters(args.stream, limit=args.limit)
                print(f"moved {moved} entries of {args.stream} back to their streams")
                return
            entries = await app.dead_letters(args.stream, limit=args.limit or 100)
            for entry in entries:
                print(_as_json(entry) if args.json else _as_text(entry))
            total = await _commands.length(await app.servers(), args.stream)
            print(f"{len(entries)} of {total} entries of {args.stream} shown", file=sys.stderr)
        finally:
            await app.aclose()

    try:
        asyncio.run(list_or_replay())
    except AsyncstreamsError as exc:
        print(f"asyncstreams: error: {exc}", file=sys.stderr)
        return 1
    except (RedisError, OSError) as exc:  # unreachable, a failed login, a missing permission
        print(f"asyncstreams: error: Redis at {_server(app)}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _check_is_stream(app: App, stream: str) -> None:
    found = await _commands.key_type(await app.servers(), stream)
    if found == "none":
        raise AsyncstreamsError(f"stream {stream!r} does not exist on {_server(app)}")
    if found != "stream":
        raise AsyncstreamsError(
            f"key {stream!r} is a {found}, not a stream; expected a dead-letter stream"
        )


def _server(app: App) -> str:
    """Where the app's client connects: host and port or socket path, never a password."""
    kwargs = app.redis.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def _as_text(entry: DeadLetterEntry) -> str:
    """The metadata on one line; the original fields, `name=value`, indented on the next."""
    letter = entry.letter
    error = f"{letter.error}: " if letter.error else ""
    fields = " ".join(f"{_show(name)}={_show(value)}" for name, value in entry.fields.items())
    return (
        f"{entry.id}  {letter.stream} {letter.id}  {letter.reason}  "
        f"deliveries={letter.deliveries}  {error}{letter.message}\n    {fields or '(no fields)'}"
    )


def _show(value: bytes) -> str:
    """UTF-8 (a byte that is not shows as U+FFFD), cut after PREVIEW_CHARS, quoted (JSON)
    when it is empty or holds a space, a quote, a `=` or a character that does not print."""
    text = value.decode(errors="replace")
    cut = ""
    if len(text) > PREVIEW_CHARS:
        text, cut = text[:PREVIEW_CHARS], f"...({len(value)} bytes)"
    if not text.isprintable() or not text or any(c.isspace() or c in '"=\\' for c in text):
        text = json.dumps(text, ensure_ascii=False)
    return text + cut


def _as_json(entry: DeadLetterEntry) -> str:
    """One JSON line. Names and values are decoded with surrogateescape, so a byte that is
    not UTF-8 is written as a \\udc80-\\udcff escape and
    `json.loads(line)[...].encode("utf-8", "surrogateescape")` gives the bytes back."""
    letter = entry.letter
    record = {
        "id": entry.id,
        "dlq": {
            "stream": letter.stream,
            "id": letter.id,
            "group": letter.group,
            "consumer": letter.consumer,
            "deliveries": letter.deliveries,
            "reason": letter.reason,
            "error": letter.error,
            "message": letter.message,
            "time": letter.time_ms,
        },
        "fields": {
            name.decode(errors="surrogateescape"): value.decode(errors="surrogateescape")
            for name, value in entry.fields.items()
        },
    }
    line = json.dumps(record, ensure_ascii=False)
    # A lone surrogate cannot be written as UTF-8: write it as the JSON escape it stands for.
    return _ESCAPED_BYTE.sub(lambda found: f"\\u{ord(found[0]):04x}", line)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "dead-letters":
        return _dead_letters(args)
    if args.command in _ops_cli.COMMANDS:
        return _ops_cli.command(args)
    if args.command == "describe":
        return describe.command(args, load=import_app)
    configure_logging(args.log_level)
    given = [
        flag
        for flag, value in [
            ("--embedded", args.embedded),
            ("--embedded-cluster", args.embedded_cluster),
            ("--url", args.url),
        ]
        if value
    ]
    if len(given) > 1:
        print(f"asyncstreams: error: {' and '.join(given)} exclude each other", file=sys.stderr)
        return 2
    config = RunConfig(
        target=args.target,
        url=args.url or os.environ.pop(WORKER_URL_ENV, None),
        workers=args.workers,
        log_level=args.log_level,
        grace_period=args.grace_period,
        embedded=args.embedded,
        embedded_cluster=args.embedded_cluster,
        loop=args.loop,
    )
    try:
        app = import_app(config.target)
        if config.workers > 1:
            return supervise(config)
        return run(app, config)
    except (TargetError, ConfigurationError, RedisRefusedError) as exc:
        # Wrong where the app is, how it is configured or which Redis it may use: starting
        # it again as it is cannot help.
        print(f"asyncstreams: error: {exc}", file=sys.stderr)
        return 2
    except AsyncstreamsError as exc:  # RedisUnavailableError: it may work once Redis is up
        print(f"asyncstreams: error: {exc}", file=sys.stderr)
        return 1
