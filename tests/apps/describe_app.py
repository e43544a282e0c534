"""A test app for `asyncstreams describe`: one consumer of each kind. It is only imported,
never run, so nothing here talks to Redis."""

from __future__ import annotations

import datetime

import msgspec

from asyncstreams import App, Message, Partitioned

__version__ = "2.3.0"


class Line(msgspec.Struct):
    sku: str
    quantity: int


class Order(msgspec.Struct):
    """An order as the shop publishes it."""

    order_id: str
    amount: float
    lines: list[Line] = []
    placed_at: datetime.datetime | None = None


PAYMENTS = Partitioned("payments", 4)

app = App()


@app.consumer("orders", group="billing", concurrency=8)
async def bill(order: Order, msg: Message) -> None:
    """A Struct payload and the envelope."""


@app.consumer("audit", group="audit-log", max_deliveries=None, dead_letter=None)
async def audit(fields: dict[str, str]) -> None:
    """The fields as text; no dead-letter stream."""


@app.consumer(["events", "{users}:signups"], group="raw", dead_letter="failed:{stream}")
async def record(msg: Message) -> None:
    """Only the envelope: any fields; a custom dead-letter stream."""


@app.consumer(PAYMENTS, group="ledger", batch_size=100)
async def settle(orders: list[Order], msgs: list[Message]) -> None:
    """A batch handler over every partition of a Partitioned stream."""


@app.consumer("orders", group="analytics", start_id="$")
async def count(order: Order) -> None:
    """A second group on the same stream."""
