"""The suite's side of Redis: key names, data sets, groups and the checks after each run.

Every key the suite writes is named `asyncstreams-bench:<run id>:...`, remembered, and
deleted by this module; nothing else on the server is read, written or flushed.
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import hiredis
import redis

from asyncstreams import Partitioned

from .payload import key_value, xadd_args

if TYPE_CHECKING:
    from .cluster import Lab

FILL_CHUNK = 1_000


def pack(args: tuple[str, ...]) -> bytes:
    """A command in RESP, packed by hiredis."""
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]  # the stub: a 1-tuple
    return packed


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class DataSet:
    """A data set: one stream; or, with `partitions`, a `Partitioned(stream, partitions)`
    whose entries are spread over its partition streams by their `key` field."""

    stream: str  # the stream; with `partitions`, the name of the Partitioned stream
    entries: int
    size: int
    last_id: str  # the stream's last id ("" with `partitions`: see `last_ids`)
    keys: int = 0  # the keyed scenario's: distinct values of the `key` field (0: no such field)
    partitions: int = 0
    # With `partitions`: each partition stream's last id and length (0-length ones left out).
    last_ids: dict[str, str] = field(default_factory=dict)
    lengths: dict[str, int] = field(default_factory=dict)

    @property
    def streams(self) -> tuple[str, ...]:
        """The Redis streams it is written to."""
        if self.partitions:
            return Partitioned(self.stream, self.partitions).streams
        return (self.stream,)


class Store:
    """A sync client for set-up and checks, and the names of everything written."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = redis.Redis.from_url(url, protocol=2)
        self.prefix = f"asyncstreams-bench:{secrets.token_hex(4)}:"
        self._counter = itertools.count(1)
        self._keys: set[str] = set()
        self._datasets: dict[tuple[int, int, int, int], DataSet] = {}
        self._lab: Lab | None = None

    def name(self, what: str) -> str:
        """A fresh key name (remembered, so it is deleted at the end)."""
        key = f"{self.prefix}{what}:{next(self._counter)}"
        self._keys.add(key)
        return key

    def group(self, what: str) -> str:
        return f"bench-{what}-{next(self._counter)}"

    def server_version(self) -> str:
        info: dict[str, Any] = self.client.info("server")
        return str(info.get("redis_version", "?"))

    # -- data --------------------------------------------------------------------------

    def dataset(self, entries: int, size: int, keys: int = 0, partitions: int = 0) -> DataSet:
        """A stream of `entries` tasks of `size` bytes, written once and shared by the runs;
        with `keys`, each has a `key` field too, one of `keys` distinct values (the keyed
        scenario's own data sets: the others' have none). With `partitions` (and `keys`),
        the same entries as a `Partitioned` stream of that many partitions, each entry in
        the partition of its key (`Partitioned.stream(key)`, as `publish(..., key=)` puts
        it), in order."""
        key = (entries, size, keys, partitions)
        if key not in self._datasets:
            what = f"data-{size}B-{entries}" + (f"-{keys}keys" if keys else "")
            if partitions:
                self._datasets[key] = self._partitioned(what, entries, size, keys, partitions)
            else:
                stream = self.name(what)
                last_id = self.fill(stream, 0, entries, size, keys)
                self._datasets[key] = DataSet(stream, entries, size, last_id, keys)
        return self._datasets[key]

    def _partitioned(
        self, what: str, entries: int, size: int, keys: int, partitions: int
    ) -> DataSet:
        if not keys:
            raise ValueError("a partitioned data set is spread by its key field: expected keys")
        stream = Partitioned(self.name(f"{what}-{partitions}p"), partitions)
        self._keys.update(stream.streams)
        last_ids = fill_partitioned(self.client, stream, 0, entries, size, keys)
        lengths = {name: int(self.client.xlen(name)) for name in last_ids}
        return DataSet(
            stream.name, entries, size, "", keys, partitions, last_ids=last_ids, lengths=lengths
        )

    def fill(self, stream: str, start: int, stop: int, size: int, keys: int = 0) -> str:
        """XADD entries `start..stop-1` (see `fill`); the last id."""
        return fill(self.client, stream, start, stop, size, keys)

    def drop_datasets(self) -> None:
        for dataset in self._datasets.values():
            self.delete(*dataset.streams)
        self._datasets.clear()
        self.close_lab()

    def lab(self) -> Lab:
        """The cluster scenario's own servers and data sets (see cluster.py), started on
        first use and stopped with the scenario's data sets."""
        if self._lab is None:
            from .cluster import Lab

            self._lab = Lab(self.prefix)
        return self._lab

    def close_lab(self) -> None:
        lab, self._lab = self._lab, None
        if lab is not None:
            lab.close()

    def delete(self, *keys: str) -> None:
        if keys:
            self.client.delete(*keys)
        self._keys.difference_update(keys)

    def delete_all(self) -> None:
        try:
            with contextlib.suppress(redis.RedisError):
                self.delete(*self._keys)
            self._datasets.clear()
        finally:
            self.close_lab()

    # -- groups ------------------------------------------------------------------------

    def create_group(self, stream: str, group: str, start: str = "0") -> None:
        self.client.xgroup_create(stream, group, start, mkstream=True)

    def destroy_group(self, stream: str, group: str) -> None:
        with contextlib.suppress(redis.ResponseError):
            self.client.xgroup_destroy(stream, group)

    def group_info(self, stream: str, group: str) -> dict[str, Any]:
        return group_info(self.client, stream, group)

    def drained(self, stream: str, group: str, last_id: str) -> bool:
        info = self.group_info(stream, group)
        return info["pending"] == 0 and _text(info["last-delivered-id"]) == last_id

    def check_group(self, stream: str, group: str, last_id: str, entries: int) -> list[str]:
        return check_group(self.client, stream, group, last_id, entries)


