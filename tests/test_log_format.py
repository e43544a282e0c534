"""`asyncstreams run --log-format json|text`: JSON lines with the record's context and its
exception, the text lines as they were, and never a password in either."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from asyncstreams._logsetup import ENTRY, ContextFilter, JsonFormatter, log_context
from asyncstreams.embedded import free_port

from .conftest import Names
from .helpers import CliProcess, own_server
from .test_cli import RUNNING, SECRET, drained, exit_code, publish, stop, wait_until

LOG_APP = "tests.apps.log_app:app"
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) +\S+: ")

StartCli = Callable[..., CliProcess]


@pytest.fixture
def start_cli(tmp_path: Path, names: Names) -> Iterator[StartCli]:
    """Start `python -m asyncstreams ARGS...` on the log app; gone after the test."""
    started: list[CliProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> CliProcess:
        app_env = {"LOG_APP_STREAM": names.stream, "LOG_APP_GROUP": names.group}
        cli = CliProcess(
            list(args),
            env=app_env | (env or {}),
            log_path=tmp_path / f"cli-{len(started)}.log",
        )
        started.append(cli)
        return cli

    try:
        yield start
    finally:
        for cli in started:
            cli.stop()


def json_lines(output: str) -> list[dict[str, Any]]:
    """Every line of `output` as a JSON object (fails on a line that is not one)."""
    records = [json.loads(line) for line in output.splitlines()]
    for record in records:
        assert isinstance(record, dict)
        assert {"time", "level", "logger", "message"} <= record.keys(), record
        assert datetime.fromisoformat(record["time"]).utcoffset() is not None
    return records


def handle_two(client: redis.Redis, names: Names, cli: CliProcess) -> tuple[str, str]:
    """Publish an entry that is handled and one that fails; wait until both are done."""
    cli.wait_for_output(RUNNING)
    ok = client.xadd(names.stream, {"n": "1"})
    failing = client.xadd(names.stream, {"fail": "yes"})
    wait_until(lambda: drained(client, names.stream, names.group), what="both handled", cli=cli)
    return ok, failing


def test_json_lines_carry_context_and_the_exception(
    start_cli: StartCli, redis_url: str, names: Names
) -> None:
    cli = start_cli("run", LOG_APP, "--url", redis_url, "--log-format", "json")
    client = redis.Redis.from_url(redis_url, decode_responses=True, protocol=2)
    try:
        ok, failing = handle_two(client, names, cli)
    finally:
        client.close()

    assert stop(cli) == 0, cli.output()
    records = json_lines(cli.output())
    assert any(RUNNING in record["message"] for record in records)
    [consumer] = {record["consumer"] for record in records if record["logger"] == "tests.log_app"}
    handling = [record for record in records if record["logger"] == "tests.log_app"]
    assert [
        {key: record.get(key) for key in ("level", "message", "stream", "group", "entry_id")}
        for record in handling
    ] == [
        {
            "level": "INFO",
            "message": f"handling entry {entry_id}",
            "stream": names.stream,
            "group": names.group,
            "entry_id": entry_id,
        }
        for entry_id in (ok, failing)
    ]
    assert any(f" consumer={consumer} " in record["message"] for record in records), consumer
    [failure] = [record for record in records if "exc_info" in record]
    assert failure["level"] == "ERROR"
    assert failure["logger"] == "asyncstreams.consumer"
    assert f"handler failed on entry {failing} of {names.stream}" in failure["message"]
    assert failure["exc_info"].startswith("Traceback (most recent call last):")
    assert failure["exc_info"].endswith("RuntimeError: log_app fails on purpose,\nin two lines")
    # asyncstreams' own lines carry the consumer's context; those about an entry, its id.
    assert (failure["stream"], failure["group"], failure["consumer"], failure["entry_id"]) == (
        names.stream,
        names.group,
        consumer,
        failing,
    )
    own = [record for record in records if record["logger"].startswith("asyncstreams.consumer")]
    assert own
    assert all(record.get("consumer") == consumer for record in own), own
    [moved] = [record for record in own if "moved to dead-letter stream" in record["message"]]
    assert moved["entry_id"] == failing


def test_an_error_at_start_is_a_json_line_too(start_cli: StartCli) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    cli = start_cli("run", LOG_APP, "--url", url, env={"ASYNCSTREAMS_LOG_FORMAT": "json"})

    assert exit_code(cli, timeout=30) == 1, cli.output()
    [record] = json_lines(cli.output())
    assert record["level"] == "ERROR"
    assert record["logger"] == "asyncstreams.cli"
    assert record["message"].startswith(f"cannot reach Redis at 127.0.0.1:{port}: ")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_password_in_either_format(
    start_cli: StartCli, names: Names, tmp_path: Path, log_format: str
) -> None:
    # A private server, so that a password can be required. It is set once the server runs:
    # EmbeddedRedis waits for a PONG, which a server started with --requirepass never sends.
    with own_server() as server:
        with redis.Redis.from_url(server.url) as admin:
            admin.config_set("requirepass", SECRET)
        url = f"redis://:{SECRET}@127.0.0.1:{server.port}/0"
        wrong = f"redis://:not-{SECRET}@127.0.0.1:{server.port}/0"
        # The format as a flag, and as its variable.
        flag = ["--log-format", "text"] if log_format == "text" else []
        env = {"ASYNCSTREAMS_LOG_FORMAT": "json"} if log_format == "json" else {}
        cli = start_cli("run", LOG_APP, "--url", url, "--log-level", "debug", *flag, env=env)
        client = redis.Redis.from_url(url, decode_responses=True, protocol=2)
        try:
            handle_two(client, names, cli)
            publish(client, names.stream, 3)
            wait_until(lambda: drained(client, names.stream, names.group), what="drain", cli=cli)
        finally:
            client.close()
        assert stop(cli) == 0, cli.output()
        refused = start_cli("run", LOG_APP, "--url", wrong, *flag, env=env)
        assert exit_code(refused, timeout=30) == 2, refused.output()

    for output in (cli.output(), refused.output()):
        assert SECRET not in output
        if log_format == "json":
            json_lines(output)
    if log_format == "text":
        assert TEXT_LINE.match(cli.output()), cli.output()
        assert refused.output().startswith("asyncstreams: error: authentication failed")
    assert "authentication failed" in refused.output()
    assert "Traceback (most recent call last)" in cli.output()  # the failing entry's


def test_log_context_reaches_the_records_of_the_tasks_started_in_it() -> None:
    """The runtime's side of the context fields: a context set around a consumer's tasks,
    or ENTRY around an entry's handling, reaches what they log; a record's own `extra=`
    wins."""
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("tests.log_context")
    logger.addHandler(handler)
    logger.propagate = False

    async def entry() -> None:
        with log_context(stream="orders", entry_id="1-0"):
            logger.warning("in an entry")
        token = ENTRY.set(("orders", "2-0"))
        try:
            logger.warning("in the next entry")
        finally:
            ENTRY.reset(token)
        logger.warning("own", extra={"stream": "mine"})

    async def consumer() -> None:
        with log_context(group="g", consumer="c1"):
            task = asyncio.create_task(entry())
        await task
        logger.warning("outside")

    try:
        asyncio.run(consumer())
    finally:
        logger.removeHandler(handler)
        logger.propagate = True

    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(record)) for record in seen]
    assert [{k: v for k, v in line.items() if k not in ("time", "level")} for line in lines] == [
        {
            "logger": "tests.log_context",
            "message": "in an entry",
            "stream": "orders",
            "group": "g",
            "consumer": "c1",
            "entry_id": "1-0",
        },
        {
            "logger": "tests.log_context",
            "message": "in the next entry",
            "stream": "orders",
            "group": "g",
            "consumer": "c1",
            "entry_id": "2-0",
        },
        {
            "logger": "tests.log_context",
            "message": "own",
            "stream": "mine",
            "group": "g",
            "consumer": "c1",
        },
        {"logger": "tests.log_context", "message": "outside"},
    ]
