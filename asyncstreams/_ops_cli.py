"""The operators' subcommands of `asyncstreams`: `status`, `pending` and `trim`: their
arguments, their output (text that fits 100 columns, or JSON), `status --watch`, and their
exit codes (0 done, 1 an error from or about Redis, 2 a usage error, from argparse).

What they show comes from ops.py and _trim.py; nothing here sends a command of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

from redis.exceptions import RedisError

from . import _trim, ops
from ._arguments import positive_int, url
from ._transport import describe
from .app import App
from .errors import AsyncstreamsError

COMMANDS = ("status", "pending", "trim")
WIDTH = 100  # the text output fits this many columns (names longer than NAME get a line)
NAME = 22
# (header, width) of the status table's columns after the name, each right-aligned after
# one space: the stream's length, its newest entry's age, each group's lag, pending count,
# oldest pending entry's age and delivery count, consumers and the most idle one's idle
# time, and the stream's dead-letter length.
COLUMNS = (
    ("LENGTH", 8),
    ("NEWEST", 8),
    ("LAG", 7),
    ("PENDING", 8),
    ("OLDEST", 8),
    ("DELIV", 6),
    ("CONSUMERS", 10),
    ("IDLE", 7),
    ("DEAD", 7),
)
REDRAW = "\x1b[H\x1b[2J"  # cursor home, clear the screen: `--watch` on a terminal
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# How long a cancelled command may take to end after Ctrl-C before the process exits.
INTERRUPT_GRACE = 1.0


# -- arguments ---------------------------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds as a number, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def duration(text: str) -> float:
    """`90s`, `30m`, `12h`, `7d` (a number and a unit) in seconds."""
    found = _DURATION.fullmatch(text.strip())
    if found is None or float(found[1]) == 0:
        raise argparse.ArgumentTypeError(
            f"expected a duration > 0 as a number and a unit (s, m, h or d), e.g. 90s, 30m, "
            f"12h or 7d; got {text!r}"
        )
    return float(found[1]) * _UNITS[found[2]]


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `status`, `pending` and `trim` to the `asyncstreams` command's subparsers."""
    url_help = "Redis URL, any node of a cluster (default: $ASYNCSTREAMS_URL)"
    status = commands.add_parser(
        "status",
        help="every stream's length and newest entry; per group its lag, pending entries, "
        "consumers and dead letters",
    )
    status.add_argument("streams", nargs="*", metavar="STREAM", help="only these (default: all)")
    status.add_argument("--url", type=url, help=url_help)
    status.add_argument(
        "--json", action="store_true", help="one JSON list, one object per stream (a line)"
    )
    status.add_argument(
        "--watch",
        type=_seconds,
        metavar="SECONDS",
        help="show it again every SECONDS, in place on a terminal, until Ctrl-C",
    )
    pending = commands.add_parser(
        "pending", help="a group's pending entries: consumer, idle time, delivery count"
    )
    pending.add_argument("stream")
    pending.add_argument("group")
    pending.add_argument("--url", type=url, help=url_help)
    pending.add_argument("--consumer", metavar="NAME", help="only those of this consumer")
    pending.add_argument(
        "--limit",
        type=positive_int,
        default=100,
        metavar="N",
        help="at most N, by id (default 100)",
    )
    pending.add_argument("--json", action="store_true", help="one JSON object per entry and line")
    trim = commands.add_parser(
        "trim", help="remove the entries every group has read and acked (XTRIM MINID)"
    )
    trim.add_argument("stream")
    trim.add_argument("--url", type=url, help=url_help)
    trim.add_argument(
        "--dry-run", action="store_true", help="say what would be removed; remove nothing"
    )
    trim.add_argument(
        "--max-age",
        type=duration,
        metavar="DURATION",
        help="also remove entries older than this (90s, 30m, 12h, 7d), read or not: "
        "a warning names the groups that lose entries they have not acked",
    )


