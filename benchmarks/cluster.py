"""The cluster scenario: one consumer process drains three streams on one redis-server, the
same three streams on the three masters of a Redis Cluster (a stream per master), and a
`Partitioned` stream on that cluster; FastStream's `RedisClusterBroker` drains the three
streams too. And what a `Partitioned` consumer costs while nothing arrives.

The scenario runs on servers of its own (a `Lab`: an EmbeddedRedis and a 3-master
EmbeddedCluster of the same binary), whatever `--url` says, so that INFO commandstats counts
the consumer's commands and nobody else's: each run reads the counts of every node before
the consumer starts and after it exits, and keeps the difference, less the suite's own
commands (`LEFT_OUT`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import redis

from asyncstreams import App, Partitioned
from asyncstreams._slots import key_slot  # the rule the cluster itself follows
from asyncstreams.embedded import EmbeddedCluster, EmbeddedRedis

from .payload import task
from .procs import ChildError
from .specs import ConsumeResult, ConsumeSpec, Impl
from .steps import START_TIMEOUT, STOP_TIMEOUT, Run, _consume_timeout, _spawn, _tally_problems
from .store import Store, check_group, fill

Where = Literal["one-server", "cluster", "partitioned"]
MASTERS = 3
# The suite's own commands, not counted: INFO (these counts) and XINFO GROUPS (the child's
# check that nothing is pending; asyncstreams sends XPENDING itself, so that one would not
# do). CLIENT LIST (the idle run's count of connections) is sent after the counts are read.
LEFT_OUT = frozenset({"info", "xinfo|groups"})
PUBLISH_CHUNK = 10_000
READY_TIMEOUT = 10.0  # until every partition of the idle consumer has a blocked read
BLOCK_MS: int = inspect.signature(App.consumer).parameters["block_ms"].default

Counts = dict[str, dict[str, int]]  # node label -> command -> calls


@dataclass(frozen=True)
class Spread:
    """A data set of entries 0 .. entries-1 over several streams, and where each lives."""

    where: Where
    url: str  # what the consumer is given: the server, or a node of the cluster
    name: str  # the first stream, or the name of the Partitioned stream
    partitions: int  # 0, or how many partitions `name` has
    streams: tuple[str, ...]
    nodes: dict[str, str]  # stream -> the URL of the node that holds it
    last_ids: dict[str, str]
    lengths: dict[str, int]
    entries: int


class Lab:
    """One redis-server and a Redis Cluster of three masters, both private, with the data
    sets written to them; `close()` ends every server by its pid."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.one = EmbeddedRedis()
        self.cluster = EmbeddedCluster(masters=MASTERS)
        self._clients: dict[str, redis.Redis] = {}
        self._data: dict[tuple[Where, int, int, int], Spread] = {}
        try:
            self.one.start()
            self.cluster.start()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        try:
            self.cluster.stop()
        finally:
            self.one.close()

    def servers(self, where: Where) -> dict[str, str]:
        """Label -> URL of each server the data of `where` lives on."""
        if where == "one-server":
            return {"server": self.one.url}
        return {f"master {node.index}": _url(node.port) for node in self.cluster.nodes[:MASTERS]}

    def client(self, url: str) -> redis.Redis:
        if url not in self._clients:
            self._clients[url] = redis.Redis.from_url(url, protocol=2)
        return self._clients[url]

    # -- data ------------------------------------------------------------------------------

    def dataset(self, where: Where, entries: int, size: int, partitions: int) -> Spread:
        """Entries 0 .. entries-1 as three streams (one server, or one per master: thirds,
        in order) or as a `Partitioned` of `partitions` (publish_many, the task id as key);
        written once."""
        key = (where, entries, size, partitions if where == "partitioned" else 0)
        if key not in self._data:
            if where == "partitioned":
                self._data[key] = self._partitioned(entries, size, partitions)
            else:
                self._data[key] = self._three_streams(where, entries, size)
        return self._data[key]

    def _three_streams(self, where: Where, entries: int, size: int) -> Spread:
        if where == "one-server":
            url = self.one.url
            streams = tuple(f"{self.prefix}one-server-{i}" for i in range(MASTERS))
            nodes = dict.fromkeys(streams, url)
        else:
            url = self.cluster.url
            streams = tuple(self._stream_on_master(i) for i in range(MASTERS))
            nodes = {stream: _url(self.cluster.node_for_key(stream).port) for stream in streams}
        last_ids, lengths = {}, {}
        for i, stream in enumerate(streams):
            first, stop = entries * i // MASTERS, entries * (i + 1) // MASTERS
            last_ids[stream] = fill(self.client(nodes[stream]), stream, first, stop, size)
            lengths[stream] = stop - first
        return Spread(where, url, streams[0], 0, streams, nodes, last_ids, lengths, entries)

    def _stream_on_master(self, index: int) -> str:
        """A stream name whose hash slot master `index` serves."""
        ranges = self.cluster.slot_map()
        first, last = ranges[index].first, ranges[index].last
        k = 0
        while not first <= key_slot(name := f"{self.prefix}cluster-{index}-{k}") <= last:
            k += 1
        return name

    def _partitioned(self, entries: int, size: int, partitions: int) -> Spread:
        stream = Partitioned(f"{self.prefix}orders", partitions)
        asyncio.run(_publish(self.cluster.url, stream, entries, size))
        nodes = {name: _url(self.cluster.node_for_key(name).port) for name in stream.streams}
        last_ids, lengths = {}, {}
        for name in stream.streams:
            info: dict[str, Any] = self.client(nodes[name]).xinfo_stream(name)
            last_ids[name] = _text(info["last-generated-id"])
            lengths[name] = int(info["length"])
        if sum(lengths.values()) != entries:
            raise ChildError(
                f"publish_many wrote {sum(lengths.values()):,} entries to {stream.name!r}; "
                f"expected {entries:,}"
            )
        return Spread(
            "partitioned", self.cluster.url, stream.name, partitions, stream.streams, nodes,
            last_ids, lengths, entries,
        )  # fmt: skip

    # -- counts and checks -----------------------------------------------------------------

    def commandstats(self, where: Where) -> Counts:
        """INFO commandstats of each server of `where`: calls by command."""
        counts = {}
        for label, url in self.servers(where).items():
            stats: dict[str, Any] = self.client(url).info("commandstats")
            counts[label] = {
                name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()
            }
        return counts

    def check(self, data: Spread, group: str) -> list[str]:
        problems = []
        for stream in data.streams:
            client = self.client(data.nodes[stream])
            found = check_group(client, stream, group, data.last_ids[stream], data.lengths[stream])
            problems += [f"{stream}: {problem}" for problem in found]
        return problems

    def connections(self, pid: int, where: Where) -> dict[str, int]:
        """How many connections process `pid` holds to each server (CLIENT LIST, matched
        with the process's own sockets)."""
        ports = _local_ports(pid)
        result = {}
        for label, url in self.servers(where).items():
            clients = self.client(url).client_list()
            result[label] = sum(int(c["addr"].rsplit(":", 1)[1]) in ports for c in clients)
        return result

    def blocked_reads(self, pid: int, where: Where) -> int:
        """How many XREADGROUP of process `pid` are blocked now, on all servers."""
        ports = _local_ports(pid)
        blocked = 0
        for url in self.servers(where).values():
            for c in self.client(url).client_list():
                port = int(c["addr"].rsplit(":", 1)[1])
                blocked += port in ports and c["cmd"] == "xreadgroup" and "b" in c["flags"]
        return blocked


