"""The outbox relay publishes stored events to a log topic: keyed by stream, in order per key,
nothing lost when the relay is SIGKILLed, repeats only of its last unacknowledged batch, which an
inbox drops. Of several relays of one topic, the one holding the lease publishes; another takes
over from the checkpoint when it stops or its lease expires, and a leader that stalled past its
lease cannot move the checkpoint."""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

import riverbed
from riverbed.eventsourcing import EventSourcing, EventSourcingError, Inbox, Relay, stored_event
from riverbed.eventsourcing.errors import HandlerAbortedTransactionError
from riverbed.eventsourcing.outbox import EVENT_ID, LEASE_TTL_S, METADATA, relay_name
from riverbed.eventsourcing.records import NewEvent, StoredEvent, StreamAppend
from tests.eventsourcing.shop import Money, Order
from tests.support import Worker, read_topic, wait_until

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
PAGE = 200
TOPIC = "shop-events"


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


def versions_by_key(records: list[riverbed.Record]) -> dict[bytes, list[int]]:
    """The stream versions each key's records carry, in the order they were read."""
    by_key: dict[bytes, list[int]] = defaultdict(list)
    for record in records:
        assert record.key is not None
        by_key[record.key].append(stored_event(record).version)
    return dict(by_key)


def published_ids(log: riverbed.Log) -> list[bytes]:
    return [record.headers[EVENT_ID] for record in read_topic(log, TOPIC)]


def assert_each_published_once(log: riverbed.Log, events: int) -> None:
    ids = published_ids(log)
    assert len(ids) == len(set(ids)) == events


def test_the_relay_publishes_keyed_in_order_with_headers(
    events: EventSourcing, log: riverbed.Log
) -> None:
    fill(events, orders=5, lines=3)
    relay = Relay(events, log, "shop-events", partitions=3)
    assert relay.run_once() == 20
    assert relay.run_once() == 0
    records = read_topic(log, "shop-events")
    assert len(records) == 20
    assert versions_by_key(records)[b"order-0"] == [1, 2, 3, 4]
    first = stored_event(next(r for r in records if r.key == b"order-0"))
    assert (first.type, first.version, first.stream) == ("Order.Placed", 1, "order-0")
    stored = events.store.read_stream("order-0")[0]
    assert first == stored  # the stored event, metadata byte for byte; personal fields sealed
    assert b"c0@x" not in first.data
    # A consumer of the app decodes it with the store's keys.
    placed = events.decode(first)
    assert (placed.event.email, placed.position) == ("c0@x", stored.position)
    assert placed.metadata == events.read(stored.position - 1, 1)[0].metadata
    assert not any(METADATA in record.headers for record in records)  # no metadata of its own
    for header, value, wrong in (
        ("riverbed-stream-version", b"one", "'one', not a number"),
        ("riverbed-stream", b"\xff", "b'\\xff', not UTF-8 text"),
        ("riverbed-event-type", None, "None, not UTF-8 text"),
    ):
        record = records[0]
        altered = msgspec.structs.replace(record, headers={**record.headers, header: value})
        with pytest.raises(EventSourcingError, match=re.escape(
            f"record shop-events[{record.partition}]@{record.offset} has header {header} "
            f"{wrong}: the outbox relay did not publish it as it is"
        )):  # fmt: skip
            stored_event(altered)

    order = events.get(Order, "order-1")
    order.add_line("gift")
    events.save(order, metadata={"user": "ada"})
    assert relay.run_once() == 1
    added = [r for r in read_topic(log, "shop-events") if r.key == b"order-1"][-1]
    decoded = events.decode(stored_event(added))
    assert decoded.event.sku == "gift" and decoded.metadata["user"] == "ada"
    assert decoded.metadata == events.read(20, 1)[0].metadata  # with its correlation id
    events.store.delete_stream_key("order-0")
    assert events.decode(first).event.email == riverbed.eventsourcing.ERASED


