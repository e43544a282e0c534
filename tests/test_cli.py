"""The CLI as users run it: `python -m asyncstreams run module:app` as a child process against
a real redis-server, stopped with real signals.

These are plain sync tests: each runs child processes and waits on them, so running it on both
asyncio and uvloop would only double the waiting. Redis is checked with the sync client.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
import redis

from asyncstreams._slots import key_slot
from asyncstreams._supervisor import GIVE_UP_WINDOW, RESTART_DELAY
from asyncstreams.deadletter import DeadLetter
from asyncstreams.embedded import free_port

from .apps.ledger import read as read_events
from .conftest import Names
from .helpers import ROOT, CliProcess, app_env, own_server, read_ledger

LEDGER_APP = "tests.apps.ledger_app:app"
TYPED_APP = "tests.apps.typed_app:app"
URL_APP = "tests.apps.url_app:app"
RUNNING = "asyncstreams running 1 consumer(s)"
SECRET = "s3cret"

StartCli = Callable[..., CliProcess]


# -- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True, protocol=2)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def start_cli(tmp_path: Path) -> Iterator[StartCli]:
    """Start `python -m asyncstreams ARGS...`; every process started is gone after the test."""
    started: list[CliProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> CliProcess:
        log_path = tmp_path / f"cli-{len(started)}.log"
        cli = CliProcess(list(args), env=env, log_path=log_path)
        started.append(cli)
        return cli

    try:
        yield start
    finally:
        for cli in started:
            cli.stop()


def wait_until(
    check: Callable[[], bool], *, what: str, timeout: float = 15.0, cli: CliProcess | None = None
) -> None:
    """Poll `check` until it is true; fail naming `what` (and showing `cli`'s output)."""
    deadline = time.monotonic() + timeout
    while not check():
        if cli is not None and cli.process.poll() is not None:
            raise AssertionError(
                f"process exited ({cli.process.returncode}) while waiting for {what}:\n"
                + cli.output()
            )
        if time.monotonic() > deadline:
            output = f":\n{cli.output()}" if cli is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{output}")
        time.sleep(0.02)


def exit_code(cli: CliProcess, timeout: float = 20.0) -> int:
    """Wait for `cli` to exit; fail showing its output if it is still running after `timeout`."""
    try:
        return cli.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {timeout} s later:\n{cli.output()}") from None


def stop(cli: CliProcess, signum: int = signal.SIGTERM, timeout: float = 20.0) -> int:
    cli.signal(signum)
    return exit_code(cli, timeout)


def id_key(entry_id: str) -> tuple[int, int]:
    milliseconds, sequence = entry_id.split("-")
    return int(milliseconds), int(sequence)


def publish(client: redis.Redis, stream: str, count: int) -> list[str]:
    with client.pipeline(transaction=False) as pipe:
        for n in range(count):
            pipe.xadd(stream, {"n": str(n)})
        return list(pipe.execute())


def pending(client: redis.Redis, stream: str, group: str) -> int:
    return int(client.xpending(stream, group)["pending"])


def group_info(client: redis.Redis, stream: str, group: str) -> dict[str, Any]:
    groups = {info["name"]: info for info in client.xinfo_groups(stream)}
    return groups[group]


def drained(client: redis.Redis, stream: str, group: str) -> bool:
    """True when the group has read every entry of the stream and none is pending."""
    try:
        info = group_info(client, stream, group)
    except (redis.ResponseError, KeyError):
        return False  # no stream or no group yet
    last = client.xinfo_stream(stream)["last-generated-id"]
    return bool(info["pending"] == 0 and info["last-delivered-id"] == last)


def wait_drained(
    client: redis.Redis, stream: str, group: str, cli: CliProcess, timeout: float = 20.0
) -> None:
    wait_until(
        lambda: drained(client, stream, group), what=f"{stream} drained", timeout=timeout, cli=cli
    )


def is_gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def worker_pids(output: str) -> set[int]:
    return {int(pid) for pid in re.findall(r"started worker \d+ \(pid (\d+)\)", output)}


def consumer_names(output: str) -> list[str]:
    return re.findall(r"consuming streams=\S+ group=\S+ consumer=(\S+)", output)


def ledger_env(names: Names, ledger: Path, **settings: object) -> dict[str, str]:
    return app_env(streams=names.stream, group=names.group, ledger=ledger, **settings)


# -- errors at start ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        pytest.param(
            ["run", "tests.apps.ledger_app"],
            2,
            ['invalid target "tests.apps.ledger_app"', 'expected "module:attribute"'],
            id="no-colon",
        ),
        pytest.param(
            ["run", ":app"],
            2,
            ['invalid target ":app"', 'expected "module:attribute"'],
            id="no-module-part",
        ),
        pytest.param(
            ["run", "tests.apps.no_such_module:app"],
            2,
            [
                'cannot import "tests.apps.no_such_module:app": '
                'no module named "tests.apps.no_such_module"',
                'expected "module:attribute"',
            ],
            id="missing-module",
        ),
        pytest.param(
            ["run", "no_such_package.tasks:app"],
            2,
            ['cannot import "no_such_package.tasks:app": no module named "no_such_package"'],
            id="missing-package",
        ),
        pytest.param(
            ["run", "tests.apps.ledger_app:ap"],
            2,
            [
                'cannot import "tests.apps.ledger_app:ap": '
                'module "tests.apps.ledger_app" has no attribute "ap"; '
                'expected "module:attribute"'
            ],
            id="missing-attribute",
        ),
        pytest.param(
            ["run", "tests.apps.ledger_app:app.nope"],
            2,
            ['module "tests.apps.ledger_app" has no attribute "app.nope"'],
            id="missing-dotted-attribute",
        ),
        pytest.param(
            ["run", "tests.apps.ledger_app:handle"],
            2,
            ['"tests.apps.ledger_app:handle" is function', "expected an asyncstreams App"],
            id="not-an-app",
        ),
        pytest.param(
            ["run", LEDGER_APP, "--workers", "0"],
            2,
            ["argument --workers: expected at least 1, got '0'"],
            id="workers-0",
        ),
        pytest.param(
            ["run", LEDGER_APP, "--workers", "two"],
            2,
            ["argument --workers: expected a whole number, got 'two'"],
            id="workers-not-a-number",
        ),
        pytest.param(
            ["run", LEDGER_APP, "--grace-period", "-1"],
            2,
            ["argument --grace-period: expected seconds >= 0, got '-1'"],
            id="grace-period-negative",
        ),
        pytest.param(
            ["run", LEDGER_APP, "--grace-period", "nan"],
            2,
            ["argument --grace-period: expected seconds >= 0, got 'nan'"],
            id="grace-period-nan",
        ),
        pytest.param(
            ["run", LEDGER_APP, "--url", "ftp://x"],
            2,
            ["argument --url:", "one of redis://, rediss://, unix://", "got ftp:// in ftp://x"],
            id="url-scheme",
        ),
        pytest.param(
            ["run", LEDGER_APP, "--url", f"ftp://user:{SECRET}@x/0"],
            2,
            ["argument --url:", "got ftp:// in ftp://user:***@x/0"],
            id="url-scheme-with-password",
        ),
        pytest.param(
            ["run", LEDGER_APP, "--embedded", "--url", "redis://127.0.0.1:1/0"],
            2,
            ["asyncstreams: error: --embedded and --url exclude each other"],
            id="embedded-and-url",
        ),
        pytest.param(
            ["run", LEDGER_APP, "--embedded-cluster", "--url", "redis://127.0.0.1:1/0"],
            2,
            ["asyncstreams: error: --embedded-cluster and --url exclude each other"],
            id="embedded-cluster-and-url",
        ),
        pytest.param(
            ["run", LEDGER_APP, "--embedded", "--embedded-cluster"],
            2,
            ["asyncstreams: error: --embedded and --embedded-cluster exclude each other"],
            id="embedded-and-embedded-cluster",
        ),
        pytest.param(
            ["run", LEDGER_APP, "--loop", "trio"],
            2,
            ["argument --loop: invalid choice: 'trio'"],
            id="loop-unknown",
        ),
        pytest.param(
            ["run"],
            2,
            ["the following arguments are required: target"],
            id="no-target",
        ),
        pytest.param(
            ["run", LEDGER_APP, "--log-level", "verbose"],
            2,
            ["argument --log-level: invalid choice: 'verbose'"],
            id="log-level-unknown",
        ),
        pytest.param(
            ["dead-letters", "x:dead-letter", "--json", "--replay"],
            2,
            ["argument --replay: not allowed with argument --json"],
            id="dead-letters-json-and-replay",
        ),
    ],
)
def test_usage_errors_exit_2_saying_what_was_expected(
    start_cli: StartCli, args: list[str], code: int, expected: list[str]
) -> None:
    cli = start_cli(*args)

    assert exit_code(cli, timeout=15) == code, cli.output()
    output = cli.output()
    for text in expected:
        assert text in output
    assert "Traceback" not in output
    assert SECRET not in output


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        pytest.param(
            "tests.apps.raising_app:app",
            ["raising_app.py", "RuntimeError: raising_app fails on import, on purpose"],
            id="raises",
        ),
        pytest.param(
            "tests.apps.missing_dependency_app:app",
            [
                "missing_dependency_app.py",
                "ModuleNotFoundError: No module named 'asyncstreams_test_no_such_dependency'",
            ],
            id="imports-a-missing-module",
        ),
    ],
)
def test_module_failing_on_import_shows_its_traceback(
    start_cli: StartCli, target: str, expected: list[str]
) -> None:
    cli = start_cli("run", target)

    assert exit_code(cli, timeout=15) != 0
    output = cli.output()
    assert "Traceback (most recent call last)" in output
    for text in expected:
        assert text in output
    # The module was found: the error must not claim it is missing.
    assert 'cannot import "' not in output


