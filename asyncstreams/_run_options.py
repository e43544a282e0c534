"""The options of `asyncstreams run`, each declared once in OPTIONS: its flag, its group in
`run --help`, its environment variable, its type, its default and what it does. The argparse
arguments, the reading of the environment, the help and the README's table of run options
are all made from it.

A flag given on the command line wins over its variable, and the variable over the default.
`$ASYNCSTREAMS_URL` is the exception: the App reads it, after `App(url)`, as it does outside
the CLI; the command line only reads `--url`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._arguments import http_address, positive_int, url
from .errors import ConfigurationError
from .options import DEFAULT_GRACE_PERIOD, DEFAULT_URL, URL_ENV

ENV_PREFIX = "ASYNCSTREAMS_"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LOG_FORMATS = ("text", "json")
LOOPS = ("auto", "uvloop", "asyncio")
# What the variable of a switch (a flag without a value) may hold, in any case.
TRUE = ("1", "true", "yes")
FALSE = ("0", "false", "no")


def grace_period(text: str) -> float:
    """Seconds, a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds as a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class RunOption:
    """One option of `asyncstreams run`."""

    flag: str
    group: str  # its heading in `run --help`
    help: str
    default: Any = None
    # Turns the text given into the value, raising argparse.ArgumentTypeError (or ValueError)
    # when it is not one; None for a switch, a flag that takes no value.
    parse: Callable[[str], Any] | None = None
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    default_text: str | None = None  # the default in words, when it is not a plain value
    read_by_app: bool = False  # its variable is the App's to read (ASYNCSTREAMS_URL)

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()

    @property
    def switch(self) -> bool:
        return self.parse is None

    def shown_default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        if self.switch:
            return "off"
        return str(self.default)

    def from_env(self, text: str) -> Any:
        """The value of the variable's `text`; a ConfigurationError names the variable, what
        was expected and what was found."""
        where = f"environment variable {self.env}"
        if self.switch:
            if text.lower() in TRUE:
                return True
            if text.lower() in FALSE:
                return False
            raise ConfigurationError(
                f"{where}: expected one of {', '.join(TRUE + FALSE)} (any case), got {text!r}"
            )
        assert self.parse is not None
        try:
            value = self.parse(text)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise ConfigurationError(f"{where}: {exc}") from None
        if self.choices and value not in self.choices:
            raise ConfigurationError(
                f"{where}: expected one of {', '.join(self.choices)}, got {text!r}"
            )
        return value


OPTIONS = (
    RunOption(
        flag="--url",
        group="Redis",
        parse=url,
        metavar="URL",
        help="Redis URL (redis://, rediss:// or unix://); overrides App(url)",
        default_text=f"App(url), else ${URL_ENV}, else {DEFAULT_URL}",
        read_by_app=True,
    ),
    RunOption(
        flag="--embedded",
        group="Redis",
        help="start a private redis-server on a free loopback port and use it",
    ),
    RunOption(
        flag="--embedded-cluster",
        group="Redis",
        help="start a private Redis Cluster (3 masters on free loopback ports) and use it",
    ),
    RunOption(
        flag="--workers",
        group="Processes",
        parse=positive_int,
        default=1,
        metavar="N",
        help="worker processes to run, each with its own consumers, under a supervisor "
        "(1: the app runs in this process, without one)",
    ),
    RunOption(
        flag="--grace-period",
        group="Processes",
        parse=grace_period,
        metavar="SECONDS",
        help="how long running handlers may finish after a stop signal",
        default_text=f"the App's grace_period ({DEFAULT_GRACE_PERIOD:g} s unless set)",
    ),
    RunOption(
        flag="--loop",
        group="Processes",
        parse=str,
        choices=LOOPS,
        default="auto",
        help="event loop: uvloop when installed (auto), uvloop, or plain asyncio",
    ),
    RunOption(
        flag="--http",
        group="Processes",
        parse=http_address,
        metavar="HOST:PORT",
        default_text="off",
        help="serve /healthz, /readyz and /metrics on HOST:PORT (:PORT: every interface); "
        "with --workers N the supervisor answers for all the workers",
    ),
    RunOption(
        flag="--reload",
        group="Development",
        help="restart the app, gracefully, when a .py file under the current folder "
        "changes; with --workers N, one worker at a time "
        '(needs watchfiles: pip install "asyncstreams[reload]")',
    ),
    RunOption(
        flag="--log-level",
        group="Logging",
        parse=str.lower,  # INFO and Info are info
        choices=LOG_LEVELS,
        default="info",
        metavar="LEVEL",
        help="critical, error, warning, info or debug, in any case",
    ),
    RunOption(
        flag="--log-format",
        group="Logging",
        parse=str,
        choices=LOG_FORMATS,
        default="text",
        help="text: one line per record; json: one JSON object per line",
    ),
)


def environment_names() -> frozenset[str]:
    """The variables the command line reads (not ASYNCSTREAMS_URL, which the App reads)."""
    return frozenset(option.env for option in OPTIONS if not option.read_by_app)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add OPTIONS to `parser`, in their groups. An option not given is left out of the
    namespace (`resolve` then reads its variable), so the help states its default."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in OPTIONS:
        group = groups.get(option.group)
        if group is None:
            group = groups[option.group] = parser.add_argument_group(option.group)
        help_text = _help(option).replace("%", "%%")  # argparse formats the help with %
        if option.parse is None:  # a switch
            group.add_argument(
                option.flag, action="store_true", default=argparse.SUPPRESS, help=help_text
            )
            continue
        group.add_argument(
            option.flag,
            type=option.parse,
            choices=option.choices or None,
            metavar=option.metavar,
            default=argparse.SUPPRESS,
            help=help_text,
        )


def _help(option: RunOption) -> str:
    env = f"${option.env}, read after App(url)" if option.read_by_app else f"${option.env}"
    return f"{option.help} [default: {option.shown_default()}; env: {env}]"


def epilog() -> str:
    return (
        "Each option can also be set by the environment variable named in its help; a flag "
        "on the command line wins over its variable. The variable of a flag without a value "
        f"is {'/'.join(TRUE)} for on and {'/'.join(FALSE)} for off, in any case. An empty "
        "variable counts as unset."
    )


@dataclass(frozen=True)
class Resolved:
    """The value of every option, and where each one set came from (its flag or its
    variable; absent: the default)."""

    values: dict[str, Any]
    sources: dict[str, str]


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> Resolved:
    """Each option's value: its flag, else its variable (if set and not empty), else its
    default. A bad variable raises ConfigurationError."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        if hasattr(args, option.dest):
            values[option.dest] = getattr(args, option.dest)
            sources[option.dest] = option.flag
            continue
        text = "" if option.read_by_app else environ.get(option.env, "")
        if text:
            values[option.dest] = option.from_env(text)
            sources[option.dest] = option.env
        else:
            values[option.dest] = option.default
    return Resolved(values, sources)


def options_table() -> str:
    """The README's table of run options, made from OPTIONS."""
    rows = [
        "| option | environment variable | default | what it does |",
        "| --- | --- | --- | --- |",
    ]
    for option in OPTIONS:
        value = option.metavar or "\\|".join(option.choices)  # a | would end the cell
        flag = option.flag if option.switch else f"{option.flag} {value}"
        env = f"`{option.env}` (read after `App(url)`)" if option.read_by_app else f"`{option.env}`"
        default = option.shown_default()
        if option.default_text is None and not option.switch:
            default = f"`{default}`"
        rows.append(f"| `{flag}` | {env} | {default} | {option.help} |")
    return "\n".join(rows) + "\n"
