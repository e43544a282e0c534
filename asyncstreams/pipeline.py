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

import asyncio
import inspect
import logging
import zlib
from collections.abc import Awaitable, Callable, Generator, Hashable, Mapping, Sequence
from itertools import chain, groupby, repeat
from operator import attrgetter
from typing import Any

import msgspec
import msgspec.msgpack
from redis.exceptions import ResponseError

from ._link import Link
from ._nodes import Nodes
from ._rows import MOST_FIELDS, Shape, shape_of
from ._slots import key_slot
from ._transport import is_transient, pack
from .codec import Invoke, InvokeBatch, encode_flat
from .errors import ConfigurationError, DecodeError
from .message import Entry
from .outbox import Outbox, Target
from .partitions import Partitioned

log = logging.getLogger("asyncstreams.consumer")
_msgpack = msgspec.msgpack.Encoder().encode
# What encoding an output that MessagePack cannot carry raises.
_UNENCODABLE = (msgspec.EncodeError, UnicodeEncodeError, TypeError, OverflowError)

# Commits handler calls. KEYS: every stream they name. ARGV: group, consumer, `most`, the
# number of input streams, (stream, lowest id, highest id) per input stream, then the calls
# as one flat MessagePack array: per call, its entries' count, (stream, id) per entry, its
# outputs' count, (stream, count of names and values, name, value, ...) per output. One
# argument is cheaper to send than thousands, and a flat array cheaper to read than nested
# ones (Redis ships cmsgpack, 6.2 and 7 alike).
#
# Which entries are pending on `consumer` is read with one XPENDING per input stream (its
# range, at most `most` entries: a reply that long may be cut short, so an entry missing
# from it is looked up on its own, as an entry that is not ours is, to say why). A call
# whose entries are all ours has its outputs added (XADD); the others are skipped. The
# entries of the calls committed are acked at the end (one XACK per stream and 1,000 ids).
# Returns, per skipped call, its index (from 0) and why: 0, an entry is no longer pending
# (acked); 1, one is pending on another consumer; 2, an output key holds something other
# than a stream (the entries stay pending: claimed again after claim_idle_ms, they end in
# the dead-letter stream).
#
# Every key's type is read first, so no XADD meets a key of another type. Redis refuses a
# write for want of memory only at a script's first one, so a full Redis fails the whole
# script with nothing written; its error is returned with its own code (Redis 6.2 prefixes
# it with the script's line): an outage to ride out. Should a later XADD fail all the same
# (a stream at its last possible id), the outputs the call added are deleted again (XDEL)
# and the calls committed before it acked, then the error is returned: a commit sent again
# adds no output twice.
_COMMIT = """
local group, consumer, most = ARGV[1], ARGV[2], tonumber(ARGV[3])
local mine, at = {}, 5
for r = 1, tonumber(ARGV[4]) do
  local key = ARGV[at]
  local ours = {}
  local reply = redis.call('XPENDING', key, group, ARGV[at + 1], ARGV[at + 2], most, consumer)
  for _, entry in ipairs(reply) do
    ours[entry[1]] = true
  end
  mine[key] = ours
  at = at + 3
end
local kinds, acks, skipped = {}, {}, {}
for _, key in ipairs(KEYS) do
  kinds[key] = redis.call('TYPE', key).ok
end
local function ack_all()
  for key, ids in pairs(acks) do
    for i = 1, #ids, 1000 do
      redis.call('XACK', key, group, unpack(ids, i, math.min(i + 999, #ids)))
    end
  end
end
local calls = cmsgpack.unpack(ARGV[at])
local next, index = 1, 0
while next <= #calls do
  local count, first = calls[next], next + 1
  local why = -1
  for i = first, first + 2 * count - 1, 2 do
    local key, id = calls[i], calls[i + 1]
    if not mine[key][id] then
      local pending = redis.call('XPENDING', key, group, id, id, 1)
      if #pending == 0 then
        if why < 0 then why = 0 end
      elseif pending[1][2] ~= consumer then
        why = 1
      end
    end
  end
  next = first + 2 * count
  local outputs, start = calls[next], next + 1
  next = start
  for o = 1, outputs do
    local kind = kinds[calls[next]]
    if why < 0 and kind ~= 'stream' and kind ~= 'none' then why = 2 end
    next = next + 2 + calls[next + 1]
  end
  if why < 0 then
    next = start
    local added = {}
    for o = 1, outputs do
      local key, fields = calls[next], calls[next + 1]
      local id = redis.pcall('XADD', key, '*', unpack(calls, next + 2, next + 1 + fields))
      if type(id) == 'table' and id.err then
        for i = 1, #added, 2 do
          redis.call('XDEL', added[i], added[i + 1])
        end
        ack_all()
        local code = string.match(id.err, '^@user_script: ?%d+: ?%-(.*)$')
        return redis.error_reply(code or id.err)
      end
      added[#added + 1] = key
      added[#added + 1] = id
      next = next + 2 + fields
    end
    for i = first, first + 2 * count - 1, 2 do
      local ids = acks[calls[i]]
      if ids == nil then
        ids = {}
        acks[calls[i]] = ids
      end
      ids[#ids + 1] = calls[i + 1]
    end
  else
    skipped[#skipped + 1] = index
    skipped[#skipped + 1] = why
  end
  index = index + 1
end
ack_all()
return skipped
"""