def test_the_relay_holds_off_the_garbage_collector_while_it_publishes_a_page(
    events: EventSourcing, log: riverbed.Log
) -> None:
    """A page's records and futures are garbage only at its end: collections during it would
    walk them (and the whole heap) for nothing."""
    fill(events, orders=100, lines=9)
    collections: list[int] = []

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    relay = Relay(events, log, "shop-events")
    gc.callbacks.append(note)
    try:
        assert relay.run_once() == 1000
    finally:
        gc.callbacks.remove(note)
    assert len(collections) <= 1  # the one deferred to its end, where there were 7
    assert gc.isenabled()


def test_a_relayed_record_is_stamped_when_sent_and_carries_the_events_time(
    events: EventSourcing, log: riverbed.Log
) -> None:
    month_ago = time.time_ns() // 1_000_000 - 30 * 86_400_000  # a backlog relayed late
    placed = events.store.read_stream(fill(events, orders=1, lines=0)[0].id)[0]
    events.store.append([StreamAppend("late", 0, [NewEvent(
        "e-late", "late", 1, placed.type, placed.schema, placed.data, placed.metadata, month_ago,
    )])])  # fmt: skip
    sent_after = time.time_ns() // 1_000_000
    assert Relay(events, log, "stamped").run_once() == 2
    record = read_topic(log, "stamped")[-1]
    assert record.timestamp_ms >= sent_after  # what retention and timestamp limits go by
    assert stored_event(record).timestamp_ms == month_ago


def test_a_relay_to_a_compacted_topic_warns_that_it_keeps_only_last_events(
    events: EventSourcing, log: riverbed.Log, caplog: pytest.LogCaptureFixture
) -> None:
    log.create_topic("latest", compact=True)
    fill(events, orders=1, lines=1)
    with caplog.at_level(logging.WARNING, logger="riverbed.outbox"):
        assert Relay(events, log, "latest").run_once() == 2
    assert "the topic is compacted, so it keeps only each aggregate's last event" in caplog.text


def test_an_inbox_refuses_an_async_handler_and_handles_the_event_later(
    events: EventSourcing, log: riverbed.Log
) -> None:
    fill(events, orders=1, lines=0)
    Relay(events, log, "orders").run_once()
    (record,) = read_topic(log, "orders")
    inbox = Inbox(events, "mailer")

    async def send_mail(event: Any, tx: Any) -> None:
        pass

    with pytest.raises(TypeError, match="this one is async, so nothing of it ran"):
        inbox.handle(record, send_mail)
    handled: list[str] = []
    assert inbox.handle(record, lambda event, tx: handled.append(event.id))  # not seen before
    assert handled == [record.headers[EVENT_ID].decode()]


@pytest.mark.kafka
def test_the_relay_publishes_to_kafka_as_to_the_embedded_log(
    events: EventSourcing, kafka_url: str, topic_name: Callable[[str], str]
) -> None:
    fill(events, orders=4, lines=2)
    topic = topic_name("events")
    with riverbed.connect(kafka_url) as kafka:
        relay = Relay(events, kafka, topic, partitions=2)
        assert relay.run_once(limit=5) == 5  # the page size holds
        assert relay.run_once() == 7
        assert relay.run_once() == 0
        relay.close()
        records = read_topic(kafka, topic)
    assert len(records) == 12
    assert versions_by_key(records) == {f"order-{i}".encode(): [1, 2, 3] for i in range(4)}
    placed = events.decode(stored_event(next(r for r in records if r.key == b"order-3")))
    assert (placed.event.email, placed.version) == ("c3@x", 1)


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


# Leader and standby


@pytest.fixture
def relays(events: EventSourcing, log: riverbed.Log) -> Iterator[list[Relay]]:
    """Relays the test adds, closed when it ends (before the store and the log)."""
    made: list[Relay] = []
    yield made
    for relay in made:
        relay.close()


