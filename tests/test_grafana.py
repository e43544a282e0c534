"""examples/grafana-dashboard.json: every metric its PromQL queries name is one an
instrumented app exposes, and it shows what an operator looks at first."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from asyncstreams import App
from asyncstreams.prometheus import instrument

from .conftest import Names
from .helpers import ROOT, fill, wait_drained

DASHBOARD = ROOT / "examples" / "grafana-dashboard.json"
METRIC = re.compile(r"\basyncstreams_[a-zA-Z0-9_]+")


def queries(node: Any) -> Iterator[str]:
    """Every PromQL expression of the dashboard: panel targets' `expr` and the template
    variables' queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition", "query") and isinstance(value, str):
                yield value
            else:
                yield from queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from queries(item)


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def test_the_dashboard_shows_lag_throughput_latency_capacity_and_outages() -> None:
    exprs = [
        target["expr"] for panel in dashboard()["panels"] for target in panel.get("targets", [])
    ]
    joined = "\n".join(exprs)
    assert "asyncstreams_group_lag" in joined
    assert re.search(r"sum by \(outcome\) \(rate\(asyncstreams_processed_total", joined)
    assert re.search(
        r"histogram_quantile\(0\.99, sum by \(le\) \(rate\(asyncstreams_latency_seconds_bucket",
        joined,
    )
    assert "asyncstreams_consumer_in_flight" in joined
    assert "asyncstreams_consumer_room" in joined
    assert "asyncstreams_outages_total" in joined
    assert "asyncstreams_consumer_in_outage" in joined
    assert all(METRIC.search(expr) for expr in exprs), "a query that names no metric"


@pytest.mark.anyio
async def test_every_metric_the_dashboard_queries_is_exposed(
    redis_url: str, names: Names, client: aioredis.Redis
) -> None:
    app = App(redis_url)

    @app.consumer(names.stream, group=names.group)
    async def handle(fields: dict[str, str]) -> None:
        return None

    metrics = instrument(app, group_interval=0.05)
    await fill(client, names.stream, 5)
    async with app:
        await wait_drained(client, names.stream, names.group)
        exposition = (await metrics.scrape()).decode()
    exposed = set()
    for family in text_string_to_metric_families(exposition):
        exposed.add(family.name)
        exposed.update(sample.name for sample in family.samples)
    named = {name for query in queries(dashboard()) for name in METRIC.findall(query)}
    assert named, "no metric names found in the dashboard"
    assert sorted(named - exposed) == []
