"""`asyncstreams describe` and `asyncstreams --version`.

Describing only imports the app: no Redis here. Most tests call the CLI's `main` in this
process; the example app, `--version` and the exit codes beside `run`'s are run as
`python -m asyncstreams` child processes, as users run them. AsyncAPI documents are
validated against the official AsyncAPI 3.0.0 JSON Schema (tests/asyncapi/README.md says
where it comes from), plus the rules of the specification that a JSON Schema cannot state.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from asyncstreams import App, Outbox, Partitioned
from asyncstreams.cli import main
from asyncstreams.codec import encode_fields
from asyncstreams.options import ConsumerOptions

from .apps import describe_app
from .helpers import ROOT

SCHEMA = Path(__file__).parent / "asyncapi" / "asyncapi-3.0.0.json"
TEST_APP = "tests.apps.describe_app:app"
EXAMPLE_APP = "examples.task_queue:app"
SECRET = "s3cret"

CONSUMER_KEYS = {
    "handler",
    "group",
    "batch",
    "message",
    "outbox",
    "streams",
    "payload",
    "options",
    "dead_letters",
}


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def asyncapi_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def describe(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    """`asyncstreams describe ARGS...` in this process: its JSON output, parsed."""
    code = main(["describe", *args])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    return dict(json.loads(out))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m asyncstreams ARGS...` from the checkout, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASK_QUEUE_")}
    return subprocess.run(
        [sys.executable, "-m", "asyncstreams", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def check_asyncapi(validator: jsonschema.protocols.Validator, document: dict[str, Any]) -> None:
    """Valid against the AsyncAPI 3.0.0 JSON Schema, and by the rules it cannot state."""
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
    assert errors == []
    for ref in _refs(document):  # every Reference Object points into the document
        assert ref.startswith("#/"), ref
        _resolve(document, ref)
    for key, operation in document["operations"].items():
        # Operation Object, messages: "It MUST contain a subset of the messages defined in
        # the channel referenced in this operation."
        channel = operation["channel"]["$ref"]
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel + "/messages/"), key
            assert message["$ref"].rpartition("/")[2] in _resolve(document, channel)["messages"]
    for key, channel in document["channels"].items():
        # Parameters Object: "This map MUST contain all the parameters used in the parent
        # channel address."
        used = set(re.findall(r"\{([^{}]*)\}", channel["address"]))
        assert used <= set(channel.get("parameters", {})), key


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def _resolve(document: dict[str, Any], ref: str) -> Any:
    found: Any = document
    for part in ref.removeprefix("#/").split("/"):
        found = found[part.replace("~1", "/").replace("~0", "~")]
    return found


def payload_validator(document: dict[str, Any], message: str) -> jsonschema.protocols.Validator:
    """A validator of the payload of `message`, its refs resolved in the document."""
    payload = document["components"]["messages"][message]["payload"]
    return jsonschema.Draft7Validator({**document, **payload})


# -- the JSON shape ------------------------------------------------------------------------


def test_the_example_app_as_json() -> None:
    done = cli("describe", EXAMPLE_APP)
    assert (done.returncode, done.stderr) == (0, "")
    described = json.loads(done.stdout)
    assert described["describe"] == 1
    assert described["app"] == EXAMPLE_APP
    assert described["server"] is None
    [consumer] = described["consumers"]
    assert consumer["handler"] == "process"
    assert consumer["group"] == "task_consumers"
    assert consumer["streams"] == [
        {"name": "task_queue", "partitions": None, "streams": ["task_queue"]}
    ]
    assert (consumer["batch"], consumer["message"]) == (False, True)
    payload = consumer["payload"]
    assert (payload["kind"], payload["type"]) == ("struct", "Task")
    task = payload["schema"]["$defs"]["Task"]
    assert task["properties"] == {
        "task_id": {"type": "string"},
        "data": {"type": "string"},
        "created_at": {"type": "number"},
    }
    defaults = ConsumerOptions("task_queue", group="task_consumers")
    assert consumer["options"] == {
        f.name: getattr(defaults, f.name)
        for f in fields(ConsumerOptions)
        if f.name not in ("streams", "group")
    }
    assert consumer["dead_letters"] == [
        {
            "stream": "task_queue",
            "dead_letter": "task_queue:dead-letter",
            "dead_letter_on_cluster": "{task_queue}:dead-letter",
        }
    ]

    # The README's trimmed sample of this output names only keys that are there.
    readme = (ROOT / "README.md").read_text()
    sample = readme.split(f"$ asyncstreams describe {EXAMPLE_APP}\n", 1)[1].split("\n$ ")[0]
    assert set(re.findall(r'"(\w+)":', sample)) <= _keys(described)
    assert '"describe": 1,' in sample


def _keys(node: object) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {key for value in node.values() for key in _keys(value)}
    if isinstance(node, list):
        return {key for value in node for key in _keys(value)}
    return set()


def test_every_kind_of_consumer_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    described = describe(capsys, TEST_APP)
    assert set(described) == {"describe", "asyncstreams", "app", "server", "consumers"}
    assert described["asyncstreams"] == importlib.metadata.version("asyncstreams")
    consumers = {c["handler"]: c for c in described["consumers"]}
    assert list(consumers) == ["bill", "audit", "record", "settle", "count"]
    assert all(set(c) == CONSUMER_KEYS for c in consumers.values())

    bill, audit, record, settle, count = consumers.values()
    assert (bill["group"], bill["batch"], bill["message"]) == ("billing", False, True)
    assert bill["payload"]["kind"] == "struct"
    assert bill["options"]["concurrency"] == 8
    assert bill["dead_letters"] == [
        {
            "stream": "orders",
            "dead_letter": "orders:dead-letter",
            "dead_letter_on_cluster": "{orders}:dead-letter",
        }
    ]

    assert audit["payload"] == {
        "kind": "fields",
        "type": None,
        "schema": {
            "title": "Fields",
            "description": "the entry's fields, every value as text (dict[str, str])",
            "type": "object",
            "additionalProperties": {"type": "string"},
        },
    }
    assert audit["options"]["max_deliveries"] is None
    assert audit["dead_letters"] == [
        {"stream": "audit", "dead_letter": None, "dead_letter_on_cluster": None}
    ]

    assert record["message"] is True
    assert (record["payload"]["kind"], record["payload"]["schema"]["type"]) == ("any", "object")
    assert [s["name"] for s in record["streams"]] == ["events", "{users}:signups"]
    assert record["options"]["dead_letter"] == "failed:{stream}"
    # A dead-letter stream named by the app is the same on a cluster.
    assert [(d["dead_letter"], d["dead_letter_on_cluster"]) for d in record["dead_letters"]] == [
        ("failed:events", "failed:events"),
        ("failed:{users}:signups", "failed:{users}:signups"),
    ]

    partitions = list(describe_app.PAYMENTS.streams)
    assert settle["batch"] is True
    assert settle["streams"] == [{"name": "payments", "partitions": 4, "streams": partitions}]
    assert settle["options"]["batch_size"] == 100
    # A partition's name is a hash tag, so its default dead-letter stream shares its slot.
    assert settle["dead_letters"] == [
        {
            "stream": p,
            "dead_letter": f"{p}:dead-letter",
            "dead_letter_on_cluster": f"{p}:dead-letter",
        }
        for p in partitions
    ]

    assert (count["group"], count["options"]["start_id"]) == ("analytics", "$")


def test_payload_schemas_are_json_schemas_of_what_the_handler_decodes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    consumers = describe(capsys, TEST_APP)["consumers"]
    order = describe_app.Order("o1", 5.5, [describe_app.Line("sku-1", 2)])
    decoded = msgspec.to_builtins(order)  # what a Struct handler gets, as JSON has it
    fields_ = {k: str(v) for k, v in encode_fields(order).items()}  # what dict[str, str] gets
    for consumer in consumers:
        schema = consumer["payload"]["schema"]
        jsonschema.Draft202012Validator.check_schema(schema)
        validator = jsonschema.Draft202012Validator(schema)
        kind = consumer["payload"]["kind"]
        assert validator.is_valid(decoded if kind == "struct" else fields_), consumer["handler"]
        if kind == "struct":
            assert not validator.is_valid({"order_id": "o1", "amount": "lots"})
            assert not validator.is_valid({"amount": 1.0})  # order_id is required
        if kind == "fields":
            assert not validator.is_valid(decoded)  # amount is a number, lines a list
    assert consumers[0]["payload"]["schema"] == msgspec.json.schema(describe_app.Order)


def test_options_are_every_field_of_consumer_options(capsys: pytest.CaptureFixture[str]) -> None:
    """A new option appears in `describe` without a change there."""
    [consumer] = [c for c in describe(capsys, TEST_APP)["consumers"] if c["handler"] == "count"]
    expected = [f.name for f in fields(ConsumerOptions) if f.name not in ("streams", "group")]
    assert list(consumer["options"]) == expected


# -- AsyncAPI ------------------------------------------------------------------------------


def test_the_example_app_as_asyncapi(
    tmp_path: Path, asyncapi_validator: jsonschema.protocols.Validator
) -> None:
    output = tmp_path / "asyncapi.json"
    done = cli("describe", EXAMPLE_APP, "--format", "asyncapi", "--output", str(output))
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    document = json.loads(output.read_text())
    check_asyncapi(asyncapi_validator, document)
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["title"] == "examples.task_queue"
    assert "servers" not in document
    assert document["channels"]["task_queue"]["address"] == "task_queue"
    receive = document["operations"]["process.task_queue"]
    assert receive["action"] == "receive"
    assert receive["channel"] == {"$ref": "#/channels/task_queue"}
    assert receive["x-asyncstreams-group"] == "task_consumers"
    dead = document["channels"]["task_queue_dead-letter"]
    assert dead["address"] == "task_queue:dead-letter"
    assert "{task_queue}:dead-letter" in dead["description"]  # the name on a cluster
    assert document["operations"]["process.task_queue_dead-letter"]["action"] == "send"
    task = payload_validator(document, "Task")
    assert task.is_valid({"task_id": "t1", "data": "hello", "created_at": 1700000000.5})
    assert not task.is_valid({"task_id": "t1", "data": "hello"})


def test_every_kind_of_consumer_as_asyncapi(
    capsys: pytest.CaptureFixture[str], asyncapi_validator: jsonschema.protocols.Validator
) -> None:
    document = describe(capsys, TEST_APP, "--format", "asyncapi")
    check_asyncapi(asyncapi_validator, document)
    assert document["info"]["title"] == "tests.apps.describe_app"
    assert document["info"]["version"] == "2.3.0"  # the module's __version__

    receive = {k: v for k, v in document["operations"].items() if v["action"] == "receive"}
    groups = {key: op["x-asyncstreams-group"] for key, op in receive.items()}
    assert groups == {  # one per consumer and stream
        "bill.orders": "billing",
        "audit.audit": "audit-log",
        "record.events": "raw",
        "record.users_signups": "raw",
        "settle.payments": "ledger",
        "count.orders": "analytics",
    }
    assert receive["settle.payments"]["x-asyncstreams-batch"] is True
    assert receive["audit.audit"]["x-asyncstreams-options"]["max_deliveries"] is None

    channels = document["channels"]
    assert set(channels["orders"]["messages"]) == {"Order"}  # two groups, one payload
    # A Partitioned stream is one channel: its address takes the name of each partition.
    payments = channels["payments"]
    assert payments["address"] == "{stream}"
    assert payments["parameters"]["stream"]["enum"] == list(describe_app.PAYMENTS.streams)
    assert payments["x-asyncstreams-partitioned"] == {"name": "payments", "partitions": 4}
    assert channels["payments_dead-letter"]["parameters"]["stream"]["enum"] == [
        f"{p}:dead-letter" for p in describe_app.PAYMENTS.streams
    ]
    # Braces in a name would read as an expression: such a name is the parameter's value.
    assert channels["users_signups"]["parameters"]["stream"]["enum"] == ["{users}:signups"]
    assert channels["failed_events"]["address"] == "failed:events"
    assert "audit_dead-letter" not in channels  # dead_letter=None

    messages = document["components"]["messages"]
    assert set(messages) == {
        "Order",
        "asyncstreams.Fields",
        "asyncstreams.AnyFields",
        "asyncstreams.DeadLetter",
    }
    order = payload_validator(document, "Order")  # Line resolved in components/schemas
    assert order.is_valid(msgspec.to_builtins(describe_app.Order("o1", 1.0, [])))
    assert not order.is_valid({"order_id": "o1", "amount": 1.0, "lines": [{"sku": "s"}]})
    dead_letter = payload_validator(document, "asyncstreams.DeadLetter")
    letter = dict.fromkeys(["stream", "id", "group", "consumer", "reason", "error", "message"], "x")
    assert dead_letter.is_valid(
        {
            **{f"!dlq:{k}": v for k, v in letter.items()},
            "!dlq:deliveries": "5",
            "!dlq:time": "1796234101248",
            "amount": "12",
        }
    )


def test_the_validation_is_not_vacuous(
    capsys: pytest.CaptureFixture[str], asyncapi_validator: jsonschema.protocols.Validator
) -> None:
    document = describe(capsys, TEST_APP, "--format", "asyncapi")
    broken = json.loads(json.dumps(document))
    broken["operations"]["bill.orders"]["action"] = "consume"
    del broken["info"]["version"]
    broken["channels"]["orders"]["group"] = "billing"  # not a field of a Channel Object
    paths = {tuple(e.absolute_path)[:2] for e in asyncapi_validator.iter_errors(broken)}
    assert paths == {("operations", "bill.orders"), ("info",), ("channels", "orders")}


# -- servers and secrets -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host", "pathname"),
    [
        (f"redis://alice:{SECRET}@db.internal:6380/3", "db.internal:6380", "/3"),
        (f"rediss://:{SECRET}@10.0.0.7?password={SECRET}&db=2", "10.0.0.7:6379", "/2"),
        (f"unix:///run/redis.sock?password={SECRET}", "localhost", "/run/redis.sock"),
    ],
)
def test_a_url_names_the_server_never_its_password(
    capsys: pytest.CaptureFixture[str],
    asyncapi_validator: jsonschema.protocols.Validator,
    url: str,
    host: str,
    pathname: str,
) -> None:
    for form in ("json", "asyncapi"):
        code = main(["describe", TEST_APP, "--format", form, "--url", url])
        out, err = capsys.readouterr()
        assert (code, err) == (0, "")
        assert SECRET not in out
        assert "alice" not in out
    described = describe(capsys, TEST_APP, "--url", url)
    assert (described["server"]["host"], described["server"]["pathname"]) == (host, pathname)
    document = describe(capsys, TEST_APP, "--format", "asyncapi", "--url", url)
    check_asyncapi(asyncapi_validator, document)
    [server] = document["servers"].values()
    assert (server["host"], server["protocol"], server["pathname"]) == (host, "redis", pathname)


# -- errors and --output -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("no_such_module_here:app", 'no module named "no_such_module_here"'),
        ("tests.apps.describe_app:nope", 'has no attribute "nope"'),
        ("tests.apps.describe_app", 'expected "module:attribute"'),
        ("tests.apps.describe_app:Order", "expected an asyncstreams App"),
        ("tests.apps.bad_option_app:app", "concurrency must be a positive integer, got 0"),
    ],
)
def test_a_bad_target_is_one_line_and_exit_code_2(
    capsys: pytest.CaptureFixture[str], target: str, says: str
) -> None:
    code = main(["describe", target])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err.startswith("asyncstreams: error: ")
    assert says in err
    assert len(err.splitlines()) == 1


def test_describe_exits_as_run_does_for_a_bad_target() -> None:
    described, ran = (
        cli("describe", "no_such_module_here:app"),
        cli("run", "no_such_module_here:app"),
    )
    assert described.returncode == ran.returncode == 2
    assert described.stderr == ran.stderr
    assert described.stdout == ""


def test_output_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    printed = describe(capsys, TEST_APP)
    output = tmp_path / "app.json"
    assert main(["describe", TEST_APP, "--output", str(output)]) == 0
    assert capsys.readouterr() == ("", "")
    assert json.loads(output.read_text(encoding="utf-8")) == printed


def test_output_that_cannot_be_written_is_one_line_and_exit_code_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "missing" / "app.json"
    assert main(["describe", TEST_APP, "--output", str(output)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"asyncstreams: error: cannot write {output}: ")
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("args", [["--format", "yaml"], ["--url", "http://localhost"]])
def test_a_bad_option_is_a_usage_error(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["describe", TEST_APP, *args])
    assert exited.value.code == 2
    assert "usage: asyncstreams describe" in capsys.readouterr().err


# -- --version -----------------------------------------------------------------------------


def test_version() -> None:
    done = cli("--version")
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == f"asyncstreams {importlib.metadata.version('asyncstreams')}\n"


def test_a_pipeline_consumer_shows_its_output_and_outbox() -> None:
    from asyncstreams.describe import describe as build

    app = App("redis://127.0.0.1:1")
    orders = Partitioned("orders", 2)

    @app.consumer(orders, group="g", output=orders.derive("out"), output_key=lambda o: o["k"])
    async def stage(fields: dict[str, str], out: Outbox) -> dict[str, str]:
        return fields

    (consumer,) = build(app, "inline:app")["consumers"]
    assert consumer["outbox"] is True
    assert consumer["options"]["output"] == {
        "name": "orders:out",
        "partitions": 2,
        "streams": [f"{name}:out" for name in orders.streams],
    }
    assert consumer["options"]["output_key"].endswith("<lambda>")
    json.dumps(consumer)  # every value is JSON
