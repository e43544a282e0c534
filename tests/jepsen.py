"""Jepsen-style bookkeeping for the fault tests: record a history, then check it.

The history has three sources, none of them the system under test's own account:

- what was produced: `Producer` writes entries with ids it chooses (increasing), from a
  thread, through any fault. A write whose reply was lost is sent again with the same id;
  Redis refusing it as "equal or smaller than the top item" proves the first one landed, so
  every id in `produced` is in the stream exactly once (or was deleted by the test);
- what the handlers did: the fault app's ledger, one start and one end line per run;
- what Redis holds at the end: the dead-letter streams and the pending entries lists.

`check` turns the three into a `Result`: entries lost, handled that nobody produced, run
again (duplicates), run twice at once (overlaps), left pending, dead-lettered for the wrong
reason; and the workers' output scanned for asyncio and resource warnings, unexpected
tracebacks and passwords.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.cluster import RedisCluster

from .apps import ledger

# The checks and the producer work with one server's client or a Redis Cluster's (which
# routes each command by its key's slot, following MOVED and ASK).
Client = redis.Redis | RedisCluster

# Worker output that means a bug whatever the test: asyncio's complaints about tasks and
# coroutines, and ResourceWarnings about sockets and transports left open.
FORBIDDEN_OUTPUT = (
    "Task exception was never retrieved",
    "Task was destroyed but it is pending",
    "Unclosed",
    "unclosed",
    "was never awaited",
)


# -- the producer ------------------------------------------------------------------------


def next_id(last: tuple[int, int], lane: int = 0, lanes: int = 1) -> tuple[int, int]:
    """An entry id after `last`: the clock's millisecond, or `last`'s with the next sequence.

    The sequence numbers are those of `lane` of `lanes` (lane + k * lanes), so that producers
    of different streams, each in a lane of its own, never write the same id."""
    now = int(time.time() * 1000)
    return (now, lane) if now > last[0] else (last[0], last[1] + lanes)


class Producer:
    """XADDs `count` entries to `stream`, one every `interval` seconds, from a thread.

    Connection errors and timeouts (Redis restarting, paused, its connections killed) are
    ridden out until `timeout` seconds after the start, and so are the errors in `retry_on`
    (a cluster failing over: CLUSTERDOWN, TRYAGAIN): the same id is sent again, so a write
    whose reply was lost is never written twice. `produced` maps each id written to the
    time its XADD was answered. Producers of several streams of one test take a `lane`
    each (of `lanes`): their ids differ, as the checks need (they go by id alone).
    """

    def __init__(
        self,
        connect: Callable[[], Client],
        stream: str,
        *,
        count: int,
        interval: float,
        timeout: float = 60.0,
        fields: Callable[[int], Mapping[str, str | bytes]] = lambda n: {"n": str(n)},
        retry_on: tuple[type[Exception], ...] = (),
        lane: int = 0,
        lanes: int = 1,
    ) -> None:
        if not 0 <= lane < lanes:
            raise ValueError(f"expected 0 <= lane < lanes, got lane={lane}, lanes={lanes}")
        self._connect = connect
        self.stream = stream
        self.count = count
        self.interval = interval
        self.timeout = timeout
        self._fields = fields
        self._retry_on = retry_on
        self._lanes = (lane, lanes)
        self.produced: dict[str, float] = {}
        self.retries = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"producer {stream}", daemon=True)

    def start(self) -> Producer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> dict[str, float]:
        """Wait for the last write (at most `timeout` s more); raise what stopped it early."""
        self._thread.join(self.timeout if timeout is None else timeout)
        if self._thread.is_alive():
            self.stop()
            self._thread.join(5)
            raise AssertionError(f"producer of {self.stream} still running after its timeout")
        if self.error is not None:
            raise AssertionError(f"producer of {self.stream} failed: {self.error!r}")
        return self.produced

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout
        last = (0, 0)
        client = self._connect()
        try:
            for n in range(self.count):
                if self._stop.is_set():
                    return
                last = next_id(last, *self._lanes)
                entry_id = f"{last[0]}-{last[1]}"
                self._write(client, entry_id, self._fields(n), deadline)
                self.produced[entry_id] = time.time()
                self._stop.wait(self.interval)
        except BaseException as exc:
            self.error = exc
        finally:
            client.close()

    def _write(
        self, client: Client, entry_id: str, fields: Mapping[str, str | bytes], deadline: float
    ) -> None:
        while True:
            try:
                client.xadd(self.stream, dict(fields), id=entry_id)
                return
            except redis.ResponseError as exc:
                if "equal or smaller" in str(exc):
                    return  # the first attempt landed; its reply was lost
                if not isinstance(exc, self._retry_on) or self._give_up(deadline):
                    raise
            except (redis.ConnectionError, redis.TimeoutError, OSError, *self._retry_on):
                if self._give_up(deadline):
                    raise
            self.retries += 1
            self._stop.wait(0.05)

    def _give_up(self, deadline: float) -> bool:
        return time.monotonic() > deadline or self._stop.is_set()


def produce_now(
    client: Client, stream: str, payloads: Sequence[Mapping[str, str | bytes]]
) -> dict[str, float]:
    """XADD `payloads` in one pipeline (no fault around); returns {id: time written}."""
    with client.pipeline(transaction=False) as pipe:
        for payload in payloads:
            pipe.xadd(stream, dict(payload))
        ids = pipe.execute()
    now = time.time()
    return {_text(entry_id): now for entry_id in ids}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- what the handlers did --------------------------------------------------------------


@dataclass
class Run:
    """One handler run from the fault app's ledger. `end` is None for a run cut by SIGKILL."""

    id: str
    stream: str
    pid: int
    consumer: str
    deliveries: int
    start: float
    end: float | None = None
    outcome: str | None = None  # "ok", "raised", "cancelled"; None without an end


