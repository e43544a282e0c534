"""Setting up and inspecting the nodes of a Redis Cluster, for EmbeddedCluster: their ports,
and the CLUSTER commands it sends with redis-py's sync client (raw replies, parsed here).
"""

from __future__ import annotations

import random
import socket
from typing import Any, NamedTuple

import redis

from .errors import AsyncstreamsError

# Client ports of cluster nodes. Each node also listens on its cluster bus port, port + 10000,
# which has to be a valid port too.
CLUSTER_PORTS = range(20000, 55000)
BUS_PORT_OFFSET = 10000
_port_picker = random.Random()  # not the module's global generator, which a test may seed


def free_cluster_port() -> int:
    """A loopback port in CLUSTER_PORTS nobody listens on right now, nor on port + 10000."""
    for _ in range(200):
        port = _port_picker.randrange(CLUSTER_PORTS.start, CLUSTER_PORTS.stop)
        if _bindable(port) and _bindable(port + BUS_PORT_OFFSET):
            return port
    raise AsyncstreamsError(
        f"no free pair of loopback ports (port, port + {BUS_PORT_OFFSET}) found with port in "
        f"{CLUSTER_PORTS.start}-{CLUSTER_PORTS.stop - 1}"
    )


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class SlotRange(NamedTuple):
    """One row of CLUSTER SLOTS: slots `first` to `last`, the port of the master serving
    them and those of its replicas."""

    first: int
    last: int
    master: int
    replicas: tuple[int, ...]


def connect(port: int) -> redis.Redis:
    """A sync client of the node on 127.0.0.1:`port`, decoding replies to str."""
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        protocol=2,
        decode_responses=True,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
    )


def call(client: redis.Redis, *args: str | int) -> Any:
    """The raw reply to a command (redis-py parses none whose name is just "CLUSTER")."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def cluster_info(client: redis.Redis) -> dict[str, str]:
    text = str(call(client, "CLUSTER", "INFO"))
    return {name: value for name, _, value in (line.partition(":") for line in text.split())}


def knows_master(client: redis.Redis, node_id: str) -> bool:
    """Whether the node knows `node_id` as a master (past the handshake, which goes by a
    made-up id)."""
    table = str(call(client, "CLUSTER", "NODES"))
    # A line of CLUSTER NODES: <id> <ip:port@cport> <flags> <master> ...
    return any(
        fields[0] == node_id and "master" in fields[2].split(",")
        for fields in (line.split() for line in table.splitlines())
    )


def slot_map(client: redis.Redis) -> list[SlotRange]:
    # A row of CLUSTER SLOTS: first, last, then [ip, port, id, ...] of the master and of each
    # replica.
    rows = call(client, "CLUSTER", "SLOTS")
    return sorted(
        SlotRange(
            int(row[0]),
            int(row[1]),
            int(row[2][1]),
            tuple(sorted(int(replica[1]) for replica in row[3:])),
        )
        for row in rows
    )


def show(slots: list[SlotRange]) -> str:
    """`0-5460@20001+30004, ...`: each range, its master's port and its replicas' ports."""
    return (
        ", ".join(
            f"{row.first}-{row.last}@{row.master}" + "".join(f"+{port}" for port in row.replicas)
            for row in slots
        )
        or "(none)"
    )
