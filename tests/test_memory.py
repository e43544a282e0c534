"""Memory under large entries: a consumer reads no more than fits in `max_memory_bytes`
(at the size of the entries it has seen), however large its batch_size. The consumer runs as
a real `asyncstreams run` process, whose peak resident memory Linux reports."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest
import redis

from .conftest import Names
from .helpers import CliProcess, app_env, own_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/<pid>/status"),
]


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def test_sixty_entries_of_5_mb_over_max_payload_bytes_stay_under_200_mb(
    names: Names, tmp_path: Path
) -> None:
    """60 entries of 5 MB, each over the 1 MB max_payload_bytes: all go to the dead-letter
    stream unread, and the consumer (defaults: concurrency 64, batch_size 500) peaks well
    below the 300 MB a read of all of them would take."""
    with own_server() as server:
        client = redis.Redis.from_url(server.url)
        blob = b"x" * (5 << 20)
        for n in range(60):
            client.xadd(names.stream, {"n": str(n), "blob": blob})
        env = app_env(
            streams=names.stream, group=names.group, ledger=tmp_path / "ledger.jsonl",
            concurrency=64, batch_size=500,
        )  # fmt: skip
        worker = CliProcess(
            ["run", "tests.apps.ledger_app:app", "--url", server.url],
            env=env,
            log_path=tmp_path / "worker.log",
        )
        try:
            deadline = time.monotonic() + 60
            while client.xlen(f"{names.stream}:dead-letter") < 60:
                assert worker.process.poll() is None, worker.output()
                assert time.monotonic() < deadline, "60 entries not dead-lettered in 60 s"
                time.sleep(0.1)
            peak = _peak_rss_mb(worker.pid)
            worker.signal(signal.SIGTERM)
            assert worker.wait() == 0, worker.output()
        finally:
            worker.stop()
            client.close()
    assert peak < 200, f"the consumer peaked at {peak:.0f} MB"