def read_runs(path: Path) -> list[Run]:
    runs: dict[tuple[str, int, float], Run] = {}
    for record in ledger.read(path):
        key = (record["id"], record["pid"], record["start"])
        if record["event"] == "start":
            runs[key] = Run(
                record["id"],
                record["stream"],
                record["pid"],
                record["consumer"],
                record["deliveries"],
                record["start"],
            )
        else:
            runs[key].end = record["end"]
            runs[key].outcome = record["outcome"]
    return sorted(runs.values(), key=lambda run: run.start)


def handled_ids(runs: Iterable[Run]) -> set[str]:
    return {run.id for run in runs if run.outcome == "ok"}


@dataclass(frozen=True)
class DeadLetter:
    """One entry of a dead-letter stream: the original id and why it is there."""

    id: str
    stream: str
    reason: str
    error: str
    message: str
    deliveries: int
    time: float


def read_dead_letters(client: Client, stream: str) -> list[DeadLetter]:
    letters = []
    for _, fields in client.xrange(f"{stream}:dead-letter"):
        meta = {_text(k): _text(v) for k, v in fields.items() if _text(k).startswith("!dlq:")}
        letters.append(
            DeadLetter(
                id=meta["!dlq:id"],
                stream=meta["!dlq:stream"],
                reason=meta["!dlq:reason"],
                error=meta["!dlq:error"],
                message=meta["!dlq:message"],
                deliveries=int(meta["!dlq:deliveries"]),
                time=int(meta["!dlq:time"]) / 1000,
            )
        )
    return letters


# -- the check ---------------------------------------------------------------------------


@dataclass
class History:
    """What a fault test knows happened, besides the ledger and Redis."""

    name: str
    streams: Sequence[str]
    group: str
    ledger: Path
    produced: dict[str, float]  # id -> when it was written
    fault_at: float  # when the fault was injected (time.time())
    outputs: Sequence[str]  # every worker's whole output
    deleted: set[str] = field(default_factory=set)  # entries the test itself deleted
    killed: dict[int, float] = field(default_factory=dict)  # pid -> when it was SIGKILLed


