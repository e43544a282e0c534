"""The latency scenario's producer: XADD at a fixed rate from a process of its own.

Entry `i` is due at `start + i / rate` (absolute deadlines: a late batch does not push the
later ones back). Each pass sends everything due by now in one pipelined write, stamped with
`created_at = time.time()` just before it goes out, then sleeps until the next entry is due.
Commands are packed by hiredis and written on one connection of redis-py's sync client.
"""

from __future__ import annotations

import time

import redis

from .payload import xadd_args
from .specs import ProduceResult, ProduceSpec
from .store import pack

MIN_SLEEP = 0.000_05


def produce(spec: ProduceSpec) -> ProduceResult:
    client = redis.Redis.from_url(spec.url, protocol=2)
    connection = client.connection_pool.get_connection()
    result = ProduceResult()
    try:
        sent = 0
        started = time.perf_counter()
        while sent < spec.entries:
            now = time.perf_counter()
            due = min(spec.entries, int((now - started) * spec.rate) + 1)
            if due > sent:
                result.max_late_ms = max(
                    result.max_late_ms, (now - started - sent / spec.rate) * 1000
                )
                stamp = time.time()
                packed = b"".join(
                    pack(xadd_args(spec.stream, seq, spec.size, stamp)) for seq in range(sent, due)
                )
                connection.send_packed_command([packed], check_health=False)  # type: ignore[no-untyped-call]
                for _ in range(sent, due):
                    connection.read_response()
                sent = due
            wait = started + sent / spec.rate - time.perf_counter()
            if wait > MIN_SLEEP:
                time.sleep(wait)
        result.sent = sent
        result.seconds = time.perf_counter() - started
    finally:
        client.connection_pool.release(connection)
        client.close()
    return result
