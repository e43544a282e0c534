"""Pipelines: what a handler publishes is committed with its input's ack, in one step.

A consumer with `output=` publishes what its handler returns (a payload, a list of them,
or None for nothing); a handler that takes an `Outbox` parameter publishes what it emits
there, to any stream. Either way nothing is sent while the handler runs: its outputs wait
with its input's ack, and the ack flusher commits them together, many entries at once,
with one script (COMMIT below) that, for each handler call,

1. checks that each of the call's entries is still pending on this consumer (a consumer
   paused past `claim_idle_ms` whose entries a peer claimed, or claimed and finished, no
   longer owns them: its outputs are dropped, the peer's run commits its own);
2. adds the outputs (XADD) and acks the entries (XACK), with nothing in between.

So each input's outputs land in Redis exactly once: a crash before the commit leaves the
entry pending to run again, with nothing published; a commit whose reply was lost and is
sent again finds its entries acked already and adds nothing. What a handler does outside
Redis stays at-least-once.

A script runs on one server, so on a Redis Cluster a call's outputs must be in its
entries' hash slot (`{stream}:out` of a stream with a hash tag, or a `Partitioned` output
derived from a `Partitioned` input: `orders.derive("enriched")`). An output in another slot
is published before the commit, at-least-once, and the consumer logs a warning naming the
slots the first time.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Awaitable, Callable, Generator, Hashable, Mapping, Sequence
from itertools import chain
from typing import Any

import msgspec
from redis.exceptions import ResponseError

from ._nodes import Nodes
from ._slots import key_slot
from ._transport import pack
from .codec import Invoke, InvokeBatch, encode_fields
from .errors import ConfigurationError, DecodeError
from .message import Entry
from .outbox import Outbox, Target
from .partitions import Partitioned

log = logging.getLogger("asyncstreams.consumer")

# The most fields one output may have: the script passes them to XADD with Lua's unpack(),
# which takes about 8,000 values.
MOST_FIELDS = 3_900

# Commits handler calls: KEYS, every stream they name; ARGV: group, consumer, then per call
# its entries' count, (key index, id) per entry, its outputs' count, (key index, field
# count, fields...) per output. A call whose entries are all pending on `consumer` has its
# outputs added and its entries acked; the others are skipped. Returns, per skipped call,
# its index (from 0) and why: 0, an entry is no longer pending (acked); 1, one is pending on
# another consumer; 2, an output key holds something other than a stream (the entries stay
# pending: claimed again after claim_idle_ms, they end in the dead-letter stream). Redis
# refuses a write for want of memory only at a script's first one, so a full Redis fails the
# whole script with nothing written (its error is returned with its own code, OOM, which
# Redis 6.2 prefixes with the script's line: an outage to ride out).
_COMMIT = """
local group, consumer = ARGV[1], ARGV[2]
local kinds = {}
local skipped = {}
local at, call = 3, 0
while at <= #ARGV do
  local count = tonumber(ARGV[at])
  local first = at + 1
  local why = -1
  for i = 0, count - 1 do
    local key, id = KEYS[tonumber(ARGV[first + 2 * i])], ARGV[first + 2 * i + 1]
    local pending = redis.call('XPENDING', key, group, id, id, 1)
    if #pending == 0 then
      if why < 0 then why = 0 end
    elseif pending[1][2] ~= consumer then
      why = 1
    end
  end
  at = first + 2 * count
  local outputs = tonumber(ARGV[at])
  at = at + 1
  local start = at
  for o = 1, outputs do
    local key = tonumber(ARGV[at])
    if kinds[key] == nil then kinds[key] = redis.call('TYPE', KEYS[key]).ok end
    if why < 0 and kinds[key] ~= 'stream' and kinds[key] ~= 'none' then why = 2 end
    at = at + 2 + tonumber(ARGV[at + 1])
  end
  if why < 0 then
    at = start
    for o = 1, outputs do
      local key, fields = tonumber(ARGV[at]), tonumber(ARGV[at + 1])
      local added = redis.pcall('XADD', KEYS[key], '*', unpack(ARGV, at + 2, at + 1 + fields))
      if type(added) == 'table' and added.err then
        local code = string.match(added.err, '^@user_script: ?%d+: ?%-(.*)$')
        return redis.error_reply(code or added.err)
      end
      kinds[key] = 'stream'
      at = at + 2 + fields
    end
    for i = 0, count - 1 do
      redis.call('XACK', KEYS[tonumber(ARGV[first + 2 * i])], group, ARGV[first + 2 * i + 1])
    end
  else
    skipped[#skipped + 1] = call
    skipped[#skipped + 1] = why
  end
  call = call + 1
end
return skipped
"""


class Commit:
    """One handler call's entries and outputs, waiting to be committed."""

    __slots__ = ("atomic", "entries", "outputs", "published")

    def __init__(
        self, entries: list[tuple[str, bytes]], outputs: list[tuple[str, list[bytes | str]]]
    ) -> None:
        self.entries = entries
        self.outputs = outputs
        # On a cluster, False when a key is in another slot than the first entry's.
        self.atomic = True
        # Published before the commit (not atomic): not again when the commit is retried.
        self.published = False


class Pipeline:
    """The outputs of one consumer's handler calls, from the call to the commit.

    `output`: where returned payloads go (None: a return value is ignored); `output_key`:
    for a `Partitioned` output, a field name of the payload or a callable on it giving the
    key that picks the partition; `inputs`: the consumer's streams, to find the partition
    number of an input entry.
    """

    def __init__(
        self,
        nodes: Nodes,
        *,
        group: str,
        consumer: str,
        handler: str,
        output: Target | None,
        output_key: str | Callable[[Any], Hashable] | None,
        inputs: Sequence[str | Partitioned],
    ) -> None:
        self._nodes = nodes
        self._group = group
        self._consumer = consumer
        self._handler = handler
        self._output = output
        self._output_key = output_key
        self._staged: dict[tuple[str, bytes], Commit] = {}
        self._outboxes: dict[tuple[str, bytes], Outbox] = {}
        # The partition number of each input stream that is a partition, and their count.
        self._partition_of: dict[str, tuple[int, int]] = {
            name: (index, item.partitions)
            for item in inputs
            if isinstance(item, Partitioned)
            for index, name in enumerate(item.streams)
        }
        self._warned: set[tuple[str, str]] = set()
        # Calls whose entries were taken by another consumer before they committed.
        self.fenced = 0

    # -- from the handler's call to a staged Commit ------------------------------------

    def outbox(self, stream: str, entry_id: bytes) -> Outbox:
        """A new Outbox for the call whose first entry is (stream, entry_id)."""
        box = self._outboxes[(stream, entry_id)] = Outbox()
        return box

    def staged(self, invoke: Invoke) -> Invoke:
        """`invoke`, whose calls stage their outputs once the handler returns."""

        def call(stream: str, entry_id: bytes, flat: list[bytes], deliveries: int) -> Any:
            ids = [(stream, entry_id)]
            try:
                run = invoke(stream, entry_id, flat, deliveries)
            except BaseException:
                self.dropped(ids)
                raise
            return Staging(run, self, ids)

        return call

    def staged_batch(self, invoke_batch: InvokeBatch) -> InvokeBatch:
        """`invoke_batch`, whose calls stage their outputs once the handler returns."""

        def call(
            entries: list[Entry],
        ) -> tuple[list[Entry], list[tuple[Entry, DecodeError]], Awaitable[Any] | None]:
            passed, rejected, run = invoke_batch(entries)
            if run is not None:
                run = Staging(run, self, [(entry[0], entry[1]) for entry in passed])
            return passed, rejected, run

        return call

    def stage(self, ids: list[tuple[str, bytes]], result: object) -> None:
        """The call of the entries `ids` returned `result`: its outputs wait for the commit.
        An output that cannot be published raises, failing the call (nothing is staged)."""
        first = ids[0]
        box = self._outboxes.pop(first, None)
        outputs: list[tuple[str, list[bytes | str]]] = []
        if result is not None and self._output is not None:
            values = result if isinstance(result, list) else [result]
            where = f"the return value of {self._handler}"
            for value in values:
                flat = _flat(value, where)
                key = self._key_of(value) if self._output_key is not None else None
                outputs.append((self._stream(self._output, key, first), flat))
        if box is not None:
            for target, payload, key in box.emitted:
                flat = _flat(payload, f"Outbox.emit to {_label(target)}")
                outputs.append((self._stream(target, key, first), flat))
        if not outputs:
            return
        call = Commit(ids, outputs)
        if self._nodes.cluster:
            slot = key_slot(first[0])
            for name in chain((stream for stream, _ in ids), (o[0] for o in outputs)):
                if key_slot(name) != slot:
                    call.atomic = False
                    self._warn_once(first[0], name)
        for entry in ids:
            self._staged[entry] = call

    def dropped(self, ids: list[tuple[str, bytes]]) -> None:
        """The call of the entries `ids` raised: what it emitted goes."""
        self._outboxes.pop(ids[0], None)

    def _key_of(self, value: object) -> str | bytes:
        key = self._output_key
        found = key(value) if callable(key) else _field(value, str(key))
        if isinstance(found, (str, bytes)):
            return found
        if found is None or isinstance(found, bool):
            raise ConfigurationError(
                f"output_key of {self._handler}: expected a key (text) in the output, "
                f"found {found!r}"
            )
        return str(found)

    def _stream(self, target: Target, key: str | bytes | None, first: tuple[str, bytes]) -> str:
        """The stream an output to `target` goes to, for a call whose first entry is
        `first`."""
        if not isinstance(target, Partitioned):
            return target.replace("{stream}", first[0])
        if key is not None:
            return target.stream(key)
        index, partitions = self._partition_of.get(first[0], (-1, 0))
        if partitions == target.partitions:
            return target.streams[index]
        return target.streams[zlib.crc32(first[1]) % target.partitions]

    def _warn_once(self, stream: str, other: str) -> None:
        if (stream, other) in self._warned:
            return
        self._warned.add((stream, other))
        log.warning(
            "%s: %r (slot %d) and %r (slot %d) are in different hash slots: the outputs of "
            "its entries are published before their acks, at-least-once (a crash between "
            "the two publishes them again); keep them in one slot for exactly once",
            self._handler,
            stream,
            key_slot(stream),
            other,
            key_slot(other),
        )

    # -- the commit: the ack flusher's `ack` ------------------------------------------

    async def ack(self, ids_by_stream: Mapping[str, list[bytes]]) -> None:
        """Commit the calls of these finished entries: their outputs and their acks, in one
        script per hash slot (one for everything, on one server). Raises what Redis
        refused; sent again, it adds nothing twice."""
        staged = self._staged
        calls: list[Commit] = []
        seen: set[int] = set()
        for stream, ids in ids_by_stream.items():
            for entry_id in ids:
                call = staged.get((stream, entry_id))
                if call is None:
                    calls.append(Commit([(stream, entry_id)], []))
                elif id(call) not in seen:
                    seen.add(id(call))
                    calls.append(call)
        across = [call for call in calls if not call.atomic]
        if across:
            # Published first; then each entry is acked on its own (they may be in several
            # slots), still only while pending on this consumer.
            await self._publish_first(across)
            calls = [call for call in calls if call.atomic]
            calls += [Commit([entry], []) for call in across for entry in call.entries]
        by_slot: dict[int, list[Commit]] = {}
        for call in calls:
            slot = key_slot(call.entries[0][0]) if self._nodes.cluster else 0
            by_slot.setdefault(slot, []).append(call)
        commands = [(group[0].entries[0][0], self._commit(group)) for group in by_slot.values()]
        replies = await self._nodes.send(commands)
        for group, reply in zip(by_slot.values(), replies, strict=True):
            if isinstance(reply, ResponseError):
                raise reply
            self._committed(group, reply)

    def _commit(self, calls: list[Commit]) -> bytes:
        keys: dict[str, int] = {}
        args: list[bytes | str | int] = [self._group, self._consumer]
        for call in calls:
            args.append(len(call.entries))
            for stream, entry_id in call.entries:
                args += (keys.setdefault(stream, len(keys) + 1), entry_id)
            args.append(len(call.outputs))
            for stream, flat in call.outputs:
                args += (keys.setdefault(stream, len(keys) + 1), len(flat), *flat)
        return pack(("EVAL", _COMMIT, len(keys), *keys, *args))

    def _committed(self, calls: list[Commit], skipped: list[int]) -> None:
        staged = self._staged
        for call in calls:
            for entry in call.entries:
                staged.pop(entry, None)
        for index, why in zip(skipped[::2], skipped[1::2], strict=True):
            if why == 2:
                self._refused(calls[index])
            elif why == 1 and calls[index].outputs:
                self.fenced += 1
                log.warning(
                    "%s: entries %s were claimed by another consumer before their outputs "
                    "were committed: the outputs are dropped (the other consumer's run "
                    "commits its own)",
                    self._handler,
                    ", ".join(f"{s}/{i.decode()}" for s, i in calls[index].entries[:3]),
                )

    def _refused(self, call: Commit) -> None:
        log.error(
            "%s: the outputs of entries %s cannot be added: a stream among %s is a key of "
            "another type; the entries stay pending, to be claimed again after claim_idle_ms "
            "(and dead-lettered after max_deliveries)",
            self._handler,
            ", ".join(f"{s}/{i.decode()}" for s, i in call.entries[:3]),
            sorted({stream for stream, _ in call.outputs}),
        )

    async def close(self) -> None:
        """Nothing to close: commits go through the pools (the Acker's interface)."""

    async def _publish_first(self, calls: list[Commit]) -> None:
        """The outputs of calls that cannot commit in one script: XADD them now (once)."""
        todo = [call for call in calls if not call.published]
        commands = [
            (stream, pack(("XADD", stream, "*", *flat)))
            for call in todo
            for stream, flat in call.outputs
        ]
        if not commands:
            return
        for reply in await self._nodes.send(commands):
            if isinstance(reply, ResponseError):
                raise reply
        for call in todo:
            call.published = True


class Staging:
    """A handler's awaitable that stages its call's outputs when it returns. (`inner`: the
    handler's own, for the workers to close if a middleware never awaited this.)"""

    __slots__ = ("_ids", "_pipeline", "inner")

    def __init__(self, inner: Awaitable[Any], pipeline: Pipeline, ids: list[tuple[str, bytes]]):
        self.inner = inner
        self._pipeline = pipeline
        self._ids = ids

    def __await__(self) -> Generator[Any, None, Any]:
        try:
            result = yield from self.inner.__await__()
        except BaseException:
            self._pipeline.dropped(self._ids)
            raise
        self._pipeline.stage(self._ids, result)
        return result


def _flat(payload: object, where: str) -> list[bytes | str]:
    """`payload` as XADD's flat field list; a clear error naming `where` if it cannot be."""
    if not isinstance(payload, (msgspec.Struct, Mapping)):
        raise ConfigurationError(
            f"{where}: expected a msgspec.Struct, a dict, a list of them or None, found "
            f"{type(payload).__name__}"
        )
    try:
        fields = encode_fields(payload)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}: {str(exc).removeprefix('publish: ')}") from None
    if len(fields) > MOST_FIELDS:
        raise ConfigurationError(
            f"{where}: expected at most {MOST_FIELDS:,} fields in an output, found {len(fields):,}"
        )
    return list(chain.from_iterable(fields.items()))


def _field(value: object, name: str) -> object:
    if isinstance(value, Mapping):
        return value.get(name)
    return getattr(value, name, None)


def _label(stream: Target) -> str:
    return stream.label if isinstance(stream, Partitioned) else stream