@dataclass
class Result:
    name: str
    produced: int
    handled: int
    dead: int
    deleted: int
    lost: list[str]
    unexpected: list[str]
    duplicates: int
    max_duplicates: int
    duplicate_ids: list[str]
    retries: int  # runs after a run that raised: the handler's own failures, not duplicates
    overlaps: list[str]
    unfinished: list[str]
    pending: dict[str, int]
    pending_problems: list[str]
    dead_letter_problems: list[str]
    output_problems: list[str]
    recovery_s: float
    max_latency_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def problems(self) -> list[str]:
        found = []
        if self.lost:
            found.append(f"{len(self.lost)} entries lost: {self.lost[:10]}")
        if self.unexpected:
            found.append(f"{len(self.unexpected)} ids nobody produced: {self.unexpected[:10]}")
        if self.duplicates > self.max_duplicates:
            found.append(
                f"{self.duplicates} duplicate runs, more than the {self.max_duplicates} this "
                f"fault allows: {self.duplicate_ids[:10]}"
            )
        found += [f"runs overlapped: {overlap}" for overlap in self.overlaps]
        found += [f"run never ended (its worker was not killed): {run}" for run in self.unfinished]
        found += self.pending_problems
        found += self.dead_letter_problems
        found += self.output_problems
        return found

    def summary(self) -> str:
        return (
            f"{self.name}: produced={self.produced} handled={self.handled} dead={self.dead} "
            f"deleted={self.deleted} lost={len(self.lost)} duplicates={self.duplicates} "
            f"(bound {self.max_duplicates}) retries={self.retries} "
            f"recovery={self.recovery_s:.2f}s max_latency={self.max_latency_s:.2f}s"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "produced": self.produced,
            "handled": self.handled,
            "dead_lettered": self.dead,
            "deleted_by_test": self.deleted,
            "lost": len(self.lost),
            "unexpected": len(self.unexpected),
            "duplicates": self.duplicates,
            "max_duplicates": self.max_duplicates,
            "retries": self.retries,
            "overlaps": len(self.overlaps),
            "pending": self.pending,
            "recovery_s": round(self.recovery_s, 3),
            "max_latency_s": round(self.max_latency_s, 3),
            "problems": self.problems(),
            **self.extra,
        }

    def assert_ok(self) -> None:
        problems = self.problems()
        assert not problems, f"{self.summary()}\n" + "\n".join(problems)


def check(
    client: Client,
    history: History,
    *,
    max_duplicates: int,
    expected_dead: Mapping[str, str] | None = None,
    expected_errors: Sequence[str] = (),
    secrets: Sequence[str] = (),
    expected_pending: Iterable[str] = (),
) -> Result:
    """Check a history against the ledger and what Redis holds now (workers stopped).

    `expected_dead` maps ids that must end in a dead-letter stream to the reason they must
    carry; any other dead letter is a problem. `expected_errors` are regexes one of which
    the exception line of every traceback in the output must match (none: no traceback).
    `secrets` must appear nowhere in the output. `expected_pending` are the ids that must
    be left pending (not lost: the group still has them); none other may be.
    """
    expected_dead = expected_dead or {}
    runs = read_runs(history.ledger)
    produced = set(history.produced)
    handled = handled_ids(runs)
    letters = [letter for stream in history.streams for letter in read_dead_letters(client, stream)]
    dead = {letter.id for letter in letters}

    pending_ids = {
        stream: _pending_ids(client, stream, history.group) for stream in history.streams
    }
    left = set().union(*pending_ids.values())
    expected_left = set(expected_pending)
    lost = sorted(produced - handled - dead - history.deleted - (left & expected_left), key=id_key)
    unexpected = sorted(({run.id for run in runs} | dead) - produced, key=id_key)

    by_id: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_id[run.id].append(run)
    duplicates, retries = 0, 0
    duplicate_ids: list[str] = []
    overlaps: list[str] = []
    unfinished: list[str] = []
    for entry_id, its_runs in by_id.items():
        for before, after in itertools.pairwise(its_runs):
            if before.outcome == "raised":
                retries += 1
            else:
                duplicates += 1
                duplicate_ids.append(entry_id)
            if after.start < _ended(before, history.killed):
                overlaps.append(f"{entry_id}: {before} and {after}")
        unfinished += [
            f"{run}" for run in its_runs if run.end is None and run.pid not in history.killed
        ]

    dead_problems = _check_dead_letters(letters, expected_dead, handled)
    pending_problems = [
        f"left pending in {stream}: {sorted(ids - expected_left, key=id_key)[:10]}"
        for stream, ids in pending_ids.items()
        if ids - expected_left
    ]
    pending_problems += [
        f"expected to be left pending, not pending: {i}" for i in sorted(expected_left - left)
    ]
    output_problems = [
        problem
        for index, output in enumerate(history.outputs)
        for problem in scan_output(output, expected_errors, secrets, f"worker {index}")
    ]

    done_at: dict[str, float] = {}
    for run in runs:
        if run.outcome == "ok" and run.end is not None:
            done_at[run.id] = min(done_at.get(run.id, math.inf), run.end)
    for letter in letters:
        done_at[letter.id] = min(done_at.get(letter.id, math.inf), letter.time)
    accounted = [i for i in produced - history.deleted if i in done_at]
    recovery = max((done_at[i] for i in accounted), default=history.fault_at) - history.fault_at
    latency = max((done_at[i] - history.produced[i] for i in accounted), default=0.0)

    return Result(
        name=history.name,
        produced=len(produced),
        handled=len(handled & produced),
        dead=len(dead & produced),
        deleted=len(history.deleted & (produced - handled - dead)),
        lost=lost,
        unexpected=unexpected,
        duplicates=duplicates,
        max_duplicates=max_duplicates,
        duplicate_ids=duplicate_ids,
        retries=retries,
        overlaps=overlaps,
        unfinished=unfinished,
        pending={stream: len(ids) for stream, ids in pending_ids.items()},
        pending_problems=pending_problems,
        dead_letter_problems=dead_problems,
        output_problems=output_problems,
        recovery_s=max(recovery, 0.0),
        max_latency_s=max(latency, 0.0),
    )