def test_unreachable_redis_exits_1_with_one_line_and_no_password(
    start_cli: StartCli, names: Names, tmp_path: Path
) -> None:
    port = free_port()
    url = f"redis://user:{SECRET}@127.0.0.1:{port}/0"
    ledger = tmp_path / "ledger.jsonl"

    cli = start_cli("run", LEDGER_APP, "--url", url, env=ledger_env(names, ledger))

    assert exit_code(cli, timeout=30) == 1, cli.output()
    output = cli.output()
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith(f"asyncstreams: error: cannot reach Redis at 127.0.0.1:{port}: ")
    assert SECRET not in output
    assert not ledger.exists()


def test_unreachable_redis_with_workers_stops_all_before_start(
    start_cli: StartCli, names: Names, tmp_path: Path
) -> None:
    port = free_port()
    url = f"redis://user:{SECRET}@127.0.0.1:{port}/0"
    ledger = tmp_path / "ledger.jsonl"

    cli = start_cli(
        "run", LEDGER_APP, "--url", url, "--workers", "2", env=ledger_env(names, ledger)
    )

    code = exit_code(cli, timeout=30)
    output = cli.output()
    assert code != 0, output
    assert f"asyncstreams: error: cannot reach Redis at 127.0.0.1:{port}: " in output
    stopped_all = r"worker \d \(pid \d+\) exited with code 1 before it started; stopping all"
    assert re.search(stopped_all, output)
    assert "restarting it" not in output
    assert SECRET not in output
    assert all(is_gone(pid) for pid in worker_pids(output))


BAD_OPTION_APP = "tests.apps.bad_option_app:app"
FAILING_APP = "tests.apps.failing_app:app"


def failing_env(names: Names, when: str, how: str) -> dict[str, str]:
    return {"FAILING_APP_WHEN": when, "FAILING_APP_HOW": how, "FAILING_APP_PREFIX": names.prefix}


def line_of(path: str, text: str) -> int:
    """The number of the first line of `path` (under the repository) holding `text`."""
    lines = (Path(__file__).parent.parent / path).read_text().splitlines()
    return next(number for number, line in enumerate(lines, 1) if text in line)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_configuration_error_on_import_exits_2_with_one_line_naming_its_line(
    start_cli: StartCli, redis_url: str, workers: str
) -> None:
    cli = start_cli("run", BAD_OPTION_APP, "--url", redis_url, "--workers", workers)

    assert exit_code(cli, timeout=15) == 2, cli.output()
    output = cli.output()
    assert len(output.strip().splitlines()) == 1, output
    where = f"tests/apps/bad_option_app.py:{line_of('tests/apps/bad_option_app.py', '0)')}: "
    assert output.startswith(f"asyncstreams: error: {where}"), output
    assert "concurrency" in output
    assert "started worker" not in output


