"""`App.trim`: remove the entries of a stream that every group has read and acked, in one
script per stream (XTRIM MINID), and say what holds the rest back."""

from __future__ import annotations

import math
from dataclasses import dataclass

from redis.exceptions import ResponseError

from . import ops
from ._nodes import Nodes
from ._transport import text
from .errors import ConfigurationError, NotFoundError


@dataclass(frozen=True, slots=True)
class GroupHold:
    """What one group has not done with yet (each None when it has none).

    `oldest_pending` is its oldest pending id; `pending_floor` the first entry of the
    stream from that id on: the same entry, unless that one was deleted while pending
    (Redis keeps such ids pending), so that an old deleted id does not hold the whole
    stream back. `first_unread` is the first entry after its last-delivered id."""

    group: str
    oldest_pending: str | None
    pending_floor: str | None
    first_unread: str | None


@dataclass(frozen=True, slots=True)
class TrimResult:
    """What `App.trim` removed from a stream (with `dry_run`: would remove).

    `min_id` is the XTRIM MINID used (every entry below it removed), or None when every
    group has read and acked every entry, so all of them were (`held_back_by` None too).
    `held_back_by` is the group whose pending floor or first unread entry (see
    `GroupHold`) is `min_id` (`held_back_because`: "pending" or "unread"); None when
    `max_age` set `min_id`, and then `losing` names the groups that lose pending or unread
    entries.
    """

    stream: str
    removed: int
    remaining: int
    exact: bool  # False only for a dry run counting more than ops.COUNT_LIMIT on both sides
    min_id: str | None
    held_back_by: str | None
    held_back_because: str | None
    max_age_id: str | None  # with max_age: entries below this id were older
    losing: tuple[str, ...]
    groups: tuple[GroupHold, ...]
    dry_run: bool


# One script per stream: the groups' positions are read and the trim applied in one step,
# so no consumer can read or ack in between and no entry a group has not acked is removed.
# A group holds back the first entry from its oldest pending id on (that entry, unless it
# was deleted while pending: entries between do not exist) and the first entry after its
# last-delivered id (none there: it holds back nothing); MINID is the lowest of those over
# the groups. When no group holds anything back, every entry goes (MAXLEN 0).
# KEYS[1]: the stream. ARGV: "1" for a dry run (nothing removed, the removal counted), the
# max age in ms or "", the counting limit. Returns {"type", TYPE} for a key that is no
# stream, {"nogroups"}, or {"ok", removed, remaining, exact, MINID or "", cutoff id or "",
# the group holding it back or "", then per group: name, oldest pending id, pending floor,
# first unread id (each "" for none)}.
_TRIM = (
    ops.COUNTING_LUA
    + """
local key = KEYS[1]
local function less(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if am ~= bm then
    if #am ~= #bm then return #am < #bm end
    return am < bm
  end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
local kind = redis.call('TYPE', key)['ok']
if kind ~= 'stream' then
  return {'type', kind}
end
local groups = redis.call('XINFO', 'GROUPS', key)
if #groups == 0 then
  return {'nogroups'}
end
local holds = {}
local minid, held = nil, ''
for _, flat in ipairs(groups) do
  local g = {}
  for i = 1, #flat, 2 do
    g[flat[i]] = flat[i + 1]
  end
  local oldest, floor, unread = '', '', ''
  if g['pending'] > 0 then
    oldest = redis.call('XPENDING', key, g['name'], '-', '+', 1)[1][1]
    local from = redis.call('XRANGE', key, oldest, '+', 'COUNT', 1)
    if #from > 0 then
      floor = from[1][1]
    end
  end
  local after = redis.call('XRANGE', key, '(' .. g['last-delivered-id'], '+', 'COUNT', 1)
  if #after > 0 then
    unread = after[1][1]
  end
  for _, id in ipairs({floor, unread}) do
    if id ~= '' and (minid == nil or less(id, minid)) then
      minid, held = id, g['name']
    end
  end
  holds[#holds + 1] = g['name']
  holds[#holds + 1] = oldest
  holds[#holds + 1] = floor
  holds[#holds + 1] = unread
end
local cutoff = ''
if ARGV[2] ~= '' then
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[2])
  if ms > 0 then
    cutoff = string.format('%d-0', ms)
    if minid ~= nil and less(minid, cutoff) then
      minid, held = cutoff, ''
    end
  end
end
local length = redis.call('XLEN', key)
local removed, exact = length, 1
if ARGV[1] == '1' then
  if minid ~= nil then
    removed, exact = count_before(key, minid, tonumber(ARGV[3]))
  end
elseif minid == nil then
  removed = redis.call('XTRIM', key, 'MAXLEN', 0)
else
  removed = redis.call('XTRIM', key, 'MINID', minid)
end
local remaining = length - removed
if exact == 0 then
  remaining = tonumber(ARGV[3])
end
local reply = {'ok', removed, remaining, exact, minid or '', cutoff, held}
for _, value in ipairs(holds) do
  reply[#reply + 1] = value
end
return reply
"""
)


async def trim(
    nodes: Nodes, stream: str, *, max_age: float | None = None, dry_run: bool = False
) -> TrimResult:
    """See `App.trim`."""
    age_ms: int | str = ""
    if max_age is not None:
        if (
            isinstance(max_age, bool)
            or not isinstance(max_age, int | float)
            or not (0 < max_age < math.inf)
        ):
            raise ConfigurationError(f"trim: max_age must be seconds > 0, got {max_age!r}")
        age_ms = math.ceil(max_age * 1000)
    try:
        reply = await nodes.raw(
            stream, "EVAL", _TRIM, 1, stream, int(dry_run), age_ms, ops.COUNT_LIMIT
        )
    except ResponseError as exc:
        needs = "+eval +type +xinfo|groups +xpending +xrange +xlen +time +xtrim"
        raise ops.script_refused(nodes, exc, "trim", needs) from None
    outcome = text(reply[0])
    if outcome == "type":
        await ops.check_stream(nodes, stream)  # says what the key is, or that it is gone
        raise NotFoundError(f"key {stream!r} is not a stream")
    if outcome == "nogroups":
        raise NotFoundError(
            f"stream {stream!r} has no consumer groups, so nothing says which of its entries "
            "are done with; trim removes only entries every group has read and acked "
            "(XTRIM MAXLEN trims by count)"
        )
    removed, remaining, exact = int(reply[1]), int(reply[2]), bool(reply[3])
    min_id, cutoff, held = (text(value) or None for value in reply[4:7])
    flat = [text(value) or None for value in reply[7:]]
    holds = tuple(
        GroupHold(str(flat[i]), flat[i + 1], flat[i + 2], flat[i + 3])
        for i in range(0, len(flat), 4)
    )
    losing: tuple[str, ...] = ()
    if cutoff is not None and held is None and min_id is not None:
        limit = ops.id_key(min_id)
        losing = tuple(
            hold.group
            for hold in holds
            if any(
                i is not None and ops.id_key(i) < limit
                for i in (hold.pending_floor, hold.first_unread)
            )
        )
    because = None
    if held is not None:
        hold = next(h for h in holds if h.group == held)
        because = "pending" if hold.pending_floor == min_id else "unread"
    return TrimResult(
        stream=stream,
        removed=removed,
        remaining=remaining,
        exact=exact,
        min_id=min_id,
        held_back_by=held,
        held_back_because=because,
        max_age_id=cutoff,
        losing=losing,
        groups=holds,
        dry_run=dry_run,
    )
