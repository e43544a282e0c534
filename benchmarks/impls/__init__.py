"""The implementations under test, each a module with the same small surface:

    consuming(spec, sink) -> async context manager: consume `spec.stream` as a consumer of
        `spec.group` while the block runs, calling `sink.record(task_id, created_at)` per
        entry (and awaiting `sink.delay` seconds when it is not 0); stop gracefully on exit.

    publish(spec) -> seconds: write `spec.entries` tasks with the method `spec.method`.

A module is imported only in the child process that runs it, so a consumer's peak RSS holds
its own imports and nobody else's.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

from ..ledger import Sink
from ..specs import ConsumeSpec, PublishSpec

Consuming = Callable[[ConsumeSpec, Sink], AbstractAsyncContextManager[None]]
Publish = Callable[[PublishSpec], Awaitable[float]]

MODULES = {
    "asyncstreams": "asyncstreams_impl",
    "baseline-inline": "baseline",
    "baseline-tasks": "baseline",
    "baseline-socket": "socket_impl",
    "faststream": "faststream_impl",
    "faststream-batch": "faststream_impl",
    "faststream-cluster": "faststream_impl",
    "asyncstreams-publish": "asyncstreams_impl",
    "asyncstreams-publish-many": "asyncstreams_impl",
    "redis-py-xadd": "baseline",
    "redis-py-pipeline": "baseline",
    "socket-pipeline": "socket_impl",
    "faststream-publish": "faststream_impl",
}


def consuming(impl: str) -> Consuming:
    module = importlib.import_module(f"{__name__}.{MODULES[impl]}")
    function: Consuming = module.consuming
    return function


def publisher(method: str) -> Publish:
    """`publish(spec) -> seconds` of the module that implements `method`."""
    module = importlib.import_module(f"{__name__}.{MODULES[method]}")
    function: Publish = module.publish
    return function