@pytest.mark.parametrize(
    ("how", "code"),
    [
        pytest.param("RedisRefusedError", 2, id="refused-2"),
        pytest.param("ConfigurationError", 2, id="configuration-2"),
        pytest.param("RedisUnavailableError", 1, id="unavailable-1"),
    ],
)
def test_asyncstreams_error_at_start_exits_with_its_code_and_one_line(
    start_cli: StartCli, redis_url: str, names: Names, how: str, code: int
) -> None:
    env = failing_env(names, "start", how)
    cli = start_cli("run", FAILING_APP, "--url", redis_url, env=env)

    assert exit_code(cli, timeout=15) == code, cli.output()
    output = cli.output()
    assert output.strip().splitlines()[-1] == (
        f"asyncstreams: error: failing_app fails at start ({how}), on purpose"
    )
    assert output.count("asyncstreams: error:") == 1, output
    assert "Traceback" not in output


def test_refused_at_start_with_workers_stops_all_with_code_2(
    start_cli: StartCli, redis_url: str, names: Names
) -> None:
    env = failing_env(names, "start", "RedisRefusedError")
    cli = start_cli("run", FAILING_APP, "--url", redis_url, "--workers", "2", env=env)

    assert exit_code(cli, timeout=20) == 2, cli.output()
    output = cli.output()
    assert "asyncstreams: error: failing_app fails at start (RedisRefusedError)" in output
    assert re.search(r"exited with code 2 before it started; stopping all", output)
    assert "Traceback" not in output
    assert all(is_gone(pid) for pid in worker_pids(output))


def test_app_failing_while_running_exits_1_with_one_line_and_no_second_traceback(
    start_cli: StartCli, redis_url: str, names: Names
) -> None:
    cli = start_cli(
        "run", FAILING_APP, "--url", redis_url, env=failing_env(names, "running", "raise")
    )

    assert exit_code(cli, timeout=20) == 1, cli.output()
    output = cli.output()
    assert RUNNING in output
    assert "Traceback" not in output
    line = line_of("tests/apps/failing_app.py", 'raise RuntimeError("failing_app fails while')
    [failure] = [text for text in output.splitlines() if "failed while running" in text]
    assert failure.endswith(
        "ERROR   asyncstreams.runner: the app failed while running: RuntimeError: failing_app "
        f"fails while running, on purpose (at tests/apps/failing_app.py:{line} in lifespan); "
        "exiting with code 1"
    ), failure


