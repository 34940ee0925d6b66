"""@app.handler on every backend: retries with backoff, dead letters, async, causal headers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

import riverbed
from riverbed.log.api import DEFAULT_SESSION_TIMEOUT_MS
from riverbed.streams.handlers import (
    ATTEMPTS_HEADER,
    CAUSATION_HEADER,
    CORRELATION_HEADER,
    Backoff,
)
from tests.support import consume, running, wait_until

FAST = riverbed.exponential(base=0.001, max=0.01)
DEFAULT_SESSION_S = DEFAULT_SESSION_TIMEOUT_MS / 1000


class Order(msgspec.Struct):
    id: int


def test_retries_then_dead_letter_in_order(log_url: str, topic_name: Callable[[str], str]) -> None:
    name = topic_name("orders")
    calls: list[int] = []
    with riverbed.App(topic_name("app"), url=log_url) as app:
        orders = app.topic(name, value=Order)

        @app.handler(orders, retries=2, backoff=FAST)
        def handle(order: Order) -> None:
            calls.append(order.id)
            if order.id == 1 and calls.count(1) < 3:
                raise ConnectionError("flaky downstream")  # succeeds on the third attempt
            if order.id == 2:
                raise ValueError(f"order {order.id} is invalid")  # never succeeds

        app.start()
        for i in range(4):
            orders.send(app.producer, Order(i)).result(timeout=30)
        with running(app):
            wait_until(lambda: calls[-1:] == [3], 60, "all orders handled")
            wait_until(lambda: sum(app.log.group_lag(app.name).values()) == 0, 60, "lag 0")
        with app.log.consumer(topics=[orders.dead_letter_topic], from_beginning=True) as dlq:
            (parked,) = consume(dlq, 1)
    assert calls == [0, 1, 1, 1, 2, 2, 2, 3]  # in order: each record's retries before the next
    assert b"ValueError: order 2 is invalid" in parked.headers["riverbed-error"]
    assert parked.headers[ATTEMPTS_HEADER] == b"3"


def test_a_tombstone_reaches_a_handler_whose_value_type_holds_none(
    log_url: str, topic_name: Callable[[str], str]
) -> None:
    seen: list[tuple[str, Order | None]] = []
    with riverbed.App(topic_name("app"), url=log_url) as app:
        profiles = app.topic(topic_name("profiles"), value=Order | None, key=str, compact=True)
        strict = app.topic(topic_name("strict"), value=Order, key=str, compact=True)

        @app.handler(profiles)
        def handle(key: str, order: Order | None) -> None:
            seen.append((key, order))

        @app.handler(strict)
        def handle_strict(key: str, order: Order) -> None:
            seen.append((key, order))

        app.start()
        profiles.send(app.producer, Order(1), key="ada").result(timeout=30)
        for name in (profiles.name, strict.name):
            app.producer.send(name, None, key=b"ada").result(timeout=30)  # a deletion
        with running(app):
            wait_until(lambda: len(seen) == 2, 60, "the record and the tombstone")
            wait_until(lambda: sum(app.log.group_lag(app.name).values()) == 0, 60, "lag 0")
        with app.log.consumer(topics=[strict.dead_letter_topic], from_beginning=True) as dlq:
            (parked,) = consume(dlq, 1)
    assert seen == [("ada", Order(1)), ("ada", None)]
    assert (
        b"declare the value as V | None to receive it as None" in parked.headers["riverbed-error"]
    )


def test_async_handler_and_causal_headers(log_url: str, topic_name: Callable[[str], str]) -> None:
    with riverbed.App(topic_name("app"), url=log_url) as app:
        orders = app.topic(topic_name("orders"), value=Order)
        shipments = app.topic(topic_name("shipments"), value=Order)

        @app.handler(orders)
        async def ship(key: bytes | None, order: Order) -> None:
            shipments.send(app.producer, Order(order.id * 10))

        app.start()
        first = orders.send(app.producer, Order(1)).result(timeout=30)
        orders.send(app.producer, Order(2), headers={CORRELATION_HEADER: b"checkout-42"}).result(
            timeout=30
        )
        with running(app):
            wait_until(lambda: sum(app.log.end_offsets(shipments.name).values()) == 2, 60, "out")
        with app.log.consumer(topics=[shipments.name], from_beginning=True) as consumer:
            out = {shipments.decode(r).value.id: r.headers for r in consume(consumer, 2)}
    input_id = f"{orders.name}/{first.partition}/{first.offset}".encode()
    assert out[10][CORRELATION_HEADER] == input_id  # the first record of a flow starts it
    assert out[10][CAUSATION_HEADER] == input_id
    assert out[20][CORRELATION_HEADER] == b"checkout-42"  # carried on through the flow


def test_backoff_grows_and_caps() -> None:
    backoff = Backoff(base=0.1, max=1.0, jitter=False)
    assert [backoff.delay(n) for n in range(1, 6)] == [0.1, 0.2, 0.4, 0.8, 1.0]
    jittered = riverbed.exponential(base=0.1, max=1.0)
    assert all(0.05 <= jittered.delay(2) <= 0.2 for _ in range(100))


def test_retry_topics_do_not_hold_up_the_records_behind(
    log_url: str, topic_name: Callable[[str], str]
) -> None:
    calls: list[tuple[int, float]] = []
    with riverbed.App(topic_name("app"), url=log_url) as app:
        orders = app.topic(topic_name("orders"), value=Order)

        @app.handler(orders, retries=1, backoff=FAST, retry_delays=(0.5, 1.0))
        def handle(order: Order) -> None:
            calls.append((order.id, time.monotonic()))
            if order.id == 1 and len([c for c in calls if c[0] == 1]) < 5:
                raise ConnectionError("down for a while")  # succeeds in the second retry topic
            if order.id == 2:
                raise ValueError("never valid")

        app.start()
        for i in range(4):
            orders.send(app.producer, Order(i)).result(timeout=30)
        with running(app):
            wait_until(lambda: len([c for c in calls if c[0] == 2]) == 6, 60, "order 2 given up")
            wait_until(lambda: len([c for c in calls if c[0] == 1]) == 5, 60, "order 1 done")
        with app.log.consumer(topics=[orders.dead_letter_topic], from_beginning=True) as dlq:
            (parked,) = consume(dlq, 1)
    ids = [order_id for order_id, _ in calls]
    # Order 3 ran before order 1's retries from the retry topics: it was not held up.
    assert ids.index(3) < [i for i, order_id in enumerate(ids) if order_id == 1][2]
    first = [t for order_id, t in calls if order_id == 1]
    assert first[2] - first[1] >= 0.45  # the first retry topic's delay
    assert first[4] - first[3] >= 0.95  # the second's
    assert parked.headers[ATTEMPTS_HEADER] == b"6"  # 2 attempts in place, at each of 3 levels
    assert b"ValueError: never valid" in parked.headers["riverbed-error"]


def test_a_blocking_handler_does_not_cost_the_group_its_member(
    log_url: str, topic_name: Callable[[str], str]
) -> None:
    """A handler that blocks longer than the session timeout: heartbeats go on in the
    background, so the member keeps its partitions and the record is handled once."""
    calls: list[int] = []
    with riverbed.App(topic_name("app"), url=log_url) as app:
        orders = app.topic(topic_name("orders"), value=Order)

        @app.handler(orders)
        def slow(order: Order) -> None:
            calls.append(order.id)
            if order.id == 0:
                time.sleep(DEFAULT_SESSION_S + 2)

        app.start()
        for i in range(3):
            orders.send(app.producer, Order(i)).result(timeout=30)
        with running(app):
            wait_until(lambda: calls[-1:] == [2], 60, "all orders handled")
            group = app.log.describe_group(app.name)
    assert calls == [0, 1, 2]  # handled once each: no rebalance redelivered order 0
    assert len(group.members) == 1


BILLING_APP = textwrap.dedent(
    """
    import os, signal, sys
    import msgspec
    import riverbed

    class Order(msgspec.Struct):
        id: int

    app = riverbed.App("billing", sys.argv[1])
    orders = app.topic("orders", value=Order)
    invoices = app.topic("invoices", value=Order)

    @app.handler(orders)
    def bill(order: Order) -> None:
        invoices.send(app.producer, order)

    if __name__ == "__main__":
        with app.runner() as runner:
            while not runner.run_once(1.0):
                pass
            os.kill(os.getpid(), signal.SIGKILL)  # right after the batch committed
    """
)


def test_what_a_handler_sent_is_written_before_its_input_is_committed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/log.db"
    (tmp_path / "billing.py").write_text(BILLING_APP)
    with riverbed.App("shop", url) as shop:
        orders = shop.topic("orders", value=Order)  # as the billing app declares it
        shop.start()
        for i in range(3):
            orders.send(shop.producer, Order(i))
        shop.producer.flush()
    command = [sys.executable, str(tmp_path / "billing.py"), url]
    crashed = subprocess.run(command, check=False, timeout=120)
    assert crashed.returncode == -9
    with riverbed.connect(url) as log:
        assert sum(log.group_lag("billing").values()) == 0  # the orders were committed
        with log.consumer(topics=["invoices"], from_beginning=True) as consumer:
            assert len(consume(consumer, 3)) == 3  # and their invoices written
