"""`asyncstreams run --reload` as a developer uses it: an app module in a folder of its own,
the CLI started there against the test server, the module edited on disk. The restart must
be graceful (the entry in flight finishes and is acked, nothing is handled twice) and the
new code must run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis

from .conftest import Names
from .helpers import ROOT, CliProcess
from .test_cli import RUNNING, exit_code, is_gone, wait_until, worker_pids

StartCli = Callable[..., CliProcess]

APP = '''\
"""Written by tests/test_reload.py, which edits VERSION while it runs."""

import asyncio
import os

from asyncstreams import App, Message

VERSION = "{version}"
PREFIX = os.environ["RELOAD_APP_PREFIX"]

app = App()


@app.consumer(f"{{PREFIX}}:in", group=f"{{PREFIX}}:group")
async def handle(fields: dict[str, str], msg: Message) -> None:
    await app.publish(f"{{PREFIX}}:started", {{"id": msg.id, "pid": os.getpid()}})
    await asyncio.sleep(float(fields.get("sleep", "0")))
    await app.publish(f"{{PREFIX}}:{{VERSION}}", {{"id": msg.id, "pid": os.getpid()}})
'''


def write_app(folder: Path, version: str) -> None:
    (folder / "reload_app.py").write_text(APP.format(version=version))


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True, protocol=2)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def app_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    write_app(folder, "first")
    return folder


@pytest.fixture
def start_cli(tmp_path: Path, app_folder: Path, names: Names) -> Iterator[StartCli]:
    """Start `python -m asyncstreams ARGS...` in the app's folder; gone after the test."""
    started: list[CliProcess] = []

    def start(*args: str) -> CliProcess:
        cli = CliProcess(
            list(args),
            env={"RELOAD_APP_PREFIX": names.prefix},
            log_path=tmp_path / f"cli-{len(started)}.log",
            cwd=app_folder,
        )
        started.append(cli)
        return cli

    try:
        yield start
    finally:
        for cli in started:
            cli.stop()


def handled(client: redis.Redis, stream: str) -> dict[str, int]:
    """Entry id -> pid of the process that handled it, as the app wrote them to `stream`."""
    return {fields["id"]: int(fields["pid"]) for _, fields in client.xrange(stream)}


def pending(client: redis.Redis, names: Names) -> int:
    return int(client.xpending(names("in"), names("group"))["pending"])


def test_a_change_restarts_the_app_gracefully_and_the_new_code_runs(
    start_cli: StartCli,
    app_folder: Path,
    redis_client: redis.Redis,
    redis_url: str,
    names: Names,
) -> None:
    cli = start_cli("run", "reload_app:app", "--url", redis_url, "--reload")
    cli.wait_for_output(RUNNING)
    assert "watching for changes to .py files under" in cli.output()
    [first_pid] = worker_pids(cli.output())

    # An entry whose handler runs for 3 s: in flight when the module changes.
    slow = redis_client.xadd(names("in"), {"sleep": "3"})
    wait_until(lambda: slow in handled(redis_client, names("started")), what="started", cli=cli)
    write_app(app_folder, "second")
    wait_until(
        lambda: "SIGTERM received: stopping" in cli.output(), what="the old app stopping", cli=cli
    )
    assert handled(redis_client, names("first")) == {}, "the entry was not in flight"

    # It finishes in the old process, is acked, and a new process starts.
    wait_until(lambda: cli.output().count(RUNNING) == 2, what="the app started again", cli=cli)
    assert handled(redis_client, names("first")) == {slow: first_pid}
    assert pending(redis_client, names) == 0
    output = cli.output()
    assert "changed: reload_app.py; restarting the app" in output
    assert ": stopped; 1 acked, 0 retried, 0 dead-lettered, 0 cancelled" in output
    assert is_gone(first_pid)
    [second_pid] = worker_pids(output) - {first_pid}

    fresh = redis_client.xadd(names("in"), {"sleep": "0"})
    wait_until(
        lambda: fresh in handled(redis_client, names("second")), what="the new code", cli=cli
    )
    assert handled(redis_client, names("second")) == {fresh: second_pid}
    assert list(handled(redis_client, names("started"))) == [slow, fresh]  # each once
    wait_until(lambda: pending(redis_client, names) == 0, what="the new entry acked", cli=cli)

    cli.signal(signal.SIGINT)
    assert exit_code(cli) == 0, cli.output()
    assert is_gone(second_pid)


def test_a_broken_edit_waits_for_the_fix(
    start_cli: StartCli,
    app_folder: Path,
    redis_client: redis.Redis,
    redis_url: str,
    names: Names,
) -> None:
    cli = start_cli("run", "reload_app:app", "--url", redis_url, "--reload")
    cli.wait_for_output(RUNNING)

    (app_folder / "reload_app.py").write_text("def handle(:\n")
    wait_until(
        lambda: "it starts again once a .py file changes" in cli.output(),
        what="the broken app to exit",
        cli=cli,
    )
    assert "SyntaxError" in cli.output()
    exited = r"worker 1 \(pid \d+\) exited with code 1; it starts again once a .py file changes"
    assert len(re.findall(exited, cli.output())) == 1
    # SIGHUP starts it again too: still broken, it exits again, and waits.
    cli.signal(signal.SIGHUP)
    wait_until(lambda: len(re.findall(exited, cli.output())) == 2, what="a second exit", cli=cli)
    write_app(app_folder, "second")
    wait_until(lambda: cli.output().count(RUNNING) == 2, what="the fixed app running", cli=cli)

    entry = redis_client.xadd(names("in"), {"sleep": "0"})
    wait_until(
        lambda: entry in handled(redis_client, names("second")), what="the fixed code", cli=cli
    )
    cli.signal(signal.SIGTERM)
    assert exit_code(cli) == 0, cli.output()


def test_a_change_restarts_workers_one_at_a_time(
    start_cli: StartCli, app_folder: Path, redis_url: str
) -> None:
    cli = start_cli("run", "reload_app:app", "--url", redis_url, "--reload", "--workers", "2")
    wait_until(lambda: cli.output().count(RUNNING) == 2, what="2 workers running", cli=cli)
    before = worker_pids(cli.output())

    write_app(app_folder, "second")
    wait_until(lambda: "restarted all 2 workers" in cli.output(), what="both restarted", cli=cli)
    output = cli.output()
    assert "changed: reload_app.py; restarting the 2 workers one at a time" in output
    after = worker_pids(output) - before
    assert len(after) == 2
    assert all(is_gone(pid) for pid in before)
    assert {child.pid for child in psutil.Process(cli.pid).children()} == after
    # One at a time: the second worker was stopped only once the first one's successor ran.
    lines = output.splitlines()
    restarting = [n for n, line in enumerate(lines) if "SIGTERM sent" in line]
    running = [n for n, line in enumerate(lines) if RUNNING in line]
    assert len(restarting) == 2
    assert running[2] < restarting[1] < running[3]

    cli.signal(signal.SIGINT)
    assert exit_code(cli) == 0, cli.output()


def test_without_watchfiles_reload_exits_2_naming_the_extra(app_folder: Path) -> None:
    # watchfiles made unimportable in this process only (None in sys.modules).
    code = (
        "import sys; sys.modules['watchfiles'] = None\n"
        "from asyncstreams.cli import main\n"
        "sys.exit(main(['run', 'reload_app:app', '--reload']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=app_folder,
        env={**os.environ, "RELOAD_APP_PREFIX": "unused", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "asyncstreams: error: --reload needs watchfiles, which is not installed; "
        'install it with: pip install "asyncstreams[reload]"'
    )