def leader_and_standby(
    events: EventSourcing,
    log: riverbed.Log,
    relays: list[Relay],
    leader_lease_ttl: float = LEASE_TTL_S,
) -> tuple[Relay, Relay]:
    """20 events stored, and two relays: the first leads and published the first 8 of them, the
    second stands by."""
    fill(events, orders=5, lines=3)
    leader = Relay(events, log, TOPIC, lease_ttl=leader_lease_ttl)
    standby = Relay(events, log, TOPIC)
    relays += [leader, standby]
    assert leader.run_once(limit=8) == 8
    assert standby.run_once(limit=8) == 0
    return leader, standby


def test_of_two_relays_of_a_topic_one_publishes_and_each_event_once(
    events: EventSourcing, log: riverbed.Log, relays: list[Relay]
) -> None:
    fill(events, orders=5, lines=3)  # 20 events
    first, second = Relay(events, log, TOPIC), Relay(events, log, TOPIC)
    relays += [first, second]
    rounds = [(first.run_once(limit=8), second.run_once(limit=8)) for _ in range(4)]
    assert rounds == [(8, 0), (8, 0), (4, 0), (0, 0)]
    assert first.leading and not second.leading
    assert_each_published_once(log, 20)


def test_a_standby_takes_over_from_the_checkpoint_when_the_leader_closes(
    events: EventSourcing, log: riverbed.Log, relays: list[Relay]
) -> None:
    leader, standby = leader_and_standby(events, log, relays)
    leader.close()
    assert standby.run_once(limit=100) == 12
    assert events.store.checkpoint(relay_name(TOPIC)) == 20
    assert_each_published_once(log, 20)


def test_a_standby_takes_over_when_the_leaders_lease_expires(
    events: EventSourcing, log: riverbed.Log, relays: list[Relay]
) -> None:
    leader, standby = leader_and_standby(events, log, relays, leader_lease_ttl=0.1)
    time.sleep(0.2)  # the leader renews no more, as if it had died
    assert standby.run_once(limit=100) == 12
    assert leader.run_once() == 0
    assert standby.leading and not leader.leading
    assert_each_published_once(log, 20)