def fill(client: redis.Redis, stream: str, start: int, stop: int, size: int, keys: int = 0) -> str:
    """XADD entries `start..stop-1` in pipelines of 1,000 packed by hiredis; the last id.
    `keys`: a `key` field of that many distinct values in each (payload.task_fields)."""
    connection = client.connection_pool.get_connection()
    last_id = ""
    try:
        for first in range(start, stop, FILL_CHUNK):
            seqs = range(first, min(stop, first + FILL_CHUNK))
            now = time.time()
            packed = b"".join(pack(xadd_args(stream, seq, size, now, keys)) for seq in seqs)
            connection.send_packed_command([packed])  # type: ignore[no-untyped-call]
            for _ in seqs:
                last_id = _text(connection.read_response()) or ""
    finally:
        client.connection_pool.release(connection)
    return last_id


def fill_partitioned(
    client: redis.Redis, stream: Partitioned, start: int, stop: int, size: int, keys: int
) -> dict[str, str]:
    """XADD entries `start..stop-1` (see `fill`), each to the partition of its key
    (`stream.stream(key)`), in pipelines of 1,000; the last id of each partition written."""
    connection = client.connection_pool.get_connection()
    last_ids: dict[str, str] = {}
    try:
        for first in range(start, stop, FILL_CHUNK):
            seqs = range(first, min(stop, first + FILL_CHUNK))
            now = time.time()
            names = [stream.stream(key_value(seq, keys)) for seq in seqs]
            packed = b"".join(
                pack(xadd_args(name, seq, size, now, keys))
                for name, seq in zip(names, seqs, strict=True)
            )
            connection.send_packed_command([packed])  # type: ignore[no-untyped-call]
            for name in names:
                last_ids[name] = _text(connection.read_response()) or ""
    finally:
        client.connection_pool.release(connection)
    return last_ids


def group_info(client: redis.Redis, stream: str, group: str) -> dict[str, Any]:
    for info in client.xinfo_groups(stream):
        if _text(info["name"]) == group:
            return dict(info)
    raise LookupError(f"no group {group!r} on {stream}")


def check_group(
    client: redis.Redis, stream: str, group: str, last_id: str, entries: int
) -> list[str]:
    """What is wrong with the group after a run that should have handled everything."""
    info = group_info(client, stream, group)
    problems = []
    if info["pending"]:
        problems.append(f"{info['pending']} entries still pending (XPENDING)")
    delivered = _text(info["last-delivered-id"])
    if delivered != last_id:
        problems.append(f"group last-delivered-id {delivered} != stream last id {last_id}")
    read = info.get("entries-read")  # Redis 7 and later
    if read is not None and read != entries:
        problems.append(f"group entries-read {read} != {entries}")
    return problems