@pytest.mark.parametrize("level", ["WARNING", "Warning"])
def test_log_level_in_any_case(
    start_cli: StartCli,
    redis_client: redis.Redis,
    redis_url: str,
    names: Names,
    tmp_path: Path,
    level: str,
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    cli = start_cli(
        "run", LEDGER_APP, "--url", redis_url, "--log-level", level, env=ledger_env(names, ledger)
    )
    publish(redis_client, names.stream, 1)
    wait_until(lambda: len(read_ledger(ledger)) == 1, what="the entry handled", cli=cli)

    assert stop(cli) == 0, cli.output()
    assert " INFO " not in cli.output()


# -- consuming ------------------------------------------------------------------------------


def test_seed_producer_feeds_typed_handler(
    start_cli: StartCli,
    redis_client: redis.Redis,
    redis_url: str,
    names: Names,
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "typed.jsonl"
    env = {
        "TYPED_APP_STREAM": names.stream,
        "TYPED_APP_GROUP": names.group,
        "TYPED_APP_LEDGER": str(ledger),
    }
    cli = start_cli("run", TYPED_APP, "--url", redis_url, env=env)
    cli.wait_for_output(RUNNING)

    # The seed guide's producer, as written there.
    produced: dict[str, tuple[str, str, str]] = {}
    for n in range(20):
        task_id, data, created_at = str(uuid.uuid4()), f"payload {n}", str(time.time())
        entry_id = redis_client.xadd(
            names.stream,
            {"task_id": task_id, "data": data, "created_at": created_at},
            maxlen=1000,
            approximate=True,
        )
        produced[str(entry_id)] = (task_id, data, created_at)
    wait_drained(redis_client, names.stream, names.group, cli)

    assert stop(cli) == 0, cli.output()
    records = read_events(ledger)
    assert sorted((record["id"] for record in records), key=id_key) == list(produced)
    for record in records:
        task_id, data, created_at = produced[record["id"]]
        assert record["task_id"] == task_id
        assert record["data"] == data
        assert record["created_at_type"] == "float"
        assert record["created_at"] == float(created_at)
        assert (record["stream"], record["group"], record["deliveries"]) == (
            names.stream,
            names.group,
            1,
        )
    assert pending(redis_client, names.stream, names.group) == 0
    assert (
        ": stopped; 20 acked, 0 retried, 0 dead-lettered, 0 cancelled, 0 never started"
        in cli.output()
    )


# -- stopping -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "loop"),
    [
        pytest.param(signal.SIGTERM, "auto", id="SIGTERM-auto-loop"),
        pytest.param(signal.SIGINT, "asyncio", id="SIGINT-asyncio-loop"),
    ],
)
def test_first_signal_drains_what_was_delivered(
    start_cli: StartCli,
    redis_client: redis.Redis,
    redis_url: str,
    names: Names,
    tmp_path: Path,
    signum: signal.Signals,
    loop: str,
) -> None:
    ids = publish(redis_client, names.stream, 40)
    ledger = tmp_path / "ledger.jsonl"
    env = ledger_env(names, ledger, concurrency=4, batch_size=10, sleep=0.5)
    cli = start_cli("run", LEDGER_APP, "--url", redis_url, "--loop", loop, env=env)
    wait_until(lambda: len(read_ledger(ledger)) >= 1, what="a handler run", cli=cli)

    assert stop(cli, signum) == 0, cli.output()
    output = cli.output()
    runs = read_ledger(ledger)
    handled = [run.id for run in runs]
    assert f"{signum.name} received: stopping" in output
    assert [run.id for run in runs if run.end is None] == []
    assert len(handled) == len(set(handled)), "an entry was handled twice"
    assert pending(redis_client, names.stream, names.group) == 0
    # Everything the group delivered was handled; the rest was never read and waits there.
    last_delivered = group_info(redis_client, names.stream, names.group)["last-delivered-id"]
    delivered = ids[: ids.index(last_delivered) + 1]
    assert sorted(handled, key=id_key) == delivered
    assert len(delivered) < len(ids)
    assert redis_client.xlen(names.stream) == len(ids)
    summary = (
        f": stopped; {len(runs)} acked, 0 retried, 0 dead-lettered, 0 cancelled, 0 never started"
    )
    assert summary in output


@pytest.mark.parametrize(
    ("flags", "app_grace"),
    [
        pytest.param(["--grace-period", "1"], 30, id="grace-period-flag-over-app"),
        pytest.param([], 1, id="grace-period-of-the-app"),
    ],
)
def test_handler_past_grace_period_is_cancelled_and_stays_pending(
    start_cli: StartCli,
    redis_client: redis.Redis,
    redis_url: str,
    names: Names,
    tmp_path: Path,
    flags: list[str],
    app_grace: float,
) -> None:
    ids = publish(redis_client, names.stream, 10)
    ledger = tmp_path / "ledger.jsonl"
    # Room for concurrency + batch_size = 6 delivered entries: 4 running, the rest waiting to
    # start (the first read takes 1 entry, the next ones 2: 5 are delivered).
    env = ledger_env(names, ledger, concurrency=4, batch_size=2, sleep=60, grace=app_grace)
    cli = start_cli("run", LEDGER_APP, "--url", redis_url, *flags, env=env)
    wait_until(
        lambda: (
            len(read_ledger(ledger)) == 4 and pending(redis_client, names.stream, names.group) == 5
        ),
        what="4 handlers running and 5 entries delivered",
        cli=cli,
    )

    sent = time.monotonic()
    # The time limit only catches a hang (the handlers sleep 60 s): that the stop did not
    # wait for them shows in the summary line, 4 cancelled.
    assert stop(cli, timeout=30) == 0, cli.output()
    elapsed = time.monotonic() - sent
    output = cli.output()
    assert elapsed >= 1.0, f"stopped {elapsed:.2f} s after SIGTERM with a 1 s grace period"
    runs = read_ledger(ledger)
    assert len(runs) == 4
    assert all(run.end is None for run in runs)
    assert ": stopped; 0 acked, 0 retried, 0 dead-lettered, 4 cancelled, 1 never started" in output
    [consumer] = consumer_names(output)
    entries = redis_client.xpending_range(names.stream, names.group, "-", "+", 100)
    assert [entry["message_id"] for entry in entries] == ids[:5]
    assert {entry["consumer"] for entry in entries} == {consumer}
    # Given back to the group: the cancelled runs count, the entry that never started does not.
    started = {run.id for run in runs}
    assert {e["message_id"]: e["times_delivered"] for e in entries} == {
        entry_id: 1 if entry_id in started else 0 for entry_id in ids[:5]
    }


def test_second_signal_stops_at_once(
    start_cli: StartCli,
    redis_client: redis.Redis,
    redis_url: str,
    names: Names,
    tmp_path: Path,
) -> None:
    publish(redis_client, names.stream, 4)
    ledger = tmp_path / "ledger.jsonl"
    env = ledger_env(names, ledger, concurrency=4, sleep=60)
    cli = start_cli("run", LEDGER_APP, "--url", redis_url, "--grace-period", "60", env=env)
    wait_until(lambda: len(read_ledger(ledger)) == 4, what="4 handlers running", cli=cli)

    cli.signal(signal.SIGTERM)
    cli.wait_for_output("SIGTERM received: stopping")
    assert cli.process.poll() is None, "the first signal must wait for the handlers"
    cli.signal(signal.SIGTERM)
    # The time limit only catches a hang: the grace period and the handlers are 60 s. That
    # the handlers were cut short shows in the summary line.
    code = exit_code(cli, timeout=30)

    output = cli.output()
    assert code == 1, output
    assert "SIGTERM received again: stopping now" in output
    assert ": stopped; 0 acked, 0 retried, 0 dead-lettered, 4 cancelled, 0 never started" in output
    assert all(run.end is None for run in read_ledger(ledger))
    assert pending(redis_client, names.stream, names.group) == 4


# -- workers --------------------------------------------------------------------------------


def start_workers(
    start_cli: StartCli, redis_url: str, names: Names, ledger: Path, *, sleep: float
) -> CliProcess:
    env = ledger_env(names, ledger, concurrency=2, sleep=sleep)
    cli = start_cli("run", LEDGER_APP, "--url", redis_url, "--workers", "2", env=env)
    wait_until(lambda: cli.output().count(RUNNING) == 2, what="2 workers running", cli=cli)
    return cli


def test_workers_share_the_group_and_stop_together(
    start_cli: StartCli,
    redis_client: redis.Redis,
    redis_url: str,
    names: Names,
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    cli = start_workers(start_cli, redis_url, names, ledger, sleep=0.05)
    output = cli.output()
    pids = worker_pids(output)
    consumers = consumer_names(output)
    assert len(pids) == 2
    assert cli.pid not in pids
    assert len(set(consumers)) == 2

    ids = publish(redis_client, names.stream, 40)
    wait_drained(redis_client, names.stream, names.group, cli)

    runs = read_ledger(ledger)
    assert sorted((run.id for run in runs), key=id_key) == ids, "each entry exactly once"
    assert {run.pid for run in runs} == pids
    registered = redis_client.xinfo_consumers(names.stream, names.group)
    assert {consumer["name"] for consumer in registered} == set(consumers)

    assert stop(cli) == 0, cli.output()
    assert cli.output().count(": stopped; ") == 2
    wait_until(lambda: all(is_gone(pid) for pid in pids), what="the workers gone", timeout=5)


def test_worker_killed_after_start_is_restarted(
    start_cli: StartCli,
    redis_client: redis.Redis,
    redis_url: str,
    names: Names,
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    cli = start_workers(start_cli, redis_url, names, ledger, sleep=0.1)
    first = publish(redis_client, names.stream, 20)
    wait_drained(redis_client, names.stream, names.group, cli)  # the victim holds nothing
    victim = read_ledger(ledger)[0].pid
    assert victim in worker_pids(cli.output())
    assert psutil.Process(victim).ppid() == cli.pid

    os.kill(victim, signal.SIGKILL)
    cli.wait_for_output(f"(pid {victim}) exited with code -9 after ")
    assert re.search(rf"\(pid {victim}\) exited .* restarting it in \d+\.\d s", cli.output())
    wait_until(lambda: cli.output().count(RUNNING) == 3, what="the new worker running", cli=cli)
    index = re.search(rf"worker (\d+) \(pid {victim}\) exited", cli.output())
    assert index is not None
    restarted = re.search(rf"restarted worker {index[1]} \(pid (\d+)\)", cli.output())
    assert restarted is not None, cli.output()
    new_pid = int(restarted[1])
    assert new_pid != victim

    later = publish(redis_client, names.stream, 40)
    wait_drained(redis_client, names.stream, names.group, cli)

    runs = read_ledger(ledger)
    assert sorted((run.id for run in runs), key=id_key) == first + later, "each entry once"
    later_pids = {run.pid for run in runs if run.id in set(later)}
    assert new_pid in later_pids
    assert victim not in later_pids
    assert stop(cli) == 0, cli.output()


def test_workers_second_signal_stops_at_once(
    start_cli: StartCli,
    redis_client: redis.Redis,
    redis_url: str,
    names: Names,
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    env = ledger_env(names, ledger, concurrency=2, sleep=60)
    args = ["run", LEDGER_APP, "--url", redis_url, "--workers", "2", "--grace-period", "60"]
    cli = start_cli(*args, env=env)
    wait_until(lambda: cli.output().count(RUNNING) == 2, what="2 workers running", cli=cli)
    publish(redis_client, names.stream, 4)
    wait_until(lambda: len(read_ledger(ledger)) >= 2, what="handlers running", cli=cli)
    pids = worker_pids(cli.output())

    cli.signal(signal.SIGTERM)
    wait_until(
        lambda: cli.output().count("SIGTERM received: stopping") == 2,
        what="both workers stopping",
        cli=cli,
    )
    cli.signal(signal.SIGTERM)
    # The time limit only catches a hang: the grace period and the handlers are 60 s. That
    # the handlers were cut short shows in the workers' summary lines.
    code = exit_code(cli, timeout=30)

    output = cli.output()
    assert code == 1, output
    assert "SIGTERM received again: stopping now" in output
    summaries = re.findall(
        r": stopped; 0 acked, 0 retried, 0 dead-lettered, (\d+) cancelled", output
    )
    assert len(summaries) == 2, output
    assert sum(map(int, summaries)) == len(read_ledger(ledger)), output
    assert all(run.end is None for run in read_ledger(ledger))
    wait_until(lambda: all(is_gone(pid) for pid in pids), what="the workers gone", timeout=5)


def test_stop_signal_during_a_restart_stops_the_restarted_worker(
    start_cli: StartCli, redis_url: str, names: Names, tmp_path: Path
) -> None:
    """A worker that dies is restarted after a pause (a longer one each time it dies);
    a SIGTERM that arrives during the pause must stop the supervisor all the same."""
    ledger = tmp_path / "ledger.jsonl"
    cli = start_workers(start_cli, redis_url, names, ledger, sleep=0)
    [first] = re.findall(r"started worker 1 \(pid (\d+)\)", cli.output())
    os.kill(int(first), signal.SIGKILL)
    cli.wait_for_output("restarted worker 1 (pid ")
    [second] = re.findall(r"restarted worker 1 \(pid (\d+)\)", cli.output())
    wait_until(lambda: cli.output().count(RUNNING) == 3, what="worker 1 running again", cli=cli)
    assert psutil.Process(int(second)).ppid() == cli.pid

    # Its second exit: the supervisor pauses at least RESTART_DELAY before starting it again,
    # and the signal arrives during that pause.
    os.kill(int(second), signal.SIGKILL)
    cli.wait_for_output(f"(pid {second}) exited with code -9 after ")
    assert stop(cli, timeout=10) == 0, cli.output()
    assert cli.output().count("restarted worker 1 (pid ") == 1, cli.output()
    pids = {int(pid) for pid in re.findall(r"worker \d+ \(pid (\d+)\)", cli.output())}
    wait_until(lambda: all(is_gone(pid) for pid in pids), what="every worker gone", timeout=5)


def restart_delays(output: str, index: str) -> list[float]:
    pattern = (
        rf"worker {index} \(pid \d+\) exited with code -?\d+ after [\d.]+ s; "
        r"restarting it in ([\d.]+) s"
    )
    return [float(delay) for delay in re.findall(pattern, output)]


def test_worker_that_keeps_failing_stops_the_supervisor_with_the_reason(
    start_cli: StartCli, redis_url: str, names: Names
) -> None:
    """Workers that become ready and then fail, again at every start: one exits with code 2,
    in the other app fails while running (exit 1). Each supervisor restarts them with a
    growing pause, then gives up with one line saying why, and exits 1."""
    clis = {
        how: start_cli(
            "run",
            FAILING_APP,
            "--url",
            redis_url,
            "--workers",
            "2",
            env=failing_env(names, "running", how) | {"FAILING_APP_PREFIX": names(how)},
        )
        for how in ("exit:2", "raise")
    }
    # Five exits, four pauses of at most 0.5 + 1 + 2 + 4 s, and five starts of a worker: about
    # 15 s. The time limit only catches a supervisor that never gives up; how long the pauses
    # were is checked below, from what the supervisor logged.
    codes = {how: exit_code(cli, timeout=90) for how, cli in clis.items()}

    for how, cli in clis.items():
        output = cli.output()
        assert codes[how] == 1, output
        last_code = 2 if how == "exit:2" else 1
        gave_up = re.findall(
            rf"worker (\d) \(pid \d+\) exited 5 times within ([\d.]+) s, the last time with "
            rf"code {last_code}; giving up: stopping all workers",
            output,
        )
        assert len(gave_up) == 1, output
        index, within = gave_up[0]
        assert float(within) < GIVE_UP_WINDOW
        delays = restart_delays(output, index)
        assert len(delays) == 4, output
        for attempt, delay in enumerate(delays):
            ceiling = RESTART_DELAY * 2**attempt
            assert ceiling / 2 - 0.05 <= delay <= ceiling + 0.05, (attempt, delays)
        if how == "raise":
            assert "the app failed while running: RuntimeError: failing_app fails" in output
        assert "Traceback" not in output
        pids = {int(pid) for pid in re.findall(r"worker \d \(pid (\d+)\)", output)}
        assert all(is_gone(pid) for pid in pids), output


def test_sighup_restarts_the_workers_one_at_a_time(
    start_cli: StartCli,
    redis_client: redis.Redis,
    redis_url: str,
    names: Names,
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    cli = start_workers(start_cli, redis_url, names, ledger, sleep=0.3)
    old = worker_pids(cli.output())
    first = publish(redis_client, names.stream, 8)
    wait_until(lambda: len(read_ledger(ledger)) >= 2, what="handlers running", cli=cli)

    cli.signal(signal.SIGHUP)
    cli.wait_for_output("restarted all 2 workers", timeout=30)
    output = cli.output()
    assert "SIGHUP received: restarting the 2 workers one at a time" in output
    # One at a time: worker 2 is stopped only once the new worker 1 runs.
    second_stop = output.index("restarting worker 2 (pid ")
    assert output.index("restarting worker 1 (pid ") < output.index("restarted worker 1 (pid ")
    assert output[:second_stop].count(RUNNING) == 3, output
    new = {int(pid) for pid in re.findall(r"restarted worker \d \(pid (\d+)\)", output)}
    assert len(new) == 2
    assert not new & old
    assert all(psutil.Process(pid).ppid() == cli.pid for pid in new)
    wait_until(lambda: all(is_gone(pid) for pid in old), what="the old workers gone", timeout=5)
    # The old workers stopped gracefully: what they had started, they finished and acked.
    assert output.count(": stopped; ") == 2
    assert "SIGTERM received again" not in output
    assert re.search(r"[1-9]\d* cancelled", output) is None

    later = publish(redis_client, names.stream, 20)
    wait_drained(redis_client, names.stream, names.group, cli)
    runs = read_ledger(ledger)
    assert all(run.end is not None for run in runs)
    assert sorted({run.id for run in runs}, key=id_key) == first + later
    assert {run.pid for run in runs if run.id in set(later)} <= new
    assert stop(cli) == 0, cli.output()


def test_stop_signal_during_a_sighup_restart_stops_gracefully(
    start_cli: StartCli,
    redis_client: redis.Redis,
    redis_url: str,
    names: Names,
    tmp_path: Path,
) -> None:
    """The worker being restarted was sent SIGTERM already: the user's SIGTERM must not count
    as its second signal (which would cancel its handlers)."""
    ledger = tmp_path / "ledger.jsonl"
    cli = start_workers(start_cli, redis_url, names, ledger, sleep=2)
    publish(redis_client, names.stream, 4)
    wait_until(lambda: len(read_ledger(ledger)) == 4, what="4 handlers running", cli=cli)

    cli.signal(signal.SIGHUP)
    cli.wait_for_output("restarting worker 1 (pid ")
    cli.wait_for_output("SIGTERM received: stopping")
    assert stop(cli) == 0, cli.output()
    output = cli.output()
    assert "SIGTERM received again" not in output
    assert "restarted worker" not in output
    assert all(run.end is not None for run in read_ledger(ledger))
    assert pending(redis_client, names.stream, names.group) == 0


def test_sighup_stops_a_single_process_gracefully(
    start_cli: StartCli,
    redis_client: redis.Redis,
    redis_url: str,
    names: Names,
    tmp_path: Path,
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    env = ledger_env(names, ledger, concurrency=4, sleep=0.5)
    cli = start_cli("run", LEDGER_APP, "--url", redis_url, env=env)
    cli.wait_for_output(RUNNING)
    publish(redis_client, names.stream, 4)
    wait_until(lambda: len(read_ledger(ledger)) == 4, what="4 handlers running", cli=cli)

    assert stop(cli, signal.SIGHUP) == 0, cli.output()
    output = cli.output()
    assert "SIGHUP received: stopping; handlers get up to 10.0 s to finish" in output
    assert ": stopped; 4 acked, 0 retried, 0 dead-lettered, 0 cancelled, 0 never started" in output
    assert all(run.end is not None for run in read_ledger(ledger))
    assert pending(redis_client, names.stream, names.group) == 0


def test_stop_signal_while_the_start_waits_for_redis_is_acted_on_at_once(
    start_cli: StartCli, names: Names, tmp_path: Path
) -> None:
    """Redis accepts the connection and answers nothing (SIGSTOP): the start would wait
    15 s (three PINGs of 5 s); SIGTERM ends it at once."""
    with own_server() as server:
        server.pause()
        env = ledger_env(names, tmp_path / "ledger.jsonl")
        cli = start_cli("run", LEDGER_APP, "--url", server.url, env=env)
        wait_until(
            lambda: _connected_to(cli.pid, server.port), what="a connection to Redis", cli=cli
        )
        # The time limit only tells "at once" from the 15 s the start would wait otherwise.
        assert stop(cli, timeout=10) == 0, cli.output()
        assert "SIGTERM received: stopping" in cli.output()
        server.resume()


def _connected_to(pid: int, port: int) -> bool:
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return False
    return any(c.raddr and c.raddr.port == port for c in connections)


def test_log_level_debug_shows_reads_and_acks(
    start_cli: StartCli, redis_client: redis.Redis, redis_url: str, names: Names, tmp_path: Path
) -> None:
    env = ledger_env(names, tmp_path / "ledger.jsonl")
    cli = start_cli("run", LEDGER_APP, "--url", redis_url, "--log-level", "debug", env=env)
    cli.wait_for_output(RUNNING)
    publish(redis_client, names.stream, 3)
    wait_drained(redis_client, names.stream, names.group, cli)
    assert stop(cli) == 0
    output = cli.output()
    assert re.search(
        r": read [1-3] entries \(COUNT \d+\); holding \d+, \d+ bytes in memory", output
    )
    assert re.search(r": acked [1-3] entries", output)


def test_password_never_shown_by_a_running_supervisor_and_workers(
    start_cli: StartCli, names: Names, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.jsonl"
    # A private server, so that a password can be required. It is set once the server runs:
    # EmbeddedRedis waits for a PONG, which a server started with --requirepass never sends.
    with own_server() as server:
        with redis.Redis.from_url(server.url) as admin:
            admin.config_set("requirepass", SECRET)
        url = f"redis://:{SECRET}@127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(url, decode_responses=True, protocol=2)
        try:
            env = ledger_env(names, ledger)
            args = ["run", LEDGER_APP, "--url", url, "--workers", "2", "--log-level", "debug"]
            cli = start_cli(*args, env=env)
            wait_until(lambda: cli.output().count(RUNNING) == 2, what="2 workers", cli=cli)
            for pid in worker_pids(cli.output()):
                assert SECRET not in " ".join(psutil.Process(pid).cmdline())
            publish(client, names.stream, 10)
            wait_drained(client, names.stream, names.group, cli)

            assert stop(cli) == 0, cli.output()
        finally:
            client.close()
    output = cli.output()
    assert f"{RUNNING} on 127.0.0.1:{server.port}" in output
    assert SECRET not in output
    assert len(read_ledger(ledger)) == 10


# -- embedded -------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_embedded_redis_serves_the_app_and_stops_with_it(
    start_cli: StartCli, names: Names, tmp_path: Path, workers: int
) -> None:
    ledger = tmp_path / "typed.jsonl"
    env = {
        "TYPED_APP_STREAM": names.stream,
        "TYPED_APP_GROUP": names.group,
        "TYPED_APP_LEDGER": str(ledger),
        "TYPED_APP_PUBLISH": "5",
        # --embedded wins over everything else; a wrong URL here must not matter.
        "ASYNCSTREAMS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    cli = start_cli("run", TYPED_APP, "--embedded", "--workers", str(workers), env=env)
    server_pid: int | None = None
    port = 0
    try:
        wait_until(lambda: cli.output().count(RUNNING) == workers, what="running", cli=cli)
        found = re.search(
            r"embedded redis-server \S+ on redis://127\.0\.0\.1:(\d+)/0 \(pid (\d+)\)",
            cli.output(),
        )
        assert found is not None, cli.output()
        port, server_pid = int(found[1]), int(found[2])
        assert psutil.Process(server_pid).ppid() == cli.pid
        assert cli.output().count(f"{RUNNING} on 127.0.0.1:{port}") == workers
        # Each process publishes 5 tasks from the app's lifespan; each task is handled once.
        expected = sorted(f"self-{n}" for n in range(5) for _ in range(workers))
        wait_until(lambda: len(read_events(ledger)) == len(expected), what="tasks handled", cli=cli)

        assert stop(cli) == 0, cli.output()
        records = read_events(ledger)
        assert sorted(record["task_id"] for record in records) == expected
        assert len({record["id"] for record in records}) == len(expected)
        assert {record["created_at_type"] for record in records} == {"float"}
        assert cli.output().count(": stopped; ") == workers
        wait_until(lambda: is_gone(server_pid), what="the embedded redis-server gone", timeout=5)
        with (
            pytest.raises(ConnectionRefusedError),
            socket.create_connection(("127.0.0.1", port), timeout=1),
        ):
            pass
    finally:
        cli.stop()
        # Stopped by SIGKILL, the CLI could not stop its server: end it, if it is still there.
        if server_pid is not None and not is_gone(server_pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                server = psutil.Process(server_pid)
                if "redis-server" in server.name() and str(port) in server.cmdline():
                    server.kill()


@pytest.mark.parametrize("workers", [1, 2])
def test_embedded_cluster_serves_the_app_and_stops_with_it(
    start_cli: StartCli, names: Names, workers: int
) -> None:
    # A stream in the first master's slots (0-5460): the URL's node serves it.
    stream = next(
        f"{names.stream}-{n}" for n in range(10_000) if key_slot(f"{names.stream}-{n}") <= 5460
    )
    env = {
        "URL_APP_URL": f"redis://127.0.0.1:{free_port()}/0",  # --embedded-cluster wins
        "URL_APP_STREAM": stream,
        "URL_APP_GROUP": names.group,
    }
    cli = start_cli("run", URL_APP, "--embedded-cluster", "--workers", str(workers), env=env)
    pids: list[int] = []
    ports: list[int] = []
    try:
        wait_until(lambda: cli.output().count(RUNNING) == workers, what="running", cli=cli)
        found = re.search(
            r"embedded redis cluster of 3 masters \(redis-server \S+\) on "
            r"redis://127\.0\.0\.1:(\d+) \(ports ([\d, ]+); pids ([\d, ]+)\)",
            cli.output(),
        )
        assert found is not None, cli.output()
        ports = [int(port) for port in found[2].split(", ")]
        pids = [int(pid) for pid in found[3].split(", ")]
        assert int(found[1]) == ports[0]
        assert len(ports) == len(pids) == 3
        assert all(psutil.Process(pid).ppid() == cli.pid for pid in pids)
        assert cli.output().count(f"{RUNNING} on 127.0.0.1:{ports[0]}") == workers
        for port in ports:
            client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True, protocol=2)
            try:
                assert "cluster_state:ok" in client.execute_command("CLUSTER", "INFO")
            finally:
                client.close()

        assert stop(cli, signal.SIGINT) == 0, cli.output()
        wait_until(
            lambda: all(is_gone(pid) for pid in pids), what="the cluster's nodes gone", timeout=5
        )
    finally:
        cli.stop()
        # Stopped by SIGKILL, the CLI could not stop its nodes: end those still there.
        for pid, port in zip(pids, ports, strict=True):
            if not is_gone(pid):
                with contextlib.suppress(psutil.NoSuchProcess):
                    node = psutil.Process(pid)
                    if "redis-server" in node.name() and str(port) in node.cmdline():
                        node.kill()


# -- which URL ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "app_url", "env_url"),
    [
        pytest.param("real", None, "dead", id="flag-over-env"),
        pytest.param(None, "real", "dead", id="app-over-env"),
        pytest.param("real", "dead", "dead", id="flag-over-app"),
        pytest.param(None, None, "real", id="env-alone"),
    ],
)
def test_url_precedence(
    start_cli: StartCli,
    redis_client: redis.Redis,
    redis_url: str,
    names: Names,
    tmp_path: Path,
    flag: str | None,
    app_url: str | None,
    env_url: str,
) -> None:
    urls = {"real": redis_url, "dead": f"redis://127.0.0.1:{free_port()}/0"}
    env = {"ASYNCSTREAMS_URL": urls[env_url]}
    if app_url is None:
        target = LEDGER_APP
        env |= ledger_env(names, tmp_path / "ledger.jsonl")
    else:
        target = URL_APP
        env |= {"URL_APP_URL": urls[app_url], "URL_APP_STREAM": names.stream}
        env |= {"URL_APP_GROUP": names.group}
    args = ["run", target] + (["--url", urls[flag]] if flag else [])
    real = urlsplit(redis_url)

    cli = start_cli(*args, env=env)
    cli.wait_for_output(f"{RUNNING} on {real.hostname}:{real.port}")
    publish(redis_client, names.stream, 3)
    wait_drained(redis_client, names.stream, names.group, cli)

    assert stop(cli) == 0, cli.output()
    assert ": stopped; 3 acked" in cli.output()


# -- dead letters ---------------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """`python -m asyncstreams ARGS...` to its end: its exit code, stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "asyncstreams", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def add_dead_letter(
    client: redis.Redis, dlq: str, source: str, original: list[bytes], message: str = "bad"
) -> str:
    """XADD a dead-letter entry for `original`, in the format the runtime writes."""
    letter = DeadLetter(
        stream=source,
        id="1700000000000-0",
        group="workers",
        consumer="c1",
        deliveries=5,
        reason="failed",
        error="ValueError",
        message=message,
        time_ms=1700000000123,
    )
    flat = letter.fields(original)
    entry_id = client.xadd(dlq, dict(zip(flat[::2], flat[1::2], strict=True)))
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


@pytest.fixture
def bytes_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, protocol=2)
    try:
        yield client
    finally:
        client.close()


@pytest.mark.parametrize("flags", [[], ["--json"], ["--replay"]])
def test_dead_letters_of_a_missing_stream_is_an_error(
    redis_url: str, names: Names, flags: list[str]
) -> None:
    done = run_cli("dead-letters", names("dead-letter"), "--url", redis_url, *flags)

    assert done.returncode == 1, done
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"asyncstreams: error: stream '{names('dead-letter')}' does not exist on "
        f"{urlsplit(redis_url).hostname}:{urlsplit(redis_url).port}"
    ]


def test_dead_letters_with_redis_unreachable_is_one_line_without_password() -> None:
    port = free_port()
    url = f"redis://user:{SECRET}@127.0.0.1:{port}/0"

    done = run_cli("dead-letters", "x:dead-letter", "--url", url)

    assert done.returncode == 1, done
    [line] = done.stderr.splitlines()
    assert line.startswith(f"asyncstreams: error: Redis at 127.0.0.1:{port}: "), line
    assert SECRET not in done.stdout + done.stderr


def test_dead_letters_of_a_key_that_is_not_a_stream_is_an_error(
    redis_client: redis.Redis, redis_url: str, names: Names
) -> None:
    redis_client.set(names("dead-letter"), "x")

    done = run_cli("dead-letters", names("dead-letter"), "--url", redis_url)

    assert done.returncode == 1, done
    assert done.stderr.splitlines() == [
        f"asyncstreams: error: key '{names('dead-letter')}' is a string, not a stream; "
        "expected a dead-letter stream"
    ]


def test_dead_letters_lists_metadata_and_payload(
    bytes_client: redis.Redis, redis_url: str, names: Names
) -> None:
    dlq = names("dead-letter")
    ids = [
        add_dead_letter(bytes_client, dlq, names.stream, [b"n", b"1", b"data", b"hello"]),
        add_dead_letter(bytes_client, dlq, names.stream, [b"text", b"two words", b"e", b""]),
        add_dead_letter(bytes_client, dlq, names.stream, [b"blob", b"\xff\xfe", b"!x", b"1"]),
        add_dead_letter(bytes_client, dlq, names.stream, [b"long", b"a" * 200]),
        add_dead_letter(bytes_client, dlq, names.stream, []),
    ]

    done = run_cli("dead-letters", dlq, "--url", redis_url)

    assert done.returncode == 0, done
    head = f"{names.stream} 1700000000000-0  failed  deliveries=5  ValueError: bad"
    payloads = [
        "n=1 data=hello",
        'text="two words" e=""',
        "blob=\ufffd\ufffd !x=1",
        f"long={'a' * 60}...(200 bytes)",
        "(no fields)",
    ]
    expected = [
        line
        for entry_id, payload in zip(ids, payloads, strict=True)
        for line in (f"{entry_id}  {head}", f"    {payload}")
    ]
    assert done.stdout.splitlines() == expected
    assert done.stderr.splitlines() == [f"5 of 5 entries of {dlq} shown"]

    limited = run_cli("dead-letters", dlq, "--url", redis_url, "--limit", "2")
    assert limited.returncode == 0, limited
    assert limited.stdout.splitlines() == expected[:4]
    assert limited.stderr.splitlines() == [f"2 of 5 entries of {dlq} shown"]


def test_dead_letters_json_gives_every_byte_back(
    bytes_client: redis.Redis, redis_url: str, names: Names
) -> None:
    dlq = names("dead-letter")
    originals = [
        [b"n", b"1", b"data", b"hello"],
        [b"blob", b"\xff\xfe\x00ok", b"\xc3(", b"caf\xc3\xa9 " + b"z" * 300, b"!x", b"1"],
    ]
    ids = [add_dead_letter(bytes_client, dlq, names.stream, original) for original in originals]

    done = run_cli("dead-letters", dlq, "--url", redis_url, "--json")

    assert done.returncode == 0, done
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    assert "\\udcff" in lines[1]
    assert "café" in lines[1]  # valid UTF-8 is written as it is, not escaped
    for line, entry_id, original in zip(lines, ids, originals, strict=True):
        record = json.loads(line)
        assert record["id"] == entry_id
        assert record["dlq"] == {
            "stream": names.stream,
            "id": "1700000000000-0",
            "group": "workers",
            "consumer": "c1",
            "deliveries": 5,
            "reason": "failed",
            "error": "ValueError",
            "message": "bad",
            "time": 1700000000123,
        }
        fields = [
            part.encode("utf-8", "surrogateescape")
            for pair in record["fields"].items()
            for part in pair
        ]
        assert fields == original
    assert done.stderr.splitlines() == [f"2 of 2 entries of {dlq} shown"]


def test_dead_letters_replay_moves_them_back(
    bytes_client: redis.Redis, redis_url: str, names: Names
) -> None:
    dlq = names("dead-letter")
    for n in range(3):
        add_dead_letter(bytes_client, dlq, names.stream, [b"n", str(n).encode()])

    done = run_cli("dead-letters", dlq, "--url", redis_url, "--replay", "--limit", "2")

    assert done.returncode == 0, done
    assert done.stdout.splitlines() == [f"moved 2 entries of {dlq} back to their streams"]
    replayed = bytes_client.xrange(names.stream)
    assert replayed is not None
    assert [fields for _, fields in replayed] == [
        {b"n": b"0"},
        {b"n": b"1"},
    ]
    listed = run_cli("dead-letters", dlq, "--url", redis_url)
    assert listed.stdout.splitlines()[1] == "    n=2"
    assert listed.stderr.splitlines() == [f"1 of 1 entries of {dlq} shown"]
