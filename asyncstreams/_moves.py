"""Moving entries between a stream and its dead-letter stream: to it when an entry fails for
good (from a consumer), back from it when an operator replays it.

Each move is one step where the two streams share a hash slot (always, on one server; by
default, on a cluster), and two steps in the order that never loses the entry where they do
not: the copy is added before the original is acked or deleted.
"""

from __future__ import annotations

import enum

from redis.exceptions import ResponseError

from ._nodes import Nodes
from ._transport import text
from .deadletter import DeadLetter

# Moves an entry to the dead-letter stream, if it is still pending on this consumer: XADD
# of the metadata fields and the entry's own fields (names starting with "!" get one more,
# see deadletter.py), then XACK. One script: the check, the copy and the ack cannot be
# split by another consumer's claim, a lost reply cannot add a second copy, and a failed
# XADD leaves the entry pending. KEYS: the stream, the dead-letter stream; ARGV: group,
# consumer, id, then the metadata fields. Returns 1 (moved), 0 (not pending on this
# consumer any more: left to whoever has it) or -1 (deleted from the stream: acked).
_MOVE = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #pending == 0 or pending[1][2] ~= ARGV[2] then
  return 0
end
local found = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
if #found == 0 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
  return -1
end
local fields = {}
for i = 4, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
local original = found[1][2]
for i = 1, #original, 2 do
  local name = original[i]
  if string.sub(name, 1, 1) == '!' then
    name = '!' .. name
  end
  fields[#fields + 1] = name
  fields[#fields + 1] = original[i + 1]
end
redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return 1
"""
# Lua's unpack() takes about 8,000 values: an entry with more fields than this is moved with
# MULTI instead (whose fallback, when its XADD fails, is not one step with its XACK).
_MOVE_MOST_FIELDS = 3_900


class Moved(enum.IntEnum):
    """What became of an entry sent to the dead-letter stream."""

    MOVED = 1
    NOT_OURS = 0  # no longer pending on this consumer: acked, or claimed by another
    DELETED = -1  # deleted from the stream (trimmed) before it could be moved


async def move(
    nodes: Nodes, letter: DeadLetter, target: str, consumer: str, fields: list[bytes]
) -> Moved:
    """Move the entry `letter` is about (whose fields are `fields`) to `target` as `letter`
    says, and XACK it: in one script, only while it is pending on `consumer`. Raises what
    Redis refused it with (OOM, WRONGTYPE); the entry then stays pending.

    On a cluster, a `target` in another hash slot than the entry's stream cannot share a
    script with it: see `_move_across`."""
    stream, group, entry_id = letter.stream, letter.group, letter.id
    if not nodes.same_slot(stream, target):
        return await _move_across(nodes, letter, target, consumer, fields)
    if len(fields) // 2 <= _MOVE_MOST_FIELDS:
        args = (stream, target, group, consumer, entry_id, *letter.metadata())
        return Moved(int(await nodes.raw(stream, "EVAL", _MOVE, 2, *args)))
    added, _ = await nodes.transaction(
        stream, ("XADD", target, "*", *letter.fields(fields)), ("XACK", stream, group, entry_id)
    )
    if isinstance(added, ResponseError):
        # The XACK ran all the same: put the entry back in the pending entries list.
        await nodes.raw(stream, "XCLAIM", stream, group, consumer, 0, entry_id, "FORCE", "JUSTID")
        raise added
    return Moved.MOVED


async def _move_across(
    nodes: Nodes, letter: DeadLetter, target: str, consumer: str, fields: list[bytes]
) -> Moved:
    """`move` to a dead-letter stream in another slot, step by step, in the order that
    never loses the entry: the copy is added before the entry is acked. A crash between the
    two leaves the entry pending, to be moved again: one extra copy at worst, never none."""
    stream, group, entry_id = letter.stream, letter.group, letter.id
    owner = await nodes.raw(stream, "XPENDING", stream, group, entry_id, entry_id, 1)
    if not owner or text(owner[0][1]) != consumer:
        return Moved.NOT_OURS
    if not await nodes.raw(stream, "XRANGE", stream, entry_id, entry_id):
        await nodes.raw(stream, "XACK", stream, group, entry_id)
        return Moved.DELETED
    await nodes.raw(target, "XADD", target, "*", *letter.fields(fields))
    await nodes.raw(stream, "XACK", stream, group, entry_id)
    return Moved.MOVED


async def move_back(
    nodes: Nodes,
    source: str,
    entry_id: bytes,
    source_fields: list[bytes],
    target: str,
    fields: list[bytes],
) -> str:
    """XADD `fields` to `target` and XDEL `entry_id` (whose fields are `source_fields`)
    from `source`, in one MULTI. If the XADD fails as it runs, the XDEL has run all the
    same: the entry is added back to `source` (under a new id) and the error raised.

    On a cluster, with `source` and `target` in two slots: the XADD, then the XDEL (a crash
    between them leaves the entry in both, never in neither)."""
    if not nodes.same_slot(source, target):
        new_id = await nodes.raw(target, "XADD", target, "*", *fields)
        await nodes.raw(source, "XDEL", source, entry_id)
        return text(new_id)
    new_id, _ = await nodes.transaction(
        source, ("XADD", target, "*", *fields), ("XDEL", source, entry_id)
    )
    if isinstance(new_id, ResponseError):
        await nodes.raw(source, "XADD", source, "*", *source_fields)
        raise new_id
    return text(new_id)
