"""Topology changes of a Redis Cluster under a consuming worker (`python -m asyncstreams run
tests.apps.fault_app:app --url <a node of the cluster>`): a slot holding a stream with a
backlog resharded to another master, the master of a busy stream killed and replaced by its
replica, a master paused for longer than the socket timeout.

Each test starts a cluster of its own (it breaks nodes), of the suite's redis-server binary
($ASYNCSTREAMS_TEST_REDIS_SERVER), and records a history that tests/jepsen.py checks as in
test_faults.py: entries lost, run again beyond what the fault explains, run twice at once,
left pending. Each prints one line and adds its result (lost, duplicates, the time to
recover) to cluster-faults.json in pytest's base temporary directory.

Streams are named with a hash tag (`{...}`), so that a stream's dead-letter stream
(`{...}:dead-letter`, where the checks look for it) shares its slot, and moves with it.
Producers use redis-py's RedisCluster, which follows MOVED and ASK as the topology changes.
"""

from __future__ import annotations

import contextlib
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

from asyncstreams import _cluster_admin as admin
from asyncstreams._slots import key_slot, slot_ranges
from asyncstreams._transport import SOCKET_TIMEOUT
from asyncstreams.embedded import ClusterNode, EmbeddedCluster

from .apps import ledger
from .capabilities import server_binary, server_version
from .conftest import Names
from .helpers import blocked_reads, wait_for
from .jepsen import FaultReport, Producer, Run, produce_now
from .test_faults import OUTAGE_BEGINS, Faults, outage_lines, outage_seconds

pytestmark = pytest.mark.slow

# A worker's line when its slot map changed (a resharding, a failover).
MAP_CHANGED = "hash slots have a new master"
# cluster-node-timeout of the clusters that reshard or fail over: short, so a killed master
# is replaced in a few seconds.
NODE_TIMEOUT_MS = 1000
# ... and of the cluster whose master is paused: far longer than the pause, so no failover.
PAUSE_NODE_TIMEOUT_MS = 30_000
# Longer than the socket timeout.
PAUSE_S = 7.0
# block_ms of a read that blocks longer than the socket timeout.
LONG_BLOCK_MS = int(SOCKET_TIMEOUT * 1000) + 500
# What a producer rides out besides lost connections: a cluster failing over answers
# CLUSTERDOWN or TRYAGAIN, and RedisCluster gives up following redirects with ClusterError.
CLUSTER_ERRORS = (ClusterDownError, TryAgainError, ClusterError)
# A stream entry the fault app cannot decode: dead-lettered on its first delivery.
UNDECODABLE = {"n": "not-a-number"}


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


# -- 1. live resharding of a slot with a backlog ----------------------------------------------


