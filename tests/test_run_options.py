"""The options of `asyncstreams run`, declared once (asyncstreams/_run_options.py): the help
groups them and names each one's default and environment variable, the variables work in a
real process (and reach the workers as flags, never as variables), a bad variable is one
line naming it, and the README's table is the declaration's."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis

from asyncstreams._run_options import OPTIONS, options_table

from .conftest import Names
from .helpers import ROOT, CliProcess, read_ledger
from .test_cli import LEDGER_APP, RUNNING, exit_code, ledger_env, publish, stop, wait_until

StartCli = Callable[..., CliProcess]


@pytest.fixture
def start_cli(tmp_path: Path) -> Iterator[StartCli]:
    """Start `python -m asyncstreams ARGS...`; every process started is gone after the test."""
    started: list[CliProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> CliProcess:
        cli = CliProcess(list(args), env=env, log_path=tmp_path / f"cli-{len(started)}.log")
        started.append(cli)
        return cli

    try:
        yield start
    finally:
        for cli in started:
            cli.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True, protocol=2)
    try:
        yield client
    finally:
        client.close()


def run_help() -> str:
    done = subprocess.run(
        [sys.executable, "-m", "asyncstreams", "run", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return " ".join(done.stdout.split())  # argparse wraps lines where it likes


def test_run_help_groups_the_options_with_defaults_and_variables() -> None:
    text = run_help()
    headings = ["Redis:", "Processes:", "Development:", "Logging:"]
    at = [text.index(f" {heading} ") for heading in headings]
    assert at == sorted(at)
    sections = dict(
        zip(
            headings,
            [text[a:b] for a, b in zip(at, [*at[1:], len(text)], strict=True)],
            strict=True,
        )
    )
    for option in OPTIONS:
        section = sections[f"{option.group}:"]
        assert f" {option.flag}" in section, (option.flag, section)
        described = section[section.index(f" {option.flag}") :]
        assert f"default: {option.shown_default()}" in described, option.flag
        assert f"env: ${option.env}" in described, option.flag
    assert "1/true/yes for on and 0/false/no for off" in text


def test_the_readme_run_options_table_is_made_from_the_declaration() -> None:
    readme = (ROOT / "README.md").read_text()
    assert options_table() in readme, "README.md: paste asyncstreams._run_options.options_table()"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("ASYNCSTREAMS_WORKERS", "0", "expected at least 1, got '0'"),
        ("ASYNCSTREAMS_WORKERS", "two", "expected a whole number, got 'two'"),
        ("ASYNCSTREAMS_GRACE_PERIOD", "-1", "expected seconds >= 0, got '-1'"),
        ("ASYNCSTREAMS_LOOP", "trio", "expected one of auto, uvloop, asyncio, got 'trio'"),
        (
            "ASYNCSTREAMS_LOG_LEVEL",
            "verbose",
            "expected one of critical, error, warning, info, debug, got 'verbose'",
        ),
        ("ASYNCSTREAMS_LOG_FORMAT", "xml", "expected one of text, json, got 'xml'"),
        (
            "ASYNCSTREAMS_EMBEDDED",
            "maybe",
            "expected one of 1, true, yes, 0, false, no (any case), got 'maybe'",
        ),
        (
            "ASYNCSTREAMS_RELOAD",
            "2",
            "expected one of 1, true, yes, 0, false, no (any case), got '2'",
        ),
    ],
)
def test_a_bad_variable_exits_2_in_one_line_naming_it(
    start_cli: StartCli, variable: str, value: str, expected: str
) -> None:
    cli = start_cli("run", LEDGER_APP, env={variable: value})

    assert exit_code(cli, timeout=15) == 2, cli.output()
    assert cli.output().strip() == (
        f"asyncstreams: error: environment variable {variable}: {expected}"
    )


def test_a_flag_on_the_command_line_wins_over_its_bad_variable(
    start_cli: StartCli, redis_url: str, names: Names, tmp_path: Path
) -> None:
    env = ledger_env(names, tmp_path / "ledger.jsonl") | {"ASYNCSTREAMS_WORKERS": "zero"}
    cli = start_cli("run", LEDGER_APP, "--url", redis_url, "--workers", "1", env=env)

    cli.wait_for_output(RUNNING)
    assert stop(cli) == 0, cli.output()


@pytest.mark.parametrize(
    ("flags", "variable", "info_shown"),
    [
        pytest.param([], "WARNING", False, id="variable-alone"),
        pytest.param(["--log-level", "info"], "warning", True, id="flag-over-variable"),
        pytest.param([], "", True, id="empty-variable-is-unset"),
    ],
)
def test_log_level_from_its_variable(
    start_cli: StartCli,
    redis_client: redis.Redis,
    redis_url: str,
    names: Names,
    tmp_path: Path,
    flags: list[str],
    variable: str,
    info_shown: bool,
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    env = ledger_env(names, ledger) | {"ASYNCSTREAMS_LOG_LEVEL": variable}
    cli = start_cli("run", LEDGER_APP, "--url", redis_url, *flags, env=env)
    publish(redis_client, names.stream, 1)
    wait_until(lambda: len(read_ledger(ledger)) == 1, what="the entry handled", cli=cli)

    assert stop(cli) == 0, cli.output()
    assert (" INFO " in cli.output()) is info_shown, cli.output()


def test_variables_set_the_supervisor_and_reach_workers_as_flags(
    start_cli: StartCli, names: Names, tmp_path: Path
) -> None:
    """ASYNCSTREAMS_WORKERS=2 and ASYNCSTREAMS_EMBEDDED=yes make one supervisor of two
    workers on one embedded server: the workers, which inherit the environment, do not
    read these variables as their own (else each would supervise workers of its own, on a
    server of its own). ASYNCSTREAMS_LOG_FORMAT=json reaches them: every line is JSON."""
    ledger = tmp_path / "ledger.jsonl"
    env = ledger_env(names, ledger) | {
        "ASYNCSTREAMS_WORKERS": "2",
        "ASYNCSTREAMS_EMBEDDED": "yes",
        "ASYNCSTREAMS_LOG_FORMAT": "json",
        "ASYNCSTREAMS_GRACE_PERIOD": "5",
    }
    cli = start_cli("run", LEDGER_APP, env=env)
    wait_until(lambda: cli.output().count(RUNNING) == 2, what="2 workers running", cli=cli)
    found = re.search(r"embedded redis-server \S+ on (redis://127\.0\.0\.1:\d+/0)", cli.output())
    assert found is not None, cli.output()
    workers = psutil.Process(cli.pid).children()
    assert len([p for p in workers if "redis-server" not in p.name()]) == 2, workers
    for worker in workers:
        assert worker.children() == [], "a worker started processes of its own"
    client = redis.Redis.from_url(found[1], decode_responses=True, protocol=2)
    try:
        publish(client, names.stream, 10)
        wait_until(lambda: len(read_ledger(ledger)) == 10, what="10 entries handled", cli=cli)
    finally:
        client.close()

    assert stop(cli) == 0, cli.output()
    records = [json.loads(line) for line in cli.output().splitlines()]
    assert sum("embedded redis-server" in record["message"] for record in records) == 1
    assert sum("handlers get up to 5.0 s" in record["message"] for record in records) == 2


def test_embedded_from_its_variable_and_url_flag_exclude_each_other(
    start_cli: StartCli, redis_url: str
) -> None:
    cli = start_cli("run", LEDGER_APP, "--url", redis_url, env={"ASYNCSTREAMS_EMBEDDED": "1"})

    assert exit_code(cli, timeout=15) == 2, cli.output()
    assert cli.output().strip() == (
        "asyncstreams: error: ASYNCSTREAMS_EMBEDDED and --url exclude each other"
    )


def test_embedded_variable_off_leaves_the_url_flag_alone(
    start_cli: StartCli, redis_url: str, names: Names, tmp_path: Path
) -> None:
    env = ledger_env(names, tmp_path / "ledger.jsonl") | {"ASYNCSTREAMS_EMBEDDED": "No"}
    cli = start_cli("run", LEDGER_APP, "--url", redis_url, env=env)

    cli.wait_for_output(RUNNING)
    assert stop(cli) == 0, cli.output()
    assert "embedded redis-server" not in cli.output()
