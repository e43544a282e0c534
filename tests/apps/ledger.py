"""The ledger the test apps keep: one JSON line per event, appended to a file.

A write of one line with O_APPEND is atomic, so the processes of one test may share a file.
"""

from __future__ import annotations

import json
import os


def append(path: str, event: dict[str, object]) -> None:
    line = (json.dumps(event) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