def _url(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _publish(url: str, stream: Partitioned, entries: int, size: int) -> None:
    app = App(url)
    now = time.time()
    try:
        for start in range(0, entries, PUBLISH_CHUNK):
            seqs = range(start, min(entries, start + PUBLISH_CHUNK))
            payloads = [task(seq, size, now) for seq in seqs]
            await app.publish_many(stream, payloads, keys=[str(seq) for seq in seqs])
    finally:
        await app.aclose()


def _local_ports(pid: int) -> set[int]:
    """The local TCP ports of process `pid`'s sockets (Linux: /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _delta(before: Counts, after: Counts) -> Counts:
    """Calls made between the two counts, by server and command (LEFT_OUT left out)."""
    return {
        label: {
            name: calls - before[label].get(name, 0)
            for name, calls in sorted(counts.items())
            if name not in LEFT_OUT and calls > before[label].get(name, 0)
        }
        for label, counts in after.items()
    }


# -- the runs ------------------------------------------------------------------------------


def drain(
    store: Store, *, where: Where, impl: Impl, entries: int, size: int, partitions: int
) -> Run:
    """One consumer drains the data set of `where`, in a group of its own on every stream."""
    lab = store.lab()
    data = lab.dataset(where, entries, size, partitions)
    group = store.group(impl)
    for stream in data.streams:
        lab.client(data.nodes[stream]).xgroup_create(stream, group, "0")
    spec = ConsumeSpec(
        impl=impl,
        url=data.url,
        stream=data.name,
        streams=() if data.partitions else data.streams,
        partitions=data.partitions,
        nodes=data.nodes,
        group=group,
        entries=entries,
        timeout=_consume_timeout(entries),
    )
    try:
        before = lab.commandstats(where)
        with _spawn("consume", spec, f"consumer {impl} ({where})") as child:
            result = child.result(ConsumeResult, START_TIMEOUT + spec.timeout + 30)
        commands = _delta(before, lab.commandstats(where))
        problems = _tally_problems(result, entries) or lab.check(data, group)
    finally:
        for stream in data.streams:
            with contextlib.suppress(redis.ResponseError):
                lab.client(data.nodes[stream]).xgroup_destroy(stream, group)
    return Run(
        rate=(entries - 1) / result.seconds if result.seconds else None,
        seconds=result.seconds,
        peak_rss_mb=result.peak_rss_mb,
        problems=problems,
        extra={"startup_seconds": result.startup_seconds, "commands": commands},
    )


def idle(store: Store, *, partitions: int, seconds: float) -> Run:
    """An asyncstreams consumer of a `Partitioned` stream that nothing is written to: once
    every partition has a blocked XREADGROUP, the commands it sends per second and node, and
    the connections it holds to each node.

    The window is `seconds` rounded up to whole `block_ms` periods, in which each blocked
    read runs out and is sent again once per period whatever its phase; it starts half a
    period after the reads were seen blocked, so that reads sent together do not end on its
    edges.
    """
    block = BLOCK_MS / 1000
    window = max(1, math.ceil(seconds / block - 1e-9)) * block
    lab = store.lab()
    group = store.group("idle")
    stream = Partitioned(f"{store.prefix}{group}", partitions)
    spec = ConsumeSpec(
        impl="asyncstreams",
        url=lab.cluster.url,
        stream=stream.name,
        partitions=partitions,
        group=group,
        entries=1,
        until="stdin",
        timeout=START_TIMEOUT + READY_TIMEOUT + block + window + 30,
    )
    with _spawn("consume", spec, "idle consumer asyncstreams") as child:
        child.wait_ready(START_TIMEOUT)
        deadline = time.monotonic() + READY_TIMEOUT
        while (blocked := lab.blocked_reads(child.pid, "cluster")) < partitions:
            if time.monotonic() > deadline:
                raise ChildError(
                    f"the idle consumer has {blocked} blocked reads after {READY_TIMEOUT:.0f} s;"
                    f" expected one per partition ({partitions})"
                )
            time.sleep(0.05)
        time.sleep(block / 2)
        before, started = lab.commandstats("cluster"), time.perf_counter()
        time.sleep(window)
        after, elapsed = lab.commandstats("cluster"), time.perf_counter() - started
        connections = lab.connections(child.pid, "cluster")
        child.send_line("STOP")
        result = child.result(ConsumeResult, STOP_TIMEOUT)
    problems = [f"the consumer failed: {result.error}"] if result.error else []
    if result.handled:
        problems.append(f"handled {result.handled} entries of a stream nothing was written to")
    on_master = dict.fromkeys(lab.servers("cluster"), 0)
    for name in stream.streams:
        on_master[f"master {lab.cluster.node_for_key(name).index}"] += 1
    per_second = {
        label: {name: calls / elapsed for name, calls in counts.items()}
        for label, counts in _delta(before, after).items()
    }
    return Run(
        peak_rss_mb=result.peak_rss_mb,
        problems=problems,
        extra={
            "idle": {
                "seconds": elapsed,
                "partitions": partitions,
                "block_ms": BLOCK_MS,
                "partitions_per_node": on_master,
                "commands_per_s": per_second,
                "connections": connections,
            }
        },
    )
