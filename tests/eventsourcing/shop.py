"""A small shop domain for the event-sourcing tests: orders, payments and shipments, and the
process manager that runs an order through payment and shipping (compensating a failed payment).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

import msgspec

import riverbed


class Money(msgspec.Struct, frozen=True):
    amount: Decimal
    currency: str


class OrderShipped(riverbed.DomainEvent):
    event_type = "Order.Shipped"
    carrier: str

    def apply(self, order: Any) -> None:
        order.status = "shipped"
        order.carrier = self.carrier


class Order(riverbed.Aggregate):
    snapshot_every = 3
    customer: str
    email: str
    total: Money
    placed_at: datetime
    status: str
    lines: list[str]

    @riverbed.event("Placed")
    def __init__(
        self,
        customer: str,
        email: Annotated[str, riverbed.Personal],
        total: Money,
        placed_at: datetime,
    ) -> None:
        self.customer = customer
        self.email = email
        self.total = total
        self.placed_at = placed_at
        self.status = "placed"
        self.lines = []

    @riverbed.event("LineAdded")
    def add_line(self, sku: str) -> None:
        self.lines.append(sku)

    def pay(self) -> None:
        if self.status != "placed":
            raise ValueError(f"order {self.id} is {self.status}, it cannot be paid")
        self._paid()

    @riverbed.event("Paid")
    def _paid(self) -> None:
        self.status = "paid"

    @riverbed.event("Cancelled")
    def cancel(self, reason: str) -> None:
        self.status = "cancelled"

    def ship(self, carrier: str) -> None:
        self.trigger(OrderShipped(carrier=carrier))


class Payment(riverbed.Aggregate):
    order_id: str
    status: str

    @riverbed.event("Requested")
    def __init__(self, order_id: str, amount: Decimal) -> None:
        self.order_id = order_id
        self.status = "requested"

    @riverbed.event("Succeeded")
    def succeed(self) -> None:
        self.status = "succeeded"

    @riverbed.event("Failed")
    def fail(self, reason: str) -> None:
        self.status = "failed"


class Fulfilment(riverbed.ProcessManager):
    """Placed -> request a payment; payment succeeded -> mark paid and ship; payment failed ->
    cancel the order (the compensation); no payment answer within the timeout -> cancel."""

    name = "fulfilment"
    payment_timeout = 60.0

    def handle(self, event: riverbed.Envelope, saga: riverbed.Saga) -> None:
        match event.event:
            case Order.Placed(total=total):  # type: ignore[attr-defined]
                payment = Payment.create(event.stream, total.amount, id=f"payment-{event.stream}")
                saga.save(payment)
                saga.save_state(event.stream, {"step": "paying"})
                saga.set_timer(event.stream, self.payment_timeout, {"order": event.stream})
            case Payment.Succeeded():  # type: ignore[attr-defined]
                order_id = event.stream.removeprefix("payment-")
                saga.cancel_timer(order_id)
                saga.command(Order, order_id, lambda order: order.pay())
                saga.command(Order, order_id, lambda order: order.ship("ups"))
                saga.end(order_id)
            case Payment.Failed(reason=reason):  # type: ignore[attr-defined]
                order_id = event.stream.removeprefix("payment-")
                saga.cancel_timer(order_id)
                saga.command(
                    Order, order_id, lambda order: order.cancel(f"payment failed: {reason}")
                )
                saga.end(order_id)

    def on_timeout(self, key: str, data: dict[str, Any], saga: riverbed.Saga) -> None:
        saga.command(Order, data["order"], lambda order: order.cancel("no payment in time"))
        saga.end(key)


class OrderTotals(riverbed.Projection):
    """Per customer: orders placed and their total."""

    name = "order-totals"

    def handle(self, event: riverbed.Envelope, tx: riverbed.eventsourcing.ReadModel) -> None:
        if isinstance(event.event, Order.Placed):  # type: ignore[attr-defined]
            placed = event.event
            current = tx.get("customers", placed.customer) or {"orders": 0, "total": "0"}
            tx.put(
                "customers",
                placed.customer,
                {
                    "orders": current["orders"] + 1,
                    "total": str(Decimal(current["total"]) + placed.total.amount),
                },
            )
