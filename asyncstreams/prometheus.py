"""Prometheus metrics of an app: `instrument(app)` (the `prometheus` extra).

    from asyncstreams.prometheus import instrument

    metrics = instrument(app)          # before the app runs
    ...
    body = await metrics.scrape()      # on the app's event loop: the text format

What each handler call came to is counted by a middleware in plain ints (the hot path takes
no lock); the running consumers' figures are read at scrape time; the group figures (lag,
pending, ...) are read from Redis at most once per `group_interval`, by one process among
all that run the app (see _group_figures.py). The README's Metrics section lists every
metric.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._group_figures import GroupWatch
from ._tally import Tallies
from .app import App
from .errors import ConfigurationError

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

EXTRA = 'pip install "asyncstreams[prometheus]"'
# The text exposition format that `exposition()` writes (prometheus_client's
# CONTENT_TYPE_LATEST): the Content-Type of a response that serves it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The metrics of one instrumented app: `registry` holds them, `exposition()` and
    `await scrape()` render them."""

    def __init__(
        self, app: App, registry: CollectorRegistry, tallies: Tallies, watch: GroupWatch
    ) -> None:
        self._app = app
        self._registry = registry
        self._tallies = tallies
        self._watch = watch

    @property
    def registry(self) -> CollectorRegistry:
        """The prometheus_client registry the app's collector is registered in."""
        return self._registry

    @property
    def group_interval(self) -> float:
        """Seconds between two reads of the group figures (lag, pending, ...)."""
        return self._watch.interval

    async def refresh(self) -> None:
        """Read the group figures from Redis if `group_interval` has passed since the last
        read and this process holds the group's metrics lock (else it reports none for that
        group). Run on the app's event loop; nothing when the app is not running."""
        await self._watch.refresh(self._app.consumers)

    def exposition(self) -> bytes:
        """The registry's metrics in Prometheus' text format (`CONTENT_TYPE`), with the
        group figures last read. Waits for no I/O: on the app's loop, it starts the next
        read of the group figures when due (for the next call; `scrape()` waits for it)."""
        from prometheus_client import generate_latest

        return generate_latest(self._registry)

    async def scrape(self) -> bytes:
        """`refresh()`, then `exposition()`: what an HTTP endpoint on the app's loop serves."""
        await self.refresh()
        return self.exposition()


def instrument(
    app: App, *, registry: CollectorRegistry | None = None, group_interval: float = 15.0
) -> Metrics:
    """Count what `app`'s handler calls come to (a middleware, added now) and register a
    collector of its metrics in `registry` (a new CollectorRegistry of its own by default;
    pass `prometheus_client.REGISTRY` to serve them with the process's other metrics).

    `group_interval`: seconds between two reads of the group figures. Raises
    ConfigurationError when prometheus_client is not installed, when the app runs already or
    is instrumented already, or for a `group_interval` that is not a number > 0.
    """
    if (
        isinstance(group_interval, bool)
        or not isinstance(group_interval, (int, float))
        or not 0 < group_interval < float("inf")
    ):
        raise ConfigurationError(
            f"instrument: group_interval must be a number of seconds > 0, got {group_interval!r}"
        )
    try:
        import prometheus_client
    except ImportError as exc:
        raise ConfigurationError(
            f"instrument: expected prometheus_client to be installed, found it missing ({exc});"
            f" install the extra: {EXTRA}"
        ) from None
    from ._collector import AppCollector

    if any(isinstance(middleware, Tallies) for middleware in app.middleware):
        raise ConfigurationError(
            "instrument: expected an app not yet instrumented, found its metrics middleware "
            "registered already; call instrument(app) once and keep the Metrics it returns"
        )
    tallies = Tallies()
    app.add_middleware(tallies)
    watch = GroupWatch(float(group_interval))
    if registry is None:
        registry = prometheus_client.CollectorRegistry()
    registry.register(AppCollector(app, tallies, watch))
    metrics = tallies.metrics = Metrics(app, registry, tallies, watch)
    return metrics


def metrics_of(app: App) -> Metrics | None:
    """The Metrics `instrument(app)` returned, or None if it was not called (what
    `asyncstreams run --http` serves). Found through the app's metrics middleware: a
    module-level map would keep every instrumented app alive (its Metrics holds the app)."""
    for middleware in app.middleware:
        if isinstance(middleware, Tallies) and isinstance(middleware.metrics, Metrics):
            return middleware.metrics
    return None
