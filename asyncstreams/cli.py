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

from . import __version__, _commands, _logsetup, _ops_cli, _reload, _run_options, describe
from ._arguments import positive_int, url
from ._supervisor import supervise
from .app import App
from .deadletter import DeadLetterEntry
from .errors import AsyncstreamsError, ConfigurationError, RedisRefusedError
from .runner import WORKER_URL_ENV, RunConfig, display_path, run

log = logging.getLogger("asyncstreams.cli")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncstreams", description="Run Redis Streams consumers written with asyncstreams."
    )
    parser.add_argument("--version", action="version", version=f"asyncstreams {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    runp = commands.add_parser(
        "run",
        help="run the consumers of an app until SIGINT/SIGTERM",
        description="Run the consumers of an app until SIGINT/SIGTERM.",
        epilog=_run_options.epilog(),
    )
    runp.add_argument("target", help='where the App is, as "module:attribute" (e.g. tasks:app)')
    _run_options.add_arguments(runp)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "dead-letters":
        return _dead_letters(args)
    if args.command in _ops_cli.COMMANDS:
        return _ops_cli.command(args)
    if args.command == "describe":
        return describe.command(args, load=import_app)
    try:
        config = _run_config(args)
    except ConfigurationError as exc:
        print(f"asyncstreams: error: {exc}", file=sys.stderr)
        return 2
    _logsetup.configure(config.log_level, config.log_format)
    try:
        if config.reload:
            _reload.check_installed()
        app = import_app(config.target)
        if config.workers > 1 or config.reload:
            return supervise(config)
        return run(app, config)
    except (TargetError, ConfigurationError, RedisRefusedError) as exc:
        # Wrong where the app is, how it is configured or which Redis it may use: starting
        # it again as it is cannot help.
        _error(exc, config)
        return 2
    except AsyncstreamsError as exc:  # RedisUnavailableError: it may work once Redis is up
        _error(exc, config)
        return 1


def _run_config(args: argparse.Namespace) -> RunConfig:
    """`run`'s settings: each option's flag, else its variable, else its default."""
    resolved = _run_options.resolve(args, os.environ)
    values, sources = resolved.values, resolved.sources
    given = [sources[name] for name in ("embedded", "embedded_cluster", "url") if values[name]]
    if len(given) > 1:
        raise ConfigurationError(f"{' and '.join(given)} exclude each other")
    values["url"] = values["url"] or os.environ.pop(WORKER_URL_ENV, None)
    return RunConfig(target=args.target, **values)


def _error(exc: BaseException, config: RunConfig) -> None:
    """The one line an error at start ends the command with: a JSON record under
    --log-format json, so that every line on stderr is one."""
    if config.log_format == "json":
        log.error("%s", exc)
    else:
        print(f"asyncstreams: error: {exc}", file=sys.stderr)