def test_a_leader_that_stalled_past_its_lease_cannot_move_the_checkpoint(
    events: EventSourcing, log: riverbed.Log, relays: list[Relay],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    fill(events, orders=5, lines=3)
    stalled = Relay(events, log, TOPIC, lease_ttl=0.1)
    successor = Relay(events, log, TOPIC)
    relays += [stalled, successor]
    flush = stalled._ready().flush

    def stall_then_flush(timeout: float | None = None) -> None:
        time.sleep(0.2)  # the log is slow to acknowledge; the lease expires meanwhile
        assert successor.run_once(limit=100) == 20
        flush(timeout)

    monkeypatch.setattr(stalled._ready(), "flush", stall_then_flush)
    assert stalled.run_once(limit=8) == 0
    assert not stalled.leading
    assert events.store.checkpoint(relay_name(TOPIC)) == 20  # not moved back to 8
    ids = published_ids(log)
    assert len(ids) == 28 and len(set(ids)) == 20  # the stalled page, published twice


def test_running_relays_keep_one_leader_while_idle_and_hand_over_on_stop(
    events: EventSourcing, log: riverbed.Log, relays: list[Relay]
) -> None:
    orders = fill(events, orders=5, lines=3)
    leader = Relay(events, log, TOPIC, lease_ttl=0.45)
    standby = Relay(events, log, TOPIC, lease_ttl=0.45)
    relays += [leader, standby]
    stop_leader, stop_standby = threading.Event(), threading.Event()
    leading = threading.Thread(target=leader.run, args=(stop_leader,))
    # The standby tries often, the leader idles (1 s by default): only renewing keeps it leading.
    standing_by = threading.Thread(target=standby.run, args=(stop_standby, 0.05))
    leading.start()
    try:
        name = relay_name(TOPIC)
        wait_until(lambda: events.store.checkpoint(name) == 20, 30, "the leader")
        standing_by.start()
        time.sleep(0.6)  # idle for longer than the lease, which the leader renews
        assert leader.leading and not standby.leading
        stop_leader.set()
        leading.join(10)
        for order in orders:
            order.add_line("sku-late")
        events.save(*orders)
        wait_until(lambda: events.store.checkpoint(name) == 25, 30, "the standby")
        assert standby.leading
    finally:
        stop_leader.set()
        stop_standby.set()
        leading.join(10)
        if standing_by.is_alive():
            standing_by.join(10)
    assert_each_published_once(log, 25)


def test_an_apps_relay_runs_with_its_lease_ttl_and_refuses_a_bad_one(
    events: EventSourcing, log: riverbed.Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="lease_ttl=0"):
        events.relay(TOPIC, lease_ttl=0)
    with pytest.raises(ValueError, match="lease_ttl=-1"):
        Relay(events, log, TOPIC, lease_ttl=-1)
    for topic, partitions in (("bad topic!", 4), ("", 4), ("t" * 250, 4), ("__offsets", 4)):
        with pytest.raises(ValueError, match=r"invalid topic name|are Kafka's own"):
            events.relay(topic, partitions)
    for settings in ({"partitions": 0}, {"partitions": 2.5}, {"max_record_bytes": None}):
        with pytest.raises(ValueError, match=r"(partitions|max_record_bytes) is an int >= 1"):
            events.relay(TOPIC, **settings)  # type: ignore[arg-type]
    for ttl in (1e-6, float("inf"), 1e300):
        with pytest.raises(ValueError, match=r"give the lease's length in seconds, from 0\.01"):
            events.relay(TOPIC, lease_ttl=ttl)
    assert not events.relays  # nothing registered by the refused calls
    started: list[Relay] = []

    class RecordedRelay(Relay):
        def run(self, stop: threading.Event, idle_wait: float = 1.0) -> None:
            started.append(self)

    monkeypatch.setattr("riverbed.eventsourcing.runtime.Relay", RecordedRelay)
    events.relay(TOPIC, partitions=2, lease_ttl=2.5)
    for thread in events.run(threading.Event(), log):
        thread.join(10)
    assert [(r.topic, r.lease_ttl) for r in started] == [(TOPIC, 2.5)]
    started[0].run_once()  # the topic is made when the relay first reaches the log
    assert len(log.end_offsets(TOPIC)) == 2
    started[0].close()


def test_an_event_too_large_for_the_topic_stops_the_relay_after_what_came_before(
    events: EventSourcing, log: riverbed.Log
) -> None:
    order = Order.create("ada", "a@x", Money(Decimal("1"), "EUR"), NOW)
    order.add_line("x" * 2_000_000)  # 2 MB, over the topic's default 1 MiB
    order.add_line("socks")
    events.save(order)
    relay = Relay(events, log, TOPIC)
    with pytest.raises(EventSourcingError, match=(
        r"the event at position 2 is a record of 2,00\d,\d+ bytes, larger than the 1,048,576-byte "
        r"limit of topic 'shop-events': app.events.relay\(topic, max_record_bytes=N\)"
    )):  # fmt: skip
        relay.run_once()
    assert events.store.checkpoint(relay_name(TOPIC)) == 1  # what the log took is not sent again
    assert len(published_ids(log)) == 1
    relay.close()
    roomy = Relay(events, log, "roomy", max_record_bytes=4 * 2**20)
    assert roomy.run_once() == 3
    roomy.close()


def test_an_inbox_handler_that_caught_a_failed_statement_commits_nothing_silently(
    events: EventSourcing, log: riverbed.Log, store_url: str
) -> None:
    fill(events, orders=1, lines=0)
    Relay(events, log, "orders").run_once()
    (record,) = read_topic(log, "orders")
    inbox = Inbox(events, "tolerant")

    def tolerant(event: StoredEvent, tx: Any) -> None:
        tx.put("shipments", event.stream, {"status": "requested"})
        with contextlib.suppress(Exception):  # a "tolerated" failure of its own statement
            tx.execute("SELECT * FROM no_such_table")

    if store_url.startswith("postgresql"):  # the failed statement aborted the transaction
        with pytest.raises(HandlerAbortedTransactionError, match="nothing of it is committed"):
            inbox.handle(record, tolerant)
        assert events.store.get_document("shipments", "order-0") is None
        assert inbox.handle(record, lambda event, tx: None)  # not seen: it failed
    else:  # SQLite's transaction goes on after a failed statement
        assert inbox.handle(record, tolerant)
        assert events.store.get_document("shipments", "order-0") == {"status": "requested"}
        assert not inbox.handle(record, tolerant)


def test_what_an_inbox_handler_saves_is_caused_by_the_relayed_event(
    events: EventSourcing, log: riverbed.Log
) -> None:
    (order,) = fill(events, orders=1, lines=0)
    events.handle(Order, order.id, lambda o: o.add_line("sku"), command_id="command-42")
    Relay(events, log, "orders").run_once()
    line_added = read_topic(log, "orders")[-1]
    relayed = stored_event(line_added)

    def ship(event: StoredEvent, tx: Any) -> None:
        events.save(Order.create("shipping", "s@x", Money(Decimal(0), "EUR"), NOW, id="ship-1"))

    Inbox(events, "shipping").handle(line_added, ship)
    saved = events.read()[-1]
    assert (saved.stream, saved.metadata["causation_id"], saved.correlation_id) == (
        "ship-1",
        relayed.id,
        "command-42",
    )


@pytest.mark.parametrize(
    ("name", "refusal"),
    [("", "a non-empty str"), (42, "a non-empty str"), ("n" * 201, "at most 200 bytes")],
)
def test_an_inbox_name_the_stores_cannot_take_is_refused(
    events: EventSourcing, name: Any, refusal: str
) -> None:
    with pytest.raises(ValueError, match=rf"Inbox's name.*{refusal}"):
        Inbox(events, name)


def test_an_inbox_handler_that_ends_the_sqlite_transaction_is_an_error(tmp_path: Path) -> None:
    events = EventSourcing("shop", f"sqlite:///{tmp_path}/events.db")
    log = riverbed.connect(f"sqlite:///{tmp_path}/log.db")
    try:
        events.save(Order.create("ada", "a@x", Money(Decimal("1"), "EUR"), NOW))
        relay = Relay(events, log, TOPIC)
        relay.run_once()
        relay.close()
        (record,) = read_topic(log, TOPIC)
        inbox = Inbox(events, "ending")

        def ending(event: Any, tx: Any) -> None:
            tx.execute("CREATE TABLE IF NOT EXISTS once (k TEXT PRIMARY KEY)")
            tx.execute("INSERT INTO once VALUES ('x')")
            with contextlib.suppress(Exception):
                tx.execute("INSERT OR ROLLBACK INTO once VALUES ('x')")

        for _ in range(2):  # not seen: handled again, and refused again
            with pytest.raises(EventSourcingError, match="the handler ended the store's"):
                inbox.handle(record, ending)
    finally:
        events.close()
        log.close()


def test_a_relay_to_a_topic_of_other_partitions_says_the_topic_keeps_its_own(
    events: EventSourcing, log: riverbed.Log, caplog: pytest.LogCaptureFixture
) -> None:
    log.create_topic("narrow", partitions=1)
    log.create_topic("same", partitions=4)
    fill(events, orders=2, lines=0)
    with caplog.at_level(logging.WARNING, logger="riverbed.outbox"):
        assert Relay(events, log, "same").run_once() == 2
        assert caplog.text == ""
        assert Relay(events, log, "narrow").run_once() == 2
    assert (
        "relay to narrow: the topic exists with 1 partitions; the relay asks for 4, and the "
        "topic keeps its own"
    ) in caplog.text
    assert log.topic("narrow").partitions == 1
    assert {record.partition for record in read_topic(log, "narrow")} == {0}