def migrate_slot(
    cluster: EmbeddedCluster,
    slot: int,
    source: ClusterNode,
    target: ClusterNode,
    *,
    hold: Callable[[], object],
) -> tuple[int, float]:
    """Move `slot` from `source` to `target` as `redis-cli --cluster reshard` does: IMPORTING
    on the target, MIGRATING on the source, MIGRATE of every key of the slot (CLUSTER
    GETKEYSINSLOT: the stream and its dead-letter stream), then SETSLOT NODE on the target,
    the source and the other masters. Between the last MIGRATE and SETSLOT NODE, while
    `hold()` runs, the source answers ASK for the slot's keys. Returns how many keys moved
    and when the last MIGRATE was done."""
    nodes = [target, source, *(n for n in cluster.nodes if n not in (target, source))]
    clients = {node.index: admin.connect(node.port) for node in nodes if node.running}
    try:
        src, dst = clients[source.index], clients[target.index]
        admin.call(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        admin.call(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        moved = 0
        while keys := admin.call(src, "CLUSTER", "GETKEYSINSLOT", slot, 100):
            admin.call(src, "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
        migrated_at = time.time()
        hold()
        for client in clients.values():
            admin.call(client, "CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
    finally:
        for client in clients.values():
            client.close()
    return moved, migrated_at


def test_live_resharding_of_a_slot_with_a_backlog(faults: ClusterFaults) -> None:
    cluster = faults.start_cluster(3, node_timeout_ms=NODE_TIMEOUT_MS)
    source, target = cluster.nodes[0], cluster.nodes[1]
    stream = faults.stream_on(source.index, "moving")
    slot = key_slot(stream)
    # A backlog, with an undecodable entry in every hundred (dead-lettered at once, so the
    # slot holds a dead-letter stream too when it moves).
    payloads = [UNDECODABLE if n % 100 == 50 else {"n": str(n)} for n in range(2000)]
    backlog = produce_now(faults.admin, stream, payloads)
    poison = {i for i, p in zip(backlog, payloads, strict=True) if p is UNDECODABLE}
    worker = faults.start_worker(streams=[stream], sleep=0.01)
    producer = faults.produce(400, 0.01, stream=stream, fields=lambda n: {"n": str(10_000 + n)})
    faults.wait_flowing(100)
    faults.wait_until(
        lambda: bool(faults.admin.exists(f"{stream}:dead-letter")), what="a dead letter"
    )

    fault_at = time.time()
    left = len(backlog) - len(faults.handled())
    keys, migrated_at = migrate_slot(cluster, slot, source, target, hold=lambda: time.sleep(1.0))
    moved_at = time.time()
    assert keys == 2  # the stream and its dead-letter stream
    assert faults.serves(target, stream, seen_by=2)
    produced = {**backlog, **producer.wait()}
    faults.wait_drained([stream])
    faults.assert_workers_alive()

    runs = faults.runs()
    # The consumer went on through ASK while the slot was half moved, and on the new owner
    # after: it reads there now (its reader is blocked in XREADGROUP on the target).
    during_ask = sum(1 for r in runs if migrated_at < r.start < moved_at - 0.1)
    after = sum(1 for r in runs if r.start > moved_at)
    with contextlib.closing(admin.connect(target.port)) as client:
        wait_for(
            lambda: bool(blocked_reads(client.client_list(), f"asyncstreams-{worker.pid}")),
            what=f"the worker's XREADGROUP blocked on the target (port {target.port})",
        )
    output = worker.output()
    faults.check(
        produced,
        fault_at=fault_at,
        max_duplicates=0,
        streams=[stream],
        expected_dead=dict.fromkeys(poison, "undecodable"),
        backlog_at_fault=left,
        handled_during_ask=during_ask,
        handled_after_move=after,
        stall_s=round(longest_stall(runs, stream, fault_at, moved_at + 1.0), 3),
        map_changed_lines=output.count(MAP_CHANGED),
        outage_lines=list(outage_lines(output)),
        producer_retries=producer.retries,
    )
    assert left > 500, "the backlog was drained before the slot moved"
    assert during_ask > 0, "nothing handled while the source answered ASK"
    assert after > 0
    assert output.count(MAP_CHANGED) == 1, output


def test_resharding_of_an_idle_stream_read_with_a_block_longer_than_the_socket_timeout(
    faults: ClusterFaults,
) -> None:
    """A read of an idle stream blocks for block_ms; while its slot is half moved, the read
    goes to the importing node by ASK: there too it may block that long (the read's own
    timeout, not the 5 s socket timeout), and the resharding is no outage."""
    cluster = faults.start_cluster(3, node_timeout_ms=NODE_TIMEOUT_MS)
    source, target = cluster.nodes[0], cluster.nodes[1]
    stream = faults.stream_on(source.index, "idle")
    worker = faults.start_worker(streams=[stream], block_ms=LONG_BLOCK_MS)
    reader = f"asyncstreams-{worker.pid}"
    before = produce_now(faults.admin, stream, [plain(n) for n in range(20)])
    faults.wait_drained([stream])

    def reading_on(node: ClusterNode) -> bool:
        with contextlib.closing(admin.connect(node.port)) as client:
            return bool(blocked_reads(client.client_list(), reader))

    def hold() -> None:
        # Until the worker's read blocks on the target (after its read on the source ends:
        # Redis 7 ends it when MIGRATE deletes the key there, 6.2 when BLOCK runs out), then
        # past the socket timeout.
        wait_for(lambda: reading_on(target), timeout=2 * LONG_BLOCK_MS / 1000, what="ASK read")
        time.sleep(SOCKET_TIMEOUT + 0.5)

    wait_for(lambda: reading_on(source), what="the worker's read blocked on the source")
    fault_at = time.time()
    migrate_slot(cluster, key_slot(stream), source, target, hold=hold)
    after = produce_now(faults.admin, stream, [plain(n) for n in range(20, 40)])
    faults.wait_drained([stream])
    output = worker.output()
    faults.check(
        {**before, **after},
        fault_at=fault_at,
        max_duplicates=0,
        streams=[stream],
        outage_lines=list(outage_lines(output)),
        warnings=output.count(" WARNING "),
    )
    assert OUTAGE_BEGINS not in output, output
    assert " WARNING " not in output, output


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