def _ended(run: Run, killed: Mapping[int, float]) -> float:
    """When `run` ended: its end, else when its worker was killed, else never."""
    if run.end is not None:
        return run.end
    return killed.get(run.pid, math.inf)


def _check_dead_letters(
    letters: list[DeadLetter], expected: Mapping[str, str], handled: set[str]
) -> list[str]:
    problems = []
    seen: dict[str, int] = defaultdict(int)
    for letter in letters:
        seen[letter.id] += 1
        want = expected.get(letter.id)
        if want is None:
            problems.append(f"dead-lettered unexpectedly: {letter}")
        elif letter.reason != want:
            problems.append(f"dead-lettered as {letter.reason!r}, expected {want!r}: {letter}")
        if letter.id in handled:
            problems.append(f"dead-lettered and also handled: {letter}")
    problems += [f"dead-lettered {n} times: {i}" for i, n in seen.items() if n > 1]
    problems += [
        f"expected in a dead-letter stream, not found: {i}" for i in expected if i not in seen
    ]
    return problems


def _pending_ids(client: Client, stream: str, group: str) -> set[str]:
    """The ids in the group's pending entries list (all of them: these are small tests)."""
    try:
        reply = client.xpending_range(stream, group, "-", "+", 100_000)
    except redis.ResponseError as exc:
        if str(exc).startswith("NOGROUP"):
            return set()  # no stream or no group: nothing can be pending
        raise
    return {_text(entry["message_id"]) for entry in reply}


def scan_output(
    output: str, expected_errors: Sequence[str], secrets: Sequence[str], who: str
) -> list[str]:
    """Problems in one worker's output: warnings, unexpected tracebacks, secrets."""
    problems = [f"{who} printed {text!r}" for text in FORBIDDEN_OUTPUT if text in output]
    problems += [f"{who} printed a password" for secret in secrets if secret in output]
    tracebacks = traceback_exceptions(output)
    if output.count("Traceback") != len(tracebacks):
        problems.append(f"{who} printed 'Traceback' outside a traceback")
    for line in tracebacks:
        if not any(re.search(pattern, line) for pattern in expected_errors):
            problems.append(f"{who} printed an unexpected traceback ending in: {line}")
    return problems


def traceback_exceptions(output: str) -> list[str]:
    """The exception line of each traceback in `output` (the first unindented line after it)."""
    found = []
    lines = output.splitlines()
    for index, line in enumerate(lines):
        if not line.startswith("Traceback (most recent call last):"):
            continue
        for after in lines[index + 1 :]:
            if after and not after[0].isspace():
                found.append(after)
                break
        else:
            found.append("(a traceback without an exception line)")
    return found


def id_key(entry_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = entry_id.partition("-")
    return int(milliseconds), int(sequence or 0)


# -- the report --------------------------------------------------------------------------


class FaultReport:
    """Every fault test's result: one line printed per test, all of them in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.results: list[dict[str, Any]] = []

    def record(self, result: Result, **extra: Any) -> None:
        result.extra.update(extra)
        self.results.append(result.to_json())
        self.path.write_text(json.dumps(self.results, indent=2) + "\n")
        details = " ".join(f"{key}={value}" for key, value in extra.items())
        print(f"\n[fault] {result.summary()}{' ' + details if details else ''}")