Output = list[Any]
"""One output as the script takes it: its stream, how many names and values follow, then
name, value, name, value..."""


class Commit:
    """One handler call's entries and outputs, waiting to be committed; `item`, the call as
    the commit script reads it (see _COMMIT): a flat list."""

    __slots__ = ("atomic", "entries", "item", "outputs", "published")

    def __init__(self, entries: list[tuple[str, bytes]], outputs: list[Output]) -> None:
        self.entries = entries
        self.outputs = outputs
        if len(entries) == 1:
            item: list[Any] = [1, entries[0][0], entries[0][1].decode(), len(outputs)]
        else:
            item = [len(entries)]
            for stream, entry_id in entries:
                item += (stream, entry_id.decode())
            item.append(len(outputs))
        for output in outputs:
            item += output
        self.item = item
        # On a cluster, False when a key is in another slot than the first entry's.
        self.atomic = True
        # The outputs published before the commit (not atomic), by index: not again when
        # the commit is retried.
        self.published: set[int] = set()


class Row:
    """The most common call, kept cheaply until its commit: one entry, whose handler
    returned one Struct of scalar values (`values`, of `shape`) for the consumer's one
    output stream, in the entry's hash slot. (A call of any other kind is a Commit.)"""

    __slots__ = ("entry_id", "shape", "stream", "values")

    def __init__(self, stream: str, entry_id: bytes, shape: Shape, values: tuple[Any, ...]):
        self.stream = stream
        self.entry_id = entry_id
        self.shape = shape
        self.values = values

    def commit(self, output: str) -> Commit:
        """The same call as a Commit (to log it, or to encode it alone)."""
        texts = [column[0] for column in self.shape.columns([self.values])]
        flat: list[Any] = list(chain.from_iterable(zip(self.shape.names, texts, strict=True)))
        return Commit([(self.stream, self.entry_id)], [[output, len(flat), *flat]])


# A call waiting for its commit: a Row, a Commit, or (stream, id) for an entry that has no
# outputs.
Waiting = Row | Commit | tuple[str, bytes]


