"""Topology changes of a Redis Cluster under a consuming worker (`python -m asyncstreams run
tests.apps.fault_app:app --url <a node of the cluster>`): the master of a busy stream killed
and replaced by its replica, a master paused for longer than the socket timeout.

Each test starts a cluster of its own (it breaks nodes), of the suite's redis-server binary
($ASYNCSTREAMS_TEST_REDIS_SERVER), and records a history that tests/jepsen.py checks as in
test_faults.py: entries lost, run again beyond what the fault explains, run twice at once,
left pending. Each prints one line and adds its result (lost, duplicates, the time to
recover) to cluster-faults.json in pytest's base temporary directory.

Streams are named with a hash tag (`{...}`), so that a stream's dead-letter stream
(`{...}:dead-letter`, where the checks look for it) shares its slot.
Producers use redis-py's RedisCluster, which follows MOVED and ASK as the topology changes.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from redis.cluster import ClusterNode as Seed
from redis.cluster import RedisCluster
from redis.exceptions import ClusterDownError, ClusterError, TryAgainError

from asyncstreams._slots import key_slot, slot_ranges
from asyncstreams.embedded import ClusterNode, EmbeddedCluster

from .apps import ledger
from .capabilities import server_binary, server_version
from .conftest import Names
from .helpers import wait_for
from .jepsen import FaultReport, Producer, Run
from .test_faults import OUTAGE_BEGINS, Faults, outage_lines, outage_seconds

pytestmark = pytest.mark.slow

# A worker's line when its slot map changed (a failover).
MAP_CHANGED = "hash slots have a new master"
# cluster-node-timeout of the cluster that fails over: short, so a killed master is replaced
# in a few seconds.
NODE_TIMEOUT_MS = 1000
# ... and of the cluster whose master is paused: far longer than the pause, so no failover.
PAUSE_NODE_TIMEOUT_MS = 30_000
# Longer than the socket timeout.
PAUSE_S = 7.0
# What a producer rides out besides lost connections: a cluster failing over answers
# CLUSTERDOWN or TRYAGAIN, and RedisCluster gives up following redirects with ClusterError.
CLUSTER_ERRORS = (ClusterDownError, TryAgainError, ClusterError)


def plain(n: int) -> dict[str, str]:
    """The fields of the `n`-th entry a producer writes."""
    return {"n": str(n)}


@pytest.fixture(scope="session")
def cluster_fault_report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultReport]:
    report = FaultReport(tmp_path_factory.getbasetemp() / "cluster-faults.json")
    yield report
    if report.results:
        print(f"\n[fault] {len(report.results)} results in {report.path}")


class ClusterFaults(Faults):
    """`Faults` on a Redis Cluster of the test's own: the workers get the URL of node 0,
    the checks and producers a RedisCluster client that knows every node."""

    cluster: EmbeddedCluster

    def start_cluster(
        self, masters: int, replicas: int = 0, *, node_timeout_ms: int
    ) -> EmbeddedCluster:
        self.cluster = EmbeddedCluster(
            masters, replicas, binary=server_binary(), node_timeout_ms=node_timeout_ms
        )
        self.on_close(self.cluster.stop)
        self.cluster.start()
        self.url = self.cluster.url
        return self.cluster

    def connect(self, **kwargs: Any) -> RedisCluster:  # type: ignore[override]
        """A RedisCluster client, seeded with every node (node 0 may be the one killed)."""
        settings = {
            "startup_nodes": [Seed("127.0.0.1", node.port) for node in self.cluster.nodes],
            "socket_timeout": 2.0,
            "socket_connect_timeout": 1.0,
            "protocol": 2,
            **kwargs,
        }
        client = RedisCluster(**settings)
        self._clients.append(client)  # type: ignore[arg-type]
        return client

    def produce(
        self,
        count: int,
        interval: float,
        *,
        stream: str | None = None,
        timeout: float = 60.0,
        fields: Callable[[int], Mapping[str, str | bytes]] = plain,
        lane: int = 0,
        lanes: int = 1,
    ) -> Producer:
        """`Faults.produce` through the cluster, riding out its failovers; producers of
        several streams take a lane each (see `Producer`)."""
        producer = Producer(
            self.connect,
            stream or self.stream,
            count=count,
            interval=interval,
            timeout=timeout,
            fields=fields,
            retry_on=CLUSTER_ERRORS,
            lane=lane,
            lanes=lanes,
        )
        self._producers.append(producer)
        return producer.start()

    def produce_until_stopped(
        self,
        streams: list[str],
        interval: float,
        fields: Mapping[str, Callable[[int], Mapping[str, str | bytes]]] | None = None,
    ) -> dict[str, Producer]:
        """A producer per stream, each writing until stopped; `fields` by stream."""
        fields = fields or {}
        return {
            stream: self.produce(
                100_000,
                interval,
                stream=stream,
                fields=fields.get(stream, plain),
                lane=lane,
                lanes=len(streams),
            )
            for lane, stream in enumerate(streams)
        }

    def stream_on(self, master: int, suffix: str) -> str:
        """A stream name (with a hash tag) whose slot `master` (a node index) served when
        the cluster started."""
        first, last = slot_ranges(self.cluster.masters)[master]
        for k in itertools.count():
            name = f"{{{self.names(suffix)}:{k}}}"
            if first <= key_slot(name) <= last:
                return name
        raise AssertionError("unreachable")  # pragma: no cover

    def serves(self, node: ClusterNode, stream: str, *, seen_by: int) -> bool:
        """Whether node `seen_by` maps the slot of `stream` to `node`."""
        slot = key_slot(stream)
        rows = self.cluster.slot_map(seen_by)
        return any(row.first <= slot <= row.last and row.master == node.port for row in rows)


@pytest.fixture
def faults(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    names: Names,
    cluster_fault_report: FaultReport,
) -> Iterator[ClusterFaults]:
    version = server_version(server_binary())
    name = f"{request.node.name.removeprefix('test_')} (redis {version})"
    harness = ClusterFaults(name, tmp_path, names, cluster_fault_report)
    try:
        yield harness
    finally:
        harness.close()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def runs_by_id(runs: list[Run]) -> dict[str, list[Run]]:
    found: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        found[run.id].append(run)
    return found


def first_handled_after(
    runs: list[Run], stream: str, since: float, written: Mapping[str, float] | None = None
) -> float:
    """Seconds from `since` to the end of the first run of an entry of `stream` that started
    after it and went through; with `written` (id -> when written), of an entry written
    after it (not one the consumer held already)."""
    ends = [
        run.end
        for run in runs
        if run.stream == stream
        and run.start > since
        and run.outcome == "ok"
        and run.end
        and (written is None or written.get(run.id, 0.0) > since)
    ]
    assert ends, f"no entry of {stream} handled after {since}"
    return min(ends) - since


def longest_stall(runs: list[Run], stream: str, since: float, until: float) -> float:
    """The longest time between `since` and `until` in which no run of an entry of `stream`
    started."""
    starts = sorted(run.start for run in runs if run.stream == stream and since < run.start)
    marks = [since, *(start for start in starts if start < until), until]
    return max(later - earlier for earlier, later in itertools.pairwise(marks))


# -- 2. failover: the master of a busy stream killed ------------------------------------------


def test_failover_of_the_master_of_a_busy_stream(faults: ClusterFaults) -> None:
    cluster = faults.start_cluster(3, 1, node_timeout_ms=NODE_TIMEOUT_MS)
    victim, heir = cluster.nodes[0], cluster.nodes[3]
    assert heir.replica_of == victim.index
    streams = [faults.stream_on(master, f"s{master}") for master in range(3)]
    busy = streams[0]
    worker = faults.start_worker(streams=streams, sleep=0.01)
    producers = list(faults.produce_until_stopped(streams, 0.01).values())
    faults.wait_flowing(200)

    fault_at = time.time()
    cluster.kill(victim.index)
    wait_for(
        lambda: faults.serves(heir, busy, seen_by=1),
        timeout=30,
        what=f"the replica on port {heir.port} serving the slot of {busy}",
    )
    failed_over_at = time.time()
    faults.wait_until(
        lambda: any(r.stream == busy and r.start > failed_over_at for r in faults.runs()),
        what=f"an entry of {busy} handled after the failover",
    )
    time.sleep(1.0)  # a second more of writes to the new master
    for producer in producers:
        producer.stop()
    produced = {i: t for producer in producers for i, t in producer.wait().items()}
    faults.wait_drained(streams)
    faults.assert_workers_alive()

    runs = faults.runs()
    by_id = runs_by_id(runs)
    handled = {r.id for r in runs if r.outcome == "ok"}
    # Redis replicates asynchronously: writes acknowledged by the killed master that had not
    # reached its replica are gone (the producer does not know it). The entries left are
    # what the new master holds; those of the rest that were never handled are not the
    # consumer's to lose.
    on_new_master = {_text(entry_id) for entry_id, _ in faults.admin.xrange(busy)}
    dropped = {i for i in producers[0].produced if i not in on_new_master} - handled
    assert on_new_master <= set(producers[0].produced)
    # Likewise an ack or a delivery (XREADGROUP moves the group's last-delivered id) that
    # had not reached the replica: the entry runs again. Allowed for the entries the killed
    # master delivered, and only for those: the entries of the busy stream that started
    # before the replica took over (with no master, none was delivered meanwhile; those
    # delivered before the kill were all started by then).
    explained = {
        i for i, its in by_id.items() if its[0].stream == busy and its[0].start < failed_over_at
    }
    allowed = sum(len(by_id[i]) - 1 for i in explained)
    others_during = sum(1 for r in runs if r.stream != busy and fault_at < r.start < failed_over_at)
    output = worker.output()
    faults.check(
        produced,
        fault_at=fault_at,
        max_duplicates=allowed,
        streams=streams,
        deleted=dropped,
        failover_s=round(failed_over_at - fault_at, 3),
        resumed_after_s=round(first_handled_after(runs, busy, fault_at, produced), 3),
        stall_s=round(longest_stall(runs, busy, fault_at, time.time()), 3),
        dropped_by_failover=len(dropped),
        duplicates_explained=allowed,
        others_handled_during_failover=others_during,
        map_changed_lines=output.count(MAP_CHANGED),
        outage_lines=list(outage_lines(output)),
        outage_s=outage_seconds(output),
        producer_retries=[producer.retries for producer in producers],
    )
    assert MAP_CHANGED in output, output


# -- 3. a master paused longer than the socket timeout ----------------------------------------


def test_a_master_paused_longer_than_the_socket_timeout(faults: ClusterFaults) -> None:
    cluster = faults.start_cluster(3, node_timeout_ms=PAUSE_NODE_TIMEOUT_MS)
    paused = cluster.nodes[1]
    streams = [faults.stream_on(master, f"s{master}") for master in range(3)]
    stalled, others = streams[1], [streams[0], streams[2]]
    worker = faults.start_worker(streams=streams, sleep=0.01)

    def slow_now_and_then(n: int) -> dict[str, str]:
        # One entry in fifty takes 0.5 s: the paused master's stream is busy, an entry of it
        # in the handler when the pause begins, its ack due during the pause.
        return {"n": str(n), "sleep": "0.5"} if is_slow(n) else plain(n)

    def is_slow(n: int) -> bool:
        return n % 50 == 25

    def slow_entry_just_started() -> bool:
        events = ledger.read(faults.ledger)
        ended = {(e["id"], e["start"]) for e in events if e["event"] == "end"}
        return any(
            e["event"] == "start"
            and e["stream"] == stalled
            and is_slow(int(e["fields"]["n"]))
            and (e["id"], e["start"]) not in ended
            and e["start"] > time.time() - 0.3
            for e in events
        )

    producers = faults.produce_until_stopped(streams, 0.01, {stalled: slow_now_and_then})
    faults.wait_flowing(200)
    faults.wait_until(slow_entry_just_started, what=f"a slow entry of {stalled} just started")

    fault_at = time.time()
    cluster.pause(paused.index)
    try:
        # The worker's read from the paused node times out (block_ms + the 5 s socket
        # timeout) and says so; the pause lasts PAUSE_S in all: the fault's length, not a
        # condition.
        faults.wait_output(worker, OUTAGE_BEGINS)
        time.sleep(max(0.0, fault_at + PAUSE_S - time.time()))
    finally:
        cluster.resume(paused.index)
    resumed_at = time.time()
    faults.wait_until(
        lambda: any(r.stream == stalled and r.start > resumed_at for r in faults.runs()),
        what=f"an entry of {stalled} handled after the pause",
    )
    time.sleep(0.5)
    for producer in producers.values():
        producer.stop()
    produced = {i: t for producer in producers.values() for i, t in producer.wait().items()}
    faults.wait_drained(streams)
    faults.assert_workers_alive()

    runs = faults.runs()
    done = {r.id: r.end for r in runs if r.outcome == "ok" and r.end}
    # Entries of the streams on the other masters written during the pause (up to a second
    # before its end): each must have been handled before the paused master came back.
    written_during = [
        i
        for stream in others
        for i, at in producers[stream].produced.items()
        if fault_at < at < resumed_at - 1.0
    ]
    late = [i for i in written_during if done.get(i, float("inf")) > resumed_at]
    output = worker.output()
    faults.check(
        produced,
        fault_at=fault_at,
        max_duplicates=0,
        streams=streams,
        pause_s=round(resumed_at - fault_at, 3),
        resumed_after_s=round(first_handled_after(runs, stalled, resumed_at), 3),
        stall_s=round(longest_stall(runs, stalled, fault_at, time.time()), 3),
        others_written_during_pause=len(written_during),
        others_handled_only_after_pause=len(late),
        map_changed_lines=output.count(MAP_CHANGED),
        outage_lines=list(outage_lines(output)),
        outage_s=outage_seconds(output),
    )
    assert faults.serves(paused, stalled, seen_by=0), "a failover happened"
    begins, ends = outage_lines(output)
    assert begins >= 1, output
    assert begins == ends, output
    assert MAP_CHANGED not in output, output
    assert written_during, "nothing was written to the other masters during the pause"
    assert not late, (
        f"{len(late)} of {len(written_during)} entries written to the other masters during "
        f"the pause were handled only after it:\n{output}"
    )