def command(args: argparse.Namespace) -> int:
    """Run `status`, `pending` or `trim`; the exit code."""
    work: Callable[[App], Awaitable[None]]
    if args.command == "status":
        work = _watch(args) if args.watch else _status(args)
    elif args.command == "pending":
        work = _pending(args)
    else:
        work = _trimmer(args)
    app = App(args.url)
    # Where, for an error line, from the URL (the app's client is closed by then).
    where = _server(app.url)

    async def run() -> None:
        # Ctrl-C cancels the command; were the cancellation lost (redis-py can swallow one
        # that lands while a connection is being set up, then retry for 15 s), the process
        # exits anyway, INTERRUPT_GRACE later: these commands only read, or run one script.
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        assert main is not None

        def interrupted() -> None:
            main.cancel()
            loop.call_later(INTERRUPT_GRACE, _exit_interrupted, interrupted_code)

        loop.add_signal_handler(signal.SIGINT, interrupted)
        try:
            await work(app)
        finally:
            await app.aclose()

    interrupted_code = 0 if args.command == "status" and args.watch else 130
    try:
        asyncio.run(run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        return interrupted_code
    except (AsyncstreamsError, RedisError, OSError) as exc:
        print(f"asyncstreams: error: {_explain(exc, where)}", file=sys.stderr)
        return 1
    return 0


def _exit_interrupted(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _server(url: str) -> str:
    """Host and port (or socket path) of `url`, never its password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


def _explain(exc: BaseException, where: str) -> str:
    """One line: asyncstreams' own errors say where; Redis' (unreachable, a failed login, a
    missing permission) get the server's host and port. Never a password."""
    if isinstance(exc, AsyncstreamsError):
        return str(exc)
    return f"Redis at {where}: {exc}"


# -- status ------------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> Callable[[App], Awaitable[None]]:
    async def once(app: App) -> None:
        found = await ops.status(await app.servers(), args.streams or None)
        print(status_json(found) if args.json else status_text(found, describe(app.redis)))

    return once


def _watch(args: argparse.Namespace) -> Callable[[App], Awaitable[None]]:
    """Show the status every `args.watch` seconds until Ctrl-C. On a terminal each frame is
    drawn in place (cursor home, screen cleared: like `top`); otherwise frames follow one
    another, text frames after a blank line, JSON ones a line each. An error after the
    first frame is shown as the frame (Redis may come back); one before it ends the
    command."""

    async def watch(app: App) -> None:
        terminal = sys.stdout.isatty()
        frames = 0
        while True:
            try:
                nodes = await app.servers()
                found = await ops.status(nodes, args.streams or None)
                body = status_json(found) if args.json else status_text(found, describe(app.redis))
            except (AsyncstreamsError, RedisError, OSError) as exc:
                if not frames:
                    raise
                body = f"asyncstreams: error: {_explain(exc, describe(app.redis))}"
                if args.json:  # stdout stays JSON, a line per frame
                    print(body, file=sys.stderr, flush=True)
                    await asyncio.sleep(args.watch)
                    continue
            if not args.json:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                head = f"every {args.watch:g}s: asyncstreams status on {describe(app.redis)}"
                body = f"{head}{stamp:>{max(1, WIDTH - len(head))}}\n\n{body}"
                if terminal:
                    body = REDRAW + body
                elif frames:
                    body = "\n" + body
            print(body, flush=True)
            frames += 1
            await asyncio.sleep(args.watch)

    return watch


def status_json(found: Sequence[ops.StreamStatus]) -> str:
    """One line: a list of one object per stream, the dataclasses' fields by their names."""
    return json.dumps([dataclasses.asdict(stream) for stream in found], ensure_ascii=False)


def age(ms: int | None) -> str:
    """850ms, 12s, 5m03s, 3h07m, 2d04h; `-` for None."""
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms}ms"
    minutes, seconds = divmod(ms // 1000, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"


def _row(name: str, cells: Sequence[str]) -> str:
    values = "".join(f" {cell:>{width}}" for cell, (_, width) in zip(cells, COLUMNS, strict=True))
    if len(name) > NAME:
        return f"{name}\n{'':{NAME}}{values}".rstrip()
    return f"{name:{NAME}}{values}".rstrip()


def status_text(found: Sequence[ops.StreamStatus], where: str) -> str:
    """The table: a line per stream, an indented line per group (`where`: the server, for
    an empty one)."""
    if not found:
        return f"no streams on {where}"
    lines = [_row("STREAM / GROUP", [header for header, _ in COLUMNS])]
    for stream in found:
        dead = str(stream.dead_letter_length) if stream.dead_letter else "-"
        lines.append(
            _row(stream.stream, [str(stream.length), age(stream.newest_age_ms), *[""] * 6, dead])
        )
        if not stream.groups:
            lines.append("  (no groups)")
        for group in stream.groups:
            oldest = group.oldest_pending
            lines.append(
                _row(
                    f"  {group.name}",
                    [
                        "",
                        "",
                        f"{group.lag}" if group.lag_exact else f"\u2265{group.lag}",
                        str(group.pending),
                        age(oldest.age_ms) if oldest else "-",
                        str(oldest.deliveries) if oldest else "-",
                        str(group.consumers),
                        age(group.most_idle_ms),
                        "",
                    ],
                )
            )
    return "\n".join(lines)


# -- pending -----------------------------------------------------------------------------


def _pending(args: argparse.Namespace) -> Callable[[App], Awaitable[None]]:
    async def show(app: App) -> None:
        entries, total = await ops.pending_entries(
            await app.servers(),
            args.stream,
            args.group,
            consumer=args.consumer,
            limit=args.limit,
        )
        if args.json:
            for entry in entries:
                print(json.dumps(dataclasses.asdict(entry), ensure_ascii=False))
        elif entries:
            rows = [("ID", "CONSUMER", "IDLE", "DELIVERIES")] + [
                (e.id, e.consumer, age(e.idle_ms), str(e.deliveries)) for e in entries
            ]
            widths = [max(len(row[i]) for row in rows) for i in range(4)]
            for row in rows:
                print(
                    f"{row[0]:{widths[0]}}  {row[1]:{widths[1]}}  {row[2]:>{widths[2]}}  "
                    f"{row[3]:>{widths[3]}}"
                )
        whose = f" of consumer {args.consumer!r}" if args.consumer else ""
        print(
            f"{len(entries)} of {total} pending entries of {args.stream!r} in group "
            f"{args.group!r}{whose} shown",
            file=sys.stderr,
        )

    return show


# -- trim --------------------------------------------------------------------------------


def _trimmer(args: argparse.Namespace) -> Callable[[App], Awaitable[None]]:
    async def trim(app: App) -> None:
        result = await _trim.trim(
            await app.servers(), args.stream, max_age=args.max_age, dry_run=args.dry_run
        )
        for line in trim_warning(result, args.max_age):
            print(line, file=sys.stderr)
        print("\n".join(trim_text(result, args.max_age)))

    return trim


def _entries(count: int, exact: bool) -> str:
    return f"{'' if exact else 'at least '}{count} {'entry' if count == 1 else 'entries'}"


def trim_text(result: _trim.TrimResult, max_age: float | None) -> list[str]:
    """What was removed, and what holds the rest back."""
    verb = "would remove" if result.dry_run else "removed"
    how = f"XTRIM MINID {result.min_id}" if result.min_id else "XTRIM MAXLEN 0"
    remain = "would remain" if result.dry_run else "remain"
    lines = [
        f"{verb} {_entries(result.removed, result.exact)} of {result.stream!r} ({how}); "
        f"{_entries(result.remaining, result.exact)} {remain}"
    ]
    if result.min_id is None:
        lines.append("every group has read and acked every entry")
    elif result.held_back_by is not None:
        hold = next(h for h in result.groups if h.group == result.held_back_by)
        if result.held_back_because == "unread":
            what = f"the first entry it has not read is {result.min_id}"
        elif hold.oldest_pending == result.min_id:
            what = f"its oldest pending entry is {result.min_id}"
        else:
            what = (
                f"its oldest pending entry, {hold.oldest_pending}, was deleted; the first "
                f"entry after it is {result.min_id}"
            )
        lines.append(f"held back by group {result.held_back_by!r}: {what}")
    else:
        lines.append(f"the rest are not older than {_duration(max_age)}")
    return lines


def trim_warning(result: _trim.TrimResult, max_age: float | None) -> list[str]:
    """The loud lines for groups that lose entries they have not acked (--max-age)."""
    if not result.losing or result.min_id is None:
        return []
    limit = ops.id_key(result.min_id)
    lost = []
    for hold in result.groups:
        if hold.group not in result.losing:
            continue
        kinds = [
            kind
            for kind, entry_id in (("pending", hold.pending_floor), ("unread", hold.first_unread))
            if entry_id is not None and ops.id_key(entry_id) < limit
        ]
        lost.append(f"{hold.group!r} ({' and '.join(kinds)})")
    verb = "would lose" if result.dry_run else "lose"
    one = len(lost) == 1
    return [
        f"asyncstreams: WARNING: --max-age {_duration(max_age)}: "
        f"{'group' if one else 'groups'} {', '.join(lost)} {verb} entries "
        f"{'it has' if one else 'they have'} not acked (every entry below {result.min_id})"
    ]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit in "dhm":
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{seconds / _UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"
