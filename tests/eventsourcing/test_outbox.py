"""The outbox relay publishes stored events to a log topic: keyed by stream, in order per key,
nothing lost when the relay is SIGKILLed, repeats only of its last unacknowledged batch, which an
inbox drops."""

from __future__ import annotations

import signal
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

import riverbed
from riverbed.eventsourcing import EventSourcing, Inbox, Relay, stored_event
from riverbed.eventsourcing.outbox import relay_name
from tests.eventsourcing.shop import Money, Order
from tests.support import Worker, wait_until

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
PAGE = 200


@pytest.fixture
def events(store_url: str) -> Iterator[EventSourcing]:
    events = EventSourcing("shop", store_url)
    yield events
    events.close()


@pytest.fixture
def log(tmp_path: Path) -> Iterator[riverbed.Log]:
    with riverbed.connect(f"sqlite:///{tmp_path}/log.db") as opened:
        yield opened


def fill(events: EventSourcing, orders: int, lines: int) -> list[Order]:
    saved = []
    for i in range(orders):
        order = Order.create(f"c{i}", f"c{i}@x", Money(Decimal(i), "EUR"), NOW, id=f"order-{i}")
        events.save(order)
        saved.append(order)
    for n in range(lines):
        for order in saved:
            order.add_line(f"sku-{n}")
        events.save(*saved)
    return saved


def read_topic(log: riverbed.Log, topic: str) -> list[riverbed.Record]:
    total = sum(log.end_offsets(topic).values())
    records: list[riverbed.Record] = []
    with log.consumer(group=None, topics=[topic], from_beginning=True) as consumer:
        while len(records) < total:
            records.extend(consumer.poll(max_records=10_000, timeout=1.0))
    return records


def test_the_relay_publishes_keyed_in_order_with_headers(
    events: EventSourcing, log: riverbed.Log
) -> None:
    fill(events, orders=5, lines=3)
    relay = Relay(events, log, "shop-events", partitions=3)
    assert relay.run_once() == 20
    assert relay.run_once() == 0
    records = read_topic(log, "shop-events")
    assert len(records) == 20
    by_key: dict[bytes, list[int]] = defaultdict(list)
    for record in records:
        assert record.key is not None
        by_key[record.key].append(int(record.headers["riverbed-stream-version"]))
    assert by_key[b"order-0"] == [1, 2, 3, 4]
    first = stored_event(next(r for r in records if r.key == b"order-0"))
    assert (first.type, first.version, first.stream) == ("Order.Placed", 1, "order-0")
    stored = events.store.read_stream("order-0")[0]
    assert first.id == stored.id and first.data == stored.data  # personal fields stay sealed
    assert b"c0@x" not in first.data


def test_a_sigkilled_relay_loses_and_reorders_nothing(
    events: EventSourcing, log: riverbed.Log, store_url: str, tmp_path: Path,
    workers: list[Worker],
) -> None:  # fmt: skip
    fill(events, orders=40, lines=49)  # 2,000 events
    last = events.store.last_position()
    log_url = f"sqlite:///{tmp_path}/log.db"
    args = ("tests.eventsourcing.relay_worker", store_url, log_url, "orders", str(PAGE))
    relay = Worker(*args)
    workers.append(relay)
    relay.wait_for(lambda lines: len(lines) >= 3)
    relay.signal(signal.SIGKILL)
    relay.process.wait(10)
    restarted = Worker(*args)
    workers.append(restarted)
    wait_until(lambda: events.store.checkpoint(relay_name("orders")) == last, 60, "the relay")

    records = read_topic(log, "orders")
    ids = [record.headers["riverbed-event-id"] for record in records]
    assert len(set(ids)) == last, "an event was lost"
    assert len(ids) - last <= PAGE, "more than the unacknowledged batch was repeated"
    seen: dict[bytes, int] = {}
    for record in records:
        assert record.key is not None
        version = int(record.headers["riverbed-stream-version"])
        # In order per key; a repeat restarts at most from where the lost batch began.
        assert version <= seen.get(record.key, 0) + 1, (record.key, version)
        seen[record.key] = max(seen.get(record.key, 0), version)

    # An inbox on the consumer side handles each event once.
    inbox = Inbox(events, "billing")
    handled = [inbox.handle(record, lambda event, tx: None) for record in records]
    assert sum(handled) == last
