"""asyncstreams' pytest plugin, loaded by pytest through its `pytest11` entry point whenever
asyncstreams is installed (`-p no:asyncstreams` turns it off).

Two fixtures, plain (not async) so that they work under pytest-asyncio, anyio's plugin or
none:

- `asyncstreams_server` (session): this process's private redis-server, the one `TestApp`
  uses: started on first use, stopped when the process exits. Under pytest-xdist each
  worker is a process, so each has its own. Its own URL (`.url`, database 0) is never lent
  out.
- `asyncstreams_url` (function): the URL of a database of that server for the test alone,
  empty when the test starts. Give it to `App(url=...)`, a client, or `TestApp(app, url=...)`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._testserver import clean_database, shared_server
from .embedded import EmbeddedRedis


@pytest.fixture(scope="session")
def asyncstreams_server() -> EmbeddedRedis:
    """This process's private redis-server (shared with TestApp)."""
    return shared_server()


@pytest.fixture
def asyncstreams_url(asyncstreams_server: EmbeddedRedis) -> Iterator[str]:
    """A database of the test server for this test alone, empty at its start."""
    with clean_database() as url:
        yield url
