"""Fixtures: a real redis-server per session (started here, on a free loopback port), names
unique to each test, and async tests run on both asyncio and uvloop. A Redis Cluster (3
masters, with or without a replica each) is started for the session when a test asks for one.

$ASYNCSTREAMS_TEST_REDIS_SERVER picks the redis-server binary (e.g. the Redis 6.2 one from the
`embedded` extra); $REDIS_URL points the tests that need no server of their own elsewhere.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio as aioredis

from asyncstreams.embedded import EmbeddedCluster, EmbeddedRedis

from .capabilities import server_binary

# cluster-node-timeout of the shared clusters: short, but long enough that a busy machine
# does not make a node look failing.
CLUSTER_NODE_TIMEOUT_MS = 1000


@pytest.fixture(
    scope="session",
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ],
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis | None]:
    """The session's own redis-server; None when $REDIS_URL names one to use instead."""
    if os.environ.get("REDIS_URL"):
        yield None
        return
    with EmbeddedRedis(binary=os.environ.get("ASYNCSTREAMS_TEST_REDIS_SERVER")) as server:
        yield server


@pytest.fixture(scope="session")
def cluster() -> Iterator[EmbeddedCluster]:
    """The session's Redis Cluster of 3 masters, of the suite's binary, shared by the tests
    that ask for it: a test that kills, pauses or stops a node starts a cluster of its own."""
    with EmbeddedCluster(
        3, binary=server_binary(), node_timeout_ms=CLUSTER_NODE_TIMEOUT_MS
    ) as started:
        yield started


@pytest.fixture(scope="session")
def cluster_with_replicas() -> Iterator[EmbeddedCluster]:
    """The session's Redis Cluster of 3 masters with a replica each (nodes 3, 4 and 5
    replicate 0, 1 and 2), shared like `cluster`."""
    with EmbeddedCluster(
        3, 1, binary=server_binary(), node_timeout_ms=CLUSTER_NODE_TIMEOUT_MS
    ) as started:
        yield started


@pytest.fixture
def clean_cluster(cluster: EmbeddedCluster) -> EmbeddedCluster:
    """`cluster` with no keys: FLUSHALL on every master before the test."""
    for row in cluster.slot_map():
        with redis.Redis(host="127.0.0.1", port=row.master, protocol=2) as client:
            client.flushall()
    return cluster


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis | None) -> str:
    return redis_server.url if redis_server is not None else os.environ["REDIS_URL"]


@pytest.fixture
def names(request: pytest.FixtureRequest) -> Names:
    return Names(f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}")


class Names:
    """Stream and group names that no other test uses (tests never flush the server)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.stream = f"{prefix}:stream"
        self.group = f"{prefix}:group"

    def __call__(self, suffix: str) -> str:
        return f"{self.prefix}:{suffix}"


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client for the test's own checks, decoding replies to str."""
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True, protocol=2)
    try:
        yield redis
    finally:
        await redis.aclose()
