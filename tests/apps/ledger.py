"""The ledger the test apps keep: one JSON line per event, appended to a file.

A write of one line with O_APPEND is atomic, so the processes of one test may share a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def append(path: str, event: dict[str, object]) -> None:
    line = (json.dumps(event) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read(path: Path) -> list[dict[str, Any]]:
    """The events written so far; a line still being written (no newline yet) is left out."""
    if not path.exists():
        return []
    complete = path.read_text().split("\n")[:-1]
    return [json.loads(line) for line in complete if line]