class Pipeline:
    """The outputs of one consumer's handler calls, from the call to the commit.

    `output`: where returned payloads go (None: a return value is ignored); `output_key`:
    for a `Partitioned` output, a field name of the payload or a callable on it giving the
    key that picks the partition; `inputs`: the consumer's streams, to find the partition
    number of an input entry; `most`: the consumer's bound (`concurrency + batch_size`).
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
        most: int,
    ) -> None:
        self._nodes = nodes
        self._group = group
        self._consumer = consumer
        self._handler = handler
        self._returned = f"the return value of {handler}"
        self._output = output
        self._output_key = output_key
        # The output stream when it is one name for every entry (no `{stream}`).
        self._fixed = output if isinstance(output, str) and "{stream}" not in output else None
        # The most entries this consumer holds: its pending entries in a commit's range.
        self._most = most
        self._staged: dict[tuple[str, bytes], Commit | Row] = {}
        # Per input stream: whether its calls to the one output stream may be Rows (on a
        # cluster, only if that stream is in the input's slot).
        self._rows: dict[str, bool] = {}
        self._outboxes: dict[tuple[str, bytes], Outbox] = {}
        # The partition number of each input stream that is a partition, and their count.
        self._partition_of: dict[str, tuple[int, int]] = {
            name: (index, item.partitions)
            for item in inputs
            if isinstance(item, Partitioned)
            for index, name in enumerate(item.streams)
        }
        self._warned: set[tuple[str, str]] = set()
        # On one server, the commits go on a connection of their own (as the Acker's XACKs).
        first = inputs[0]
        self._link = Link(nodes, first if isinstance(first, str) else first.streams[0])
        # The flushes of a cluster's masters publish non-atomic calls one at a time.
        self._publishing = asyncio.Lock()

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
        box = self._outboxes.pop(first, None) if self._outboxes else None
        if box is None:
            if result is None:
                return
            if len(ids) == 1 and self._fixed is not None:
                # The common call: kept as a Row, encoded at the commit with the others.
                found = shape_of(result)
                if found is not None and self._in_rows(first[0]):
                    self._staged[first] = Row(first[0], first[1], *found)
                    return
        outputs: list[Output] = []
        if result is not None and self._output is not None:
            values = result if isinstance(result, list) else (result,)
            for value in values:
                if self._fixed is not None:
                    stream = self._fixed
                else:
                    key = self._key_of(value) if self._output_key is not None else None
                    stream = self._stream(self._output, key, first)
                outputs.append(_output(stream, value, self._returned))
        if box is not None:
            for target, payload, key in box.emitted:
                where = f"Outbox.emit to {_label(target)}"
                outputs.append(_output(self._stream(target, key, first), payload, where))
        if not outputs:
            return
        call = Commit(ids, outputs)
        if self._nodes.cluster:
            slot = key_slot(first[0])
            for name in chain((stream for stream, _ in ids), (o[0] for o in outputs)):
                if key_slot(name) != slot:
                    call.atomic = False
                    self._warn_once(first[0], name)
        staged = self._staged
        for entry in ids:
            staged[entry] = call

    def _in_rows(self, stream: str) -> bool:
        try:
            return self._rows[stream]
        except KeyError:
            pass
        rows = self._rows[stream] = not self._nodes.cluster or key_slot(stream) == key_slot(
            str(self._fixed)
        )
        return rows

    def dropped(self, ids: list[tuple[str, bytes]]) -> None:
        """The call of the entries `ids` failed (its handler raised, or a middleware after
        it, or it was cancelled): what it emitted or returned goes."""
        self._outboxes.pop(ids[0], None)
        for entry in ids:
            self._staged.pop(entry, None)

    def discard(self, entries: Sequence[Entry]) -> None:
        """`dropped`, for the workers: entries whose call failed after the handler returned."""
        self.dropped([(entry[0], entry[1]) for entry in entries])

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
        calls: list[Waiting] = []
        across: list[Commit] = []
        seen: set[int] = set()  # calls of several entries (a batch handler's) met already
        for stream, ids in ids_by_stream.items():
            for entry_id in ids:
                call = staged.get((stream, entry_id))
                if call is None:
                    calls.append((stream, entry_id))
                    continue
                if type(call) is Row:
                    calls.append(call)
                    continue
                assert isinstance(call, Commit)
                if len(call.entries) > 1:
                    if id(call) in seen:
                        continue
                    seen.add(id(call))
                (calls if call.atomic else across).append(call)
        if across:
            # Published first; then each entry is acked on its own (they may be in several
            # slots), still only while pending on this consumer. A call whose outputs Redis
            # refused is not acked: its entries stay pending (claimed again, then
            # dead-lettered).
            published = await self._publish_first(across)
            calls += [entry for call in published for entry in call.entries]
        if self._nodes.cluster:
            by_slot: dict[int, list[Waiting]] = {}
            for one in calls:
                by_slot.setdefault(key_slot(_stream_of(one)), []).append(one)
            groups = list(by_slot.values())
        else:
            groups = [calls]
        commands: list[tuple[str, bytes]] = []
        kept: list[list[Waiting]] = []
        for group in groups:
            try:
                command = self._commit(group)
            except _UNENCODABLE:
                group = self._encodable(group)
                if not group:
                    continue
                command = self._commit(group)
            kept.append(group)
            commands.append((_stream_of(group[0]), command))
        groups = kept
        if not commands:
            replies: list[Any] = []
        elif self._nodes.cluster:
            replies = await self._nodes.send(commands)
        else:
            # One server, one group: one script. An error reply is raised.
            replies = [await self._link.call(commands[0][1])]
        for group, reply in zip(groups, replies, strict=True):
            if isinstance(reply, ResponseError):
                raise reply
            self._committed(group, reply)
        for call in across:
            self.dropped(call.entries)

    def _encodable(self, calls: list[Waiting]) -> list[Waiting]:
        """`calls` but those whose outputs MessagePack cannot carry (a str with a lone
        surrogate, say: text that is not Unicode), for a commit that did not encode: they
        are left pending, as the calls whose outputs Redis refuses (see `_refused`)."""
        kept: list[Waiting] = []
        for call in calls:
            if type(call) is Row:
                call = call.commit(str(self._fixed))
            if isinstance(call, Commit):
                try:
                    _msgpack(call.item)
                except _UNENCODABLE as exc:
                    self._refused(call, f"cannot be encoded ({exc})")
                    self.dropped(call.entries)
                    continue
            kept.append(call)
        return kept

    def _commit(self, calls: list[Waiting]) -> bytes:
        """The EVAL of the commit script for `calls` (see _COMMIT)."""
        inputs: dict[str, list[bytes]] = {}
        outputs: dict[str, None] = {}
        items: list[Any] = []
        rows: list[Row] = []
        commits = False
        for call in calls:
            if type(call) is Row:
                rows.append(call)
                continue
            if rows:
                self._add_rows(rows, inputs, outputs, items)
                rows = []
            if isinstance(call, tuple):
                stream, entry_id = call
                inputs.setdefault(stream, []).append(entry_id)
                items += (1, stream, entry_id.decode(), 0)
                continue
            assert isinstance(call, Commit)
            commits = True
            for stream, entry_id in call.entries:
                inputs.setdefault(stream, []).append(entry_id)
            for output in call.outputs:
                outputs[output[0]] = None
            items += call.item
        if rows:
            self._add_rows(rows, inputs, outputs, items)
        ranges: list[bytes | str] = []
        for stream, ids in inputs.items():
            ranges += (stream, *_bounds(ids))
        keys = [*inputs, *(key for key in outputs if key not in inputs)]
        if commits and bytes in map(type, items):
            items = _packable(items)
        return pack(
            ("EVAL", _COMMIT, len(keys), *keys, self._group, self._consumer, self._most + 1,
             len(inputs), *ranges, _msgpack(items))
        )  # fmt: skip

    def _add_rows(
        self,
        rows: list[Row],
        inputs: dict[str, list[bytes]],
        outputs: dict[str, None],
        items: list[Any],
    ) -> None:
        """Add consecutive Rows to a commit's `items`, as calls of one entry and one output
        each (see _COMMIT), in their order; made column by column, in C loops, for each run
        of Rows of one input stream and one shape."""
        output = str(self._fixed)
        outputs[output] = None
        for (stream, shape), group in groupby(rows, key=_stream_and_shape):
            run = list(group)
            ids = [row.entry_id for row in run]
            inputs.setdefault(stream, []).extend(ids)
            fields: list[Any] = []
            for name, column in zip(
                shape.names, shape.columns([row.values for row in run]), strict=True
            ):
                fields += (repeat(name), column)
            calls = zip(
                repeat(1), repeat(stream), map(bytes.decode, ids),
                repeat(1), repeat(output), repeat(2 * len(shape.names)), *fields,
            )  # fmt: skip
            items += chain.from_iterable(calls)

    def _committed(self, calls: list[Waiting], skipped: list[int]) -> None:
        staged = self._staged
        for call in calls:
            if type(call) is Row:
                staged.pop((call.stream, call.entry_id), None)
            elif isinstance(call, Commit):
                for entry in call.entries:
                    staged.pop(entry, None)
        for index, why in zip(skipped[::2], skipped[1::2], strict=True):
            call = calls[index]
            if isinstance(call, tuple):
                continue  # no outputs: nothing to say
            if isinstance(call, Row):
                call = call.commit(str(self._fixed))
            if why == 2:
                self._refused(call)
            elif why == 1:
                log.warning(
                    "%s: entries %s were claimed by another consumer before their outputs "
                    "were committed: the outputs are dropped (the other consumer's run "
                    "commits its own)",
                    self._handler,
                    ", ".join(f"{s}/{i.decode()}" for s, i in call.entries[:3]),
                )

    def _refused(
        self,
        call: Commit,
        why: str = "cannot be added: a stream among them is a key of another type",
    ) -> None:
        log.error(
            "%s: the outputs of entries %s (to %s) %s; the entries stay pending, to be claimed "
            "again after claim_idle_ms (and dead-lettered after max_deliveries)",
            self._handler,
            ", ".join(f"{s}/{i.decode()}" for s, i in call.entries[:3]),
            sorted({output[0] for output in call.outputs}),
            why,
        )

    async def close(self) -> None:
        """Give back the commits' connection (the Acker's interface)."""
        await self._link.close()

    async def _publish_first(self, calls: list[Commit]) -> list[Commit]:
        """XADD now the outputs of calls that cannot commit in one script, each output once
        (the flushes of several masters may hold entries of one call: they take turns).
        Returns the calls whose outputs are all in; those with an output Redis refused are
        logged and left out (a transient refusal, a full Redis, is raised: ridden out)."""
        async with self._publishing:
            todo = [(call, index) for call in calls for index in range(len(call.outputs))
                    if index not in call.published]  # fmt: skip
            commands = [
                (call.outputs[index][0], pack(("XADD", call.outputs[index][0], "*",
                                               *call.outputs[index][2:])))
                for call, index in todo
            ]  # fmt: skip
            replies = await self._nodes.send(commands) if commands else []
            refused: set[int] = set()
            for (call, index), reply in zip(todo, replies, strict=True):
                if not isinstance(reply, ResponseError):
                    call.published.add(index)
                elif is_transient(reply):
                    raise reply
                elif id(call) not in refused:
                    refused.add(id(call))
                    self._refused(call, f"were refused ({reply})")
                    self.dropped(call.entries)
            return [call for call in calls if id(call) not in refused]


class Staging:
    """A handler's awaitable that stages its call's outputs when it returns. (`inner`: the
    handler's own, for the workers to close if a middleware never awaited this.)"""

    __slots__ = ("_ids", "_pipeline", "_started", "inner")

    def __init__(self, inner: Awaitable[Any], pipeline: Pipeline, ids: list[tuple[str, bytes]]):
        self.inner = inner
        self._pipeline = pipeline
        self._ids = ids
        self._started = False

    def __await__(self) -> Generator[Any, None, Any]:
        self._started = True
        try:
            result = yield from self.inner.__await__()
        except BaseException:
            self._pipeline.dropped(self._ids)
            raise
        self._pipeline.stage(self._ids, result)
        return result

    def close_unstarted(self) -> None:
        """If a middleware never awaited this: close the handler's coroutine, drop its
        Outbox. (Called whether or not it was awaited.)"""
        if self._started:
            return
        inner = self.inner
        if inspect.iscoroutine(inner) and inspect.getcoroutinestate(inner) == "CORO_CREATED":
            inner.close()
        self._pipeline.dropped(self._ids)


def _packable(items: list[Any]) -> list[Any]:
    """`items` for the script's MessagePack: Redis's cmsgpack reads no `bin`, which is how
    bytes are packed, so a bytes value goes as a MessagePack `str` of the same bytes (a Lua
    string holds any bytes)."""
    return [_str_of(value) if type(value) is bytes else value for value in items]


def _stream_of(call: Waiting) -> str:
    if isinstance(call, tuple):
        return call[0]
    return call.stream if isinstance(call, Row) else call.entries[0][0]


_stream_and_shape = attrgetter("stream", "shape")


def _str_of(value: bytes) -> msgspec.Raw:
    size = len(value)
    if size < 32:
        head = bytes((0xA0 | size,))
    elif size < 1 << 8:
        head = b"\xd9" + size.to_bytes(1, "big")
    elif size < 1 << 16:
        head = b"\xda" + size.to_bytes(2, "big")
    else:
        head = b"\xdb" + size.to_bytes(4, "big")
    return msgspec.Raw(head + value)


def _bounds(ids: list[bytes]) -> tuple[bytes, bytes]:
    """A range of entry ids (`ms-seq`) that holds `ids`, in C loops: from the lowest
    millisecond's first id to the highest's last (the script reads which entries of it
    are pending on this consumer: a few more than `ids` is no harm). Milliseconds of one
    length compare as bytes; otherwise as numbers."""
    ms = b"-".join(ids).split(b"-")[::2]
    if len(set(map(len, ms))) == 1:
        low, high = min(ms), max(ms)
    else:
        numbers = list(map(int, ms))
        low, high = b"%d" % min(numbers), b"%d" % max(numbers)
    return low + b"-0", high + b"-18446744073709551615"


def _output(stream: str, payload: object, where: str) -> Output:
    """`payload` as an output to `stream`; a clear error naming `where` it comes from if it
    cannot be."""
    if not isinstance(payload, (msgspec.Struct, Mapping)):
        raise ConfigurationError(
            f"{where}: expected a msgspec.Struct, a dict, a list of them or None, found "
            f"{type(payload).__name__}"
        )
    try:
        flat = encode_flat(payload)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}: {str(exc).removeprefix('publish: ')}") from None
    if len(flat) > 2 * MOST_FIELDS:
        raise ConfigurationError(
            f"{where}: expected at most {MOST_FIELDS:,} fields in an output, found "
            f"{len(flat) // 2:,}"
        )
    return [stream, len(flat), *flat]


def _field(value: object, name: str) -> object:
    if isinstance(value, Mapping):
        return value.get(name)
    return getattr(value, name, None)


def _label(stream: Target) -> str:
    return stream.label if isinstance(stream, Partitioned) else stream
