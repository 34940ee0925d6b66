"""Process managers' timers and the runners around them: a failing timer is parked and the saga
goes on, ``on_timeout`` keeps the process's correlation id, managers are registered once and by
name; relays are closed when they stop, wait out a log that does not acknowledge (and still stop
at once), and the inbox refuses records the relay did not publish."""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

import riverbed
from riverbed.eventsourcing import EventSourcing, EventSourcingError, Inbox, NotParkedError, Relay
from riverbed.eventsourcing.outbox import EVENT_ID, relay_name
from riverbed.eventsourcing.sagas import PARKED_DUE_MS, SagaRunner, timer_position
from riverbed.eventsourcing.subscriptions import CONFLICT_RETRIES
from riverbed.log.api import KeyValueHeaders, SendFuture
from tests.eventsourcing.shop import Fulfilment, Money, Order, Payment
from tests.support import published, read_topic, stopped, wait_until

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
TOPIC = "shop-events"


@pytest.fixture
def log(tmp_path: Path) -> Iterator[riverbed.Log]:
    with riverbed.connect(f"sqlite:///{tmp_path}/log.db") as opened:
        yield opened


def place(events: EventSourcing, customer: str) -> Order:
    order = Order.create(customer, f"{customer}@x", Money(Decimal("5"), "EUR"), NOW)
    events.save(order)
    return order


class Reminders(riverbed.ProcessManager):
    """For each order placed, a timer due at once, keyed by the customer, that cancels the
    order; the one of customer "bad" fails after cancelling (which must roll back)."""

    name = "reminders"

    def __init__(self) -> None:
        self.fired: list[str] = []
        self.failing = {"bad"}

    def handle(self, event: riverbed.Envelope, saga: riverbed.Saga) -> None:
        if isinstance(event.event, Order.Placed):  # type: ignore[attr-defined]
            saga.set_timer(event.event.customer, 0, {"order": event.stream})

    def on_timeout(self, key: str, data: dict[str, Any], saga: riverbed.Saga) -> None:
        self.fired.append(key)
        saga.command(Order, data["order"], lambda order: order.cancel("reminded"))
        if key in self.failing:
            raise RuntimeError("the reminder service is down")


# Timers


def test_a_manager_without_on_timeout_cannot_set_a_timer(events: EventSourcing) -> None:
    class Forgetful(riverbed.ProcessManager):
        name = "forgetful"

        def handle(self, event: riverbed.Envelope, saga: riverbed.Saga) -> None:
            saga.set_timer("reminder", 60)

    place(events, "ann")
    SagaRunner(events, Forgetful()).catch_up()
    (parked,) = events.store.parked("forgetful")
    assert parked.type == "Order.Placed"
    assert "Forgetful sets timer 'reminder' but has no on_timeout" in parked.error
    with events.store.transaction("saga:forgetful") as tx:
        assert tx.due_timers(2**62) == []


def test_a_failing_timer_is_parked_and_the_saga_goes_on(events: EventSourcing) -> None:
    manager = events.process_manager(Reminders())
    bad = place(events, "bad")
    stop = threading.Event()
    threads = events.run(stop)
    try:
        wait_until(lambda: bool(events.store.parked("reminders")), 30, "the timer to be parked")
        good = place(events, "good")
        wait_until(lambda: events.get(Order, good.id).status == "cancelled", 30, "the next timer")
        assert all(thread.is_alive() for thread in threads) and events.failures == []
    finally:
        stopped(stop, threads)
    assert events.get(Order, bad.id).status == "placed"  # its command rolled back
    assert manager.fired.count("bad") == 1  # parked, not tried again
    (parked,) = events.store.parked("reminders")
    assert (parked.type, parked.event_id) == ("timer", "timer:bad")
    assert parked.position == timer_position("bad") < 0
    assert "RuntimeError: the reminder service is down" in parked.error
    assert "Traceback" in parked.error
    with events.store.transaction("saga:reminders") as tx:
        (kept,) = tx.due_timers(2**62)  # kept for retry, never due
        assert (kept.key, kept.due_ms) == ("bad", PARKED_DUE_MS)


def test_a_failing_timer_stops_a_manager_that_stops_on_error(events: EventSourcing) -> None:
    class Strict(Reminders):
        name = "strict"
        on_error = "stop"

    manager = Strict()
    place(events, "bad")
    runner = SagaRunner(events, manager)
    runner.catch_up()
    assert runner.stopped_on is not None and runner.stopped_on.event_id == "timer:bad"
    runner.catch_up()
    assert manager.fired == ["bad"]
    assert events.store.parked("strict") == []
    # The timer stays: a restarted runner fires it again.
    SagaRunner(events, manager).catch_up()
    assert manager.fired == ["bad", "bad"]


def test_a_timer_that_conflicts_every_time_is_parked_and_the_saga_goes_on(
    events: EventSourcing, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Stale(Reminders):
        """Cancels from a copy of the order it loaded before a line was added."""

        name = "stale"

        def __init__(self) -> None:
            super().__init__()
            self.copies: dict[str, Order] = {}

        def on_timeout(self, key: str, data: dict[str, Any], saga: riverbed.Saga) -> None:
            if data["order"] not in self.copies:
                return super().on_timeout(key, data, saga)
            self.fired.append(key)
            order = copy.deepcopy(self.copies[data["order"]])
            order.cancel("reminded")
            saga.save(order)  # at version 1, the order at 2: a conflict every time

    monkeypatch.setattr("riverbed.eventsourcing.subscriptions.RETRY_S", 0)
    manager = Stale()
    ann = place(events, "ann")
    manager.copies[ann.id] = events.get(Order, ann.id)
    ann.add_line("socks")
    events.save(ann)
    runner = SagaRunner(events, manager)
    runner.catch_up()  # sets the timer
    runner.catch_up()  # fires it
    assert manager.fired == ["ann"] * CONFLICT_RETRIES
    (parked,) = events.store.parked("stale")
    assert (parked.type, parked.event_id) == ("timer", "timer:ann")
    assert "ConcurrencyError on every retry" in parked.error
    assert f"stream '{ann.id}' is at version 2, not the expected 1" in parked.error
    assert events.get(Order, ann.id).status == "placed"
    # The manager goes on with its events and timers.
    bob = place(events, "bob")
    runner.catch_up()
    runner.catch_up()
    assert events.get(Order, bob.id).status == "cancelled"
    assert [p.event_id for p in events.store.parked("stale")] == ["timer:ann"]


def test_on_timeout_runs_in_the_correlation_of_the_event_that_set_its_timer(
    events: EventSourcing,
) -> None:
    order = place(events, "ann")
    with events.store.transaction("saga:reminders") as tx:  # as timers were stored before
        tx.set_timer("legacy", 0, msgspec.msgpack.encode({"order": order.id}))
    SagaRunner(events, Reminders()).catch_up()
    placed = events.read()[0]
    cancelled = {
        e.metadata["causation_id"].split(":")[2]: e
        for e in events.read()
        if e.type == "Order.Cancelled"
    }
    assert cancelled["ann"].metadata["causation_id"].startswith("timer:reminders:ann:")
    assert cancelled["ann"].metadata["correlation_id"] == placed.metadata["correlation_id"]
    # A timer stored without a correlation id still fires, in a chain of its own.
    legacy = cancelled["legacy"].metadata
    assert legacy["correlation_id"] == legacy["causation_id"]


class Picky(riverbed.ProcessManager):
    """Cancels each order placed, keeping its customer's state; refuses some customers."""

    name = "picky"

    def __init__(self) -> None:
        self.refused = {"mallory"}

    def handle(self, event: riverbed.Envelope, saga: riverbed.Saga) -> None:
        if isinstance(event.event, Order.Placed):  # type: ignore[attr-defined]
            customer = event.event.customer
            if customer in self.refused:
                raise ValueError(f"{customer} is refused")
            saga.save_state(customer, {"order": event.stream})
            saga.command(Order, event.stream, lambda order: order.cancel("picky"))


def test_a_process_managers_parked_event_is_handled_again_once_fixed(
    events: EventSourcing,
) -> None:
    manager = events.process_manager(Picky())
    ann, mallory = place(events, "ann"), place(events, "mallory")
    runner = SagaRunner(events, manager)
    runner.catch_up()
    checkpoint = runner.checkpoint
    (parked,) = events.store.parked("picky")
    assert parked.position == 2

    again = events.retry_parked("picky", parked.position)
    assert again is not None and "ValueError: mallory is refused" in again.error
    assert events.store.parked("picky") == [again]
    assert events.get(Order, mallory.id).status == "placed"

    manager.refused.clear()
    assert events.retry_parked("picky", parked.position) is None
    assert events.store.parked("picky") == []
    assert events.get(Order, mallory.id).status == "cancelled"
    assert events.store.get_document("saga:picky", "mallory") == {"order": mallory.id}
    assert runner.checkpoint == checkpoint  # already past it
    runner.catch_up()  # the cancellation the retry appended is handled like any event
    assert [e.type for e in events.read()][-1] == "Order.Cancelled"
    assert events.get(Order, ann.id).status == "cancelled"
    with pytest.raises(EventSourcingError, match="'picky' has no event parked at position 2"):
        events.retry_parked("picky", parked.position)
    with pytest.raises(EventSourcingError, match="no projection or process manager named 'n'"):
        events.retry_parked("n", 1)


def test_two_retries_of_one_parked_event_handle_it_once(events: EventSourcing) -> None:
    class Slow(Picky):
        """Handles mallory's order slowly, once fixed: the second retry queues behind."""

        name = "slow"

        def __init__(self) -> None:
            super().__init__()
            self.handling, self.finish = threading.Event(), threading.Event()

        def handle(self, event: riverbed.Envelope, saga: riverbed.Saga) -> None:
            if not self.refused and event.event.customer == "mallory":
                self.handling.set()
                assert self.finish.wait(10)
            super().handle(event, saga)

    manager = events.process_manager(Slow())
    mallory = place(events, "mallory")
    SagaRunner(events, manager).catch_up()
    (parked,) = events.store.parked("slow")
    manager.refused.clear()
    results: list[object] = []

    def retry() -> None:
        try:
            results.append(events.retry_parked("slow", parked.position))
        except NotParkedError as error:
            results.append(error)

    first = threading.Thread(target=retry)
    first.start()
    assert manager.handling.wait(10)
    second = threading.Thread(target=retry)  # finds it parked, then waits for the first
    second.start()
    time.sleep(0.3)
    manager.finish.set()
    first.join(10)
    second.join(10)
    assert results[0] is None
    assert isinstance(results[1], NotParkedError)  # the first handled it
    assert "another retry handled it, or it was unparked" in str(results[1])
    assert [e.type for e in events.read()].count("Order.Cancelled") == 1
    assert events.get(Order, mallory.id).version == 2
    assert events.store.parked("slow") == []


def test_a_retry_that_an_unpark_overtook_is_not_reported_handled(events: EventSourcing) -> None:
    manager = events.process_manager(Picky())
    mallory = place(events, "mallory")
    runner = SagaRunner(events, manager)
    runner.catch_up()
    (parked,) = events.store.parked("picky")
    manager.refused.clear()
    results: list[object] = []

    def retry() -> None:
        try:
            results.append(events.retry_parked("picky", parked.position))
        except NotParkedError as error:
            results.append(error)

    with events.store.transaction(runner.name) as tx:  # the unpark, holding the manager's lock
        assert tx.unpark("picky", parked.position)
        retrying = threading.Thread(target=retry)  # finds it parked, then waits for the lock
        retrying.start()
        time.sleep(0.3)
    retrying.join(10)
    (error,) = results
    assert isinstance(error, NotParkedError)
    assert events.get(Order, mallory.id).version == 1  # not handled: the unpark forgot it


def test_a_projection_and_a_process_manager_may_not_share_a_name(events: EventSourcing) -> None:
    class Named(riverbed.Projection):
        name = "picky"

        def handle(self, event: riverbed.Envelope, tx: riverbed.eventsourcing.ReadModel) -> None:
            pass

    events.process_manager(Picky())
    with pytest.raises(EventSourcingError, match="a process manager named 'picky' is already"):
        events.projection(Named())
    with pytest.raises(TypeError, match="position='2': a parked event's position is an int"):
        events.retry_parked("picky", "2")  # type: ignore[arg-type]


def parked_reminder(events: EventSourcing) -> tuple[Reminders, SagaRunner, Order]:
    """The reminders manager, its runner, and customer "bad"'s order, whose timer is parked."""
    manager = events.process_manager(Reminders())
    order = place(events, "bad")
    runner = SagaRunner(events, manager)
    runner.catch_up()  # sets the timer
    runner.catch_up()  # fires it: parked
    return manager, runner, order


def test_a_parked_timer_fires_again_with_its_data_once_fixed(events: EventSourcing) -> None:
    manager, _, bad = parked_reminder(events)
    position = timer_position("bad")

    again = events.retry_parked("reminders", position)
    assert again is not None and "RuntimeError: the reminder service is down" in again.error
    assert events.store.parked("reminders") == [again]
    assert events.get(Order, bad.id).status == "placed"

    manager.failing.clear()
    assert events.retry_parked("reminders", position) is None
    assert manager.fired == ["bad", "bad", "bad"]
    assert events.get(Order, bad.id).status == "cancelled"
    assert events.store.parked("reminders") == []
    with events.store.transaction("saga:reminders") as tx:
        assert tx.due_timers(2**62) == []  # fired is deleted
    with pytest.raises(EventSourcingError, match="'reminders' has no event parked at position"):
        events.retry_parked("reminders", position)


def test_an_unparked_timer_is_forgotten_with_its_data(events: EventSourcing) -> None:
    manager, runner, _ = parked_reminder(events)
    position = timer_position("bad")
    assert [(p.position, p.type) for p in events.parked("reminders")] == [(position, "timer")]
    assert events.status("reminders").parked == 1

    assert events.unpark("reminders", position)
    assert events.parked("reminders") == []
    with events.store.transaction("saga:reminders") as tx:
        assert tx.due_timers(PARKED_DUE_MS) == []  # not kept for a retry that cannot come
    assert not events.unpark("reminders", position)
    manager.failing.clear()
    runner.catch_up()
    assert manager.fired == ["bad"]


def test_a_process_managers_status_and_unparked_event(events: EventSourcing) -> None:
    manager = events.process_manager(Picky())
    place(events, "ann")
    place(events, "mallory")
    SagaRunner(events, manager).run_once(limit=2)
    status = events.status("picky")
    assert (status.name, status.version, status.parked) == ("picky", None, 1)
    # ann's cancellation, appended by the manager, is stored but not handled yet.
    assert (status.checkpoint, status.head, status.lag) == (2, 3, 1)
    assert events.unpark("picky", 2)
    assert events.parked("picky") == [] and events.status("picky").parked == 0
    with pytest.raises(EventSourcingError, match="no projection or process manager named 'n'"):
        events.unpark("n", 2)


def test_a_parked_timer_set_again_is_not_fired_by_a_retry(events: EventSourcing) -> None:
    manager, _, _ = parked_reminder(events)
    with events.store.transaction("saga:reminders") as tx:
        tx.set_timer("bad", 2**40, b"\x80")  # as set_timer("bad", ...) in a later handler
    with pytest.raises(EventSourcingError, match="timer 'bad' of process manager 'reminders' was"):
        events.retry_parked("reminders", timer_position("bad"))
    assert manager.fired == ["bad"]


def test_process_managers_are_registered_once_and_by_name(tmp_path: Path) -> None:
    class Nameless(riverbed.ProcessManager):
        pass

    events = EventSourcing("shop", f"sqlite:///{tmp_path}/events.db")
    first = events.process_manager(Fulfilment())
    with pytest.raises(EventSourcingError, match="'fulfilment' is already registered"):
        events.process_manager(Fulfilment())
    with pytest.raises(EventSourcingError, match="Nameless needs a name"):
        events.process_manager(Nameless())
    assert events.process_managers == {"fulfilment": first}


# Relays


def producer_threads() -> int:
    return sum(thread.name == "riverbed-producer" for thread in threading.enumerate())


def test_a_run_closes_its_relays(events: EventSourcing, log: riverbed.Log) -> None:
    events.relay(TOPIC)
    before = producer_threads()
    stop = threading.Event()
    threads = events.run(stop, log)
    try:
        place(events, "ann")
        wait_until(lambda: published(log, TOPIC) == 1, 30, "the relay")
    finally:
        stopped(stop, threads)
    assert producer_threads() == before
    assert events.store.acquire_lease(relay_name(TOPIC), "another", 10_000)  # given up
    assert events.failures == []


def test_a_relay_waits_out_a_log_that_does_not_acknowledge_and_still_stops(
    events: EventSourcing, log: riverbed.Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    down = threading.Event()  # the log takes records but does not acknowledge them
    gone = threading.Event()  # set when the test ends: what a flush without timeout waits for
    timeouts: list[float | None] = []
    make_producer = log.producer

    def producer(*args: Any, **kwargs: Any) -> riverbed.Producer:
        made = make_producer(*args, **kwargs)
        flush = made.flush

        def unacknowledged(timeout: float | None = None) -> None:
            timeouts.append(timeout)
            if down.is_set():
                gone.wait(timeout)  # the time Kafka's delivery timeout takes without one
                raise TimeoutError("records not acknowledged (test)")
            flush(timeout)

        monkeypatch.setattr(made, "flush", unacknowledged)
        return made

    monkeypatch.setattr(log, "producer", producer)
    monkeypatch.setattr("riverbed.eventsourcing.outbox.FLUSH_TIMEOUT_S", 0.05)
    events.relay(TOPIC)
    checkpoint = relay_name(TOPIC)
    down.set()
    place(events, "ann")
    stop = threading.Event()
    threads = events.run(stop, log)
    try:
        wait_until(lambda: len(timeouts) >= 3, 30, "the relay to try the page again")
        assert events.store.checkpoint(checkpoint) == 0
        down.clear()
        wait_until(lambda: events.store.checkpoint(checkpoint) == 1, 30, "the log's return")
        down.set()
        place(events, "bob")
        tried = len(timeouts)
        wait_until(lambda: len(timeouts) > tried, 30, "the relay to try the next page")
    finally:
        try:
            stopped(stop, threads)
        finally:
            gone.set()
    assert events.failures == []
    assert all(timeout is not None and timeout <= 0.05 for timeout in timeouts)
    assert events.store.checkpoint(checkpoint) == 1
    # The retries waited for the page's records instead of queueing the page again behind them.
    copies = Counter(record.headers[EVENT_ID] for record in read_topic(log, TOPIC))
    (ann,) = events.store.read_all(0, 1)
    assert copies[ann.id.encode()] == 1


def test_a_relay_that_gets_its_lease_back_waits_for_its_queued_page(
    events: EventSourcing, log: riverbed.Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("riverbed.eventsourcing.outbox.FLUSH_TIMEOUT_S", 0.01)
    relay = Relay(events, log, TOPIC, lease_ttl=0.2)
    sent: list[bytes | None] = []
    send_batch = relay._ready().send_batch

    def counted(topic: str, records: Sequence[KeyValueHeaders]) -> list[SendFuture]:
        sent.extend(key for key, _, _ in records)
        return send_batch(topic, records)

    def unacknowledged(timeout: float | None = None) -> None:
        raise TimeoutError("records not acknowledged (test)")

    monkeypatch.setattr(relay._ready(), "send_batch", counted)
    flush = relay._ready().flush
    monkeypatch.setattr(relay._ready(), "flush", unacknowledged)
    place(events, "ann")
    try:
        with pytest.raises(TimeoutError):
            relay.run_once()
        time.sleep(0.3)  # its lease runs out; another relay takes it, then gives it up
        assert events.store.acquire_lease(relay.name, "another", 200)
        assert relay.run_once() == 0 and not relay.leading
        events.store.release_lease(relay.name, "another")
        with pytest.raises(TimeoutError):
            relay.run_once()
        assert len(sent) == 1  # the page went once, and is still queued
        monkeypatch.setattr(relay._ready(), "flush", flush)
        assert relay.run_once() == 1
    finally:
        relay.close()
    assert len(read_topic(log, TOPIC)) == 1


def test_a_relay_waiting_out_a_log_outage_keeps_its_lease(
    events: EventSourcing, log: riverbed.Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("riverbed.eventsourcing.outbox.FLUSH_TIMEOUT_S", 0.01)
    relay = Relay(events, log, TOPIC, lease_ttl=0.3)

    def unacknowledged(timeout: float | None = None) -> None:
        raise TimeoutError("records not acknowledged (test)")

    monkeypatch.setattr(relay._ready(), "flush", unacknowledged)
    place(events, "ann")
    stop = threading.Event()
    running = threading.Thread(target=relay.run, args=(stop,))
    running.start()
    try:
        time.sleep(2)  # several lease lengths of outage; the backoff alone would reach 5 s
        assert not events.store.acquire_lease(relay.name, "another", 300)
    finally:
        stop.set()
        running.join(10)
        monkeypatch.undo()
        relay.close()


def test_relays_starting_together_may_both_create_their_topic(
    events: EventSourcing, log: riverbed.Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    Relay(events, log, TOPIC).close()
    monkeypatch.setattr(log, "list_topics", list)  # as if the other created it meanwhile
    Relay(events, log, TOPIC).close()


class Refused(SendFuture):
    """The future of a record the log reports it failed to write."""

    __slots__ = ("_error",)

    def __init__(self, error: BaseException) -> None:
        self._callbacks = None
        self._error = error

    def _outcome(self) -> BaseException:
        return self._error

    def _force(self, timeout: float | None) -> None:
        pass

    def add_done_callback(self, callback: Callable[[SendFuture], None]) -> None:
        callback(self)


def test_a_page_with_a_record_the_log_failed_is_sent_again_before_it_is_checkpointed(
    events: EventSourcing, log: riverbed.Log, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = Relay(events, log, TOPIC)
    ann, bob = place(events, "ann"), place(events, "bob")
    send_batch = relay._ready().send_batch
    refused: list[bytes | None] = []

    def refuse_first(topic: str, records: Sequence[KeyValueHeaders]) -> list[SendFuture]:
        if refused:
            return send_batch(topic, records)
        refused.append(records[0][0])
        failed = Refused(RuntimeError("the broker refused the record (test)"))
        return [failed, *send_batch(topic, records[1:])]

    monkeypatch.setattr(relay._ready(), "send_batch", refuse_first)
    try:
        with pytest.raises(RuntimeError, match="refused the record"):
            relay.run_once()
        assert events.store.checkpoint(relay.name) == 0
        assert relay.run_once() == 2
    finally:
        relay.close()
    assert refused == [ann.id.encode()]
    copies = Counter(record.key for record in read_topic(log, TOPIC))
    assert copies == {ann.id.encode(): 1, bob.id.encode(): 2}
    assert events.store.checkpoint(relay.name) == 2


def test_the_inbox_refuses_a_record_the_relay_did_not_publish(
    events: EventSourcing, log: riverbed.Log
) -> None:
    log.create_topic("payments", partitions=1)
    with log.producer() as producer:
        producer.send("payments", b"{}", key=b"p1", headers={"source": b"bank"})
    (record,) = read_topic(log, "payments")
    handled: list[object] = []
    with pytest.raises(
        EventSourcingError, match=r"payments\[0\]@0 has no header riverbed-event-id"
    ):
        Inbox(events, "billing").handle(record, lambda event, tx: handled.append(event))
    assert handled == []


# Timers and failures in the manager's own transaction


class Expiring(riverbed.ProcessManager):
    """An order placed expires ``timeout`` seconds later, unless a line is added first."""

    name = "expiring"
    timeout = 0.0

    def __init__(self) -> None:
        self.expired: list[str] = []

    def handle(self, event: riverbed.Envelope, saga: riverbed.Saga) -> None:
        if isinstance(event.event, Order.Placed):  # type: ignore[attr-defined]
            saga.set_timer(event.stream, self.timeout, {"order": event.stream})
        elif isinstance(event.event, Order.LineAdded):  # type: ignore[attr-defined]
            saga.cancel_timer(event.stream)

    def on_timeout(self, key: str, data: dict[str, Any], saga: riverbed.Saga) -> None:
        self.expired.append(key)


def test_a_timer_fires_after_the_events_stored_before_it_fell_due(events: EventSourcing) -> None:
    manager = Expiring()
    manager.timeout = 0.3
    order = place(events, "ann")
    runner = SagaRunner(events, manager)
    runner.catch_up()  # sets the timer
    order.add_line("socks")  # in time
    events.save(order)
    time.sleep(0.4)  # the manager is late: the timer is due by the time it looks
    runner.catch_up()
    assert manager.expired == []  # the line came first, and cancelled it
    with events.store.transaction("saga:expiring") as tx:
        assert tx.due_timers(PARKED_DUE_MS) == []


class LongKeyed(Expiring):
    name = "long-keyed"

    def handle(self, event: riverbed.Envelope, saga: riverbed.Saga) -> None:
        if isinstance(event.event, Order.Placed):  # type: ignore[attr-defined]
            saga.set_timer("k" * 1000, 0, {"order": event.stream})  # the longest key there is

    def on_timeout(self, key: str, data: dict[str, Any], saga: riverbed.Saga) -> None:
        self.expired.append(key)
        saga.command(Order, data["order"], lambda o: o.cancel("late"))


def test_a_timer_with_the_longest_key_fires(events: EventSourcing) -> None:
    place(events, "ann")
    manager = events.process_manager(LongKeyed())
    runner = SagaRunner(events, manager)
    runner.catch_up()
    runner.run_once()
    assert manager.expired == ["k" * 1000]  # its cause id would have passed 1,000 bytes
    assert events.parked("long-keyed") == []
    cause = events.read()[-1].metadata["causation_id"]
    assert cause.startswith("timer:long-keyed:") and len(cause.encode()) <= 1000


def traced(method: Callable[..., Any]) -> Callable[..., Any]:
    """An ordinary decorator, as tracing adds: it hides an async method's nature."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return method(*args, **kwargs)

    return wrapper


def test_an_async_handler_behind_a_decorator_is_parked_not_skipped(events: EventSourcing) -> None:
    class Traced(riverbed.ProcessManager):
        name = "traced"

        @traced
        async def handle(self, event: riverbed.Envelope, saga: riverbed.Saga) -> None:
            saga.save_state(event.stream, {"seen": True})

    class TracedProjection(riverbed.Projection):
        name = "traced-totals"

        @traced
        async def handle(self, event: riverbed.Envelope, tx: Any) -> None:
            tx.put("seen", event.stream, {"seen": True})

    manager = events.process_manager(Traced())
    events.projection(TracedProjection())
    place(events, "ann")
    SagaRunner(events, manager).catch_up()
    events.projections.runner("traced-totals").catch_up()
    for name in ("traced", "traced-totals"):
        (parked,) = events.parked(name)  # not handled with nothing done
        assert "returned coroutine: it is async (behind a decorator?)" in parked.error


def test_a_failing_timer_is_fired_once_by_two_runners(events: EventSourcing) -> None:
    class Slow(Reminders):
        def handle(self, event: riverbed.Envelope, saga: riverbed.Saga) -> None:
            saga.set_timer(event.event.customer, 0.3, {"order": event.stream})

        def on_timeout(self, key: str, data: dict[str, Any], saga: riverbed.Saga) -> None:
            time.sleep(0.2)  # the other runner tries meanwhile
            super().on_timeout(key, data, saga)

    manager = Slow()
    place(events, "bad")
    SagaRunner(events, manager).catch_up()  # sets the timer
    time.sleep(0.3)
    runners = [SagaRunner(events, manager) for _ in range(2)]
    threads = [threading.Thread(target=runner.catch_up) for runner in runners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert manager.fired == ["bad"]  # parked by the runner that fired it, in its transaction
    assert [p.event_id for p in events.store.parked("reminders")] == ["timer:bad"]


def test_an_on_timeout_that_swallows_a_failed_statement_is_parked(events: EventSourcing) -> None:
    class Swallowing(Reminders):
        def on_timeout(self, key: str, data: dict[str, Any], saga: riverbed.Saga) -> None:
            self.fired.append(key)
            saga.command(Order, data["order"], lambda order: order.cancel("reminded"))
            with contextlib.suppress(Exception):  # as a careless handler would
                saga.tx.execute("SELECT 1/0")

    manager = events.process_manager(Swallowing())
    ann = place(events, "ann")
    runner = SagaRunner(events, manager)
    runner.catch_up()
    runner.catch_up()
    runner.catch_up()
    assert manager.fired == ["ann"]  # not fired again and again
    if "sqlite" in events.store.url:  # SQLite's transaction survives a failed statement
        assert events.get(Order, ann.id).status == "cancelled"
        assert events.parked("reminders") == []
    else:
        assert events.get(Order, ann.id).status == "placed"
        (parked,) = events.parked("reminders")
        assert "aborts the transaction on PostgreSQL all the same" in parked.error


class StrictReminders(Reminders):
    name = "strict"
    on_error = "stop"


def stopped_at_a_timer(events: EventSourcing) -> Reminders:
    """A manager of ``on_error = "stop"`` that stopped at the failing timer of customer "bad"."""
    manager = events.process_manager(StrictReminders())
    place(events, "bad")
    SagaRunner(events, manager).catch_up()
    assert events.status("strict").stopped_at == timer_position("bad")
    return manager


def test_a_manager_stopped_at_a_timer_says_so_until_it_restarts(events: EventSourcing) -> None:
    manager = stopped_at_a_timer(events)
    status = events.status("strict")
    assert status.stopped_error is not None
    assert "RuntimeError: the reminder service is down" in status.stopped_error
    manager.failing.clear()
    restarted = SagaRunner(events, manager)
    stop = threading.Event()
    thread = threading.Thread(target=restarted.run, args=(stop,))
    thread.start()
    try:
        wait_until(lambda: manager.fired == ["bad", "bad"], 30, "the timer to fire again")
        wait_until(lambda: events.status("strict").stopped_at is None, 30, "the status")
    finally:
        stop.set()
        thread.join(30)


def test_a_timer_another_runner_fires_ends_the_stop_at_it(events: EventSourcing) -> None:
    manager = stopped_at_a_timer(events)
    manager.failing.clear()
    SagaRunner(events, manager).run_once()  # another process's, running all along
    assert manager.fired == ["bad", "bad"]
    assert events.status("strict").stopped_at is None


def test_a_command_that_conflicts_every_time_in_a_backlog_is_parked_without_replaying_it(
    events: EventSourcing, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Duplicating(riverbed.ProcessManager):
        """Creates a payment per order, of an id taken for customer "dup"."""

        name = "duplicating"
        handled = 0

        def handle(self, event: riverbed.Envelope, saga: riverbed.Saga) -> None:
            type(self).handled += 1
            if isinstance(event.event, Order.Placed):  # type: ignore[attr-defined]
                customer = event.event.customer
                payment_id = "taken" if customer == "dup" else f"payment-{event.stream}"
                saga.save(Payment.create(event.stream, Decimal(1), id=payment_id))

    monkeypatch.setattr("riverbed.eventsourcing.subscriptions.RETRY_S", 0)
    events.save(Payment.create("o", Decimal(1), id="taken"))
    for customer in [f"c{i}" for i in range(30)] + ["dup"] + [f"d{i}" for i in range(5)]:
        place(events, customer)
    SagaRunner(events, events.process_manager(Duplicating())).catch_up()
    assert [p.type for p in events.parked("duplicating")] == ["Order.Placed"]
    # Three tries of the page, then each event once, and the conflicting one ten times: not
    # ten tries of the page for each event before it.
    assert Duplicating.handled < 3 * 37 + 37 + CONFLICT_RETRIES + 37


def test_timer_data_and_keys_that_would_not_read_back_are_refused_when_set(
    events: EventSourcing,
) -> None:
    attempts: list[tuple[str, Any]] = [
        ("k", {42: "x"}),
        ("k", [1, 2]),
        ("k", {"pair": (1, 2)}),
        ("k\x00", {}),
        ("k\ud800", {}),
        ("k" * 1001, {}),
    ]

    class Setting(Reminders):
        name = "setting"

        def handle(self, event: riverbed.Envelope, saga: riverbed.Saga) -> None:
            key, data = attempts[event.version - 1]
            saga.set_timer(key, 60, data)

    order = place(events, "ann")
    for _ in attempts[1:]:
        order.add_line("socks")
    events.save(order)
    SagaRunner(events, events.process_manager(Setting())).catch_up()
    errors = [p.error.partition("\n")[0] for p in events.parked("setting")]
    assert errors == [
        "TypeError: timer 'k': its data is a dict with str keys, got {42: 'x'}",
        "TypeError: timer 'k': its data is a dict with str keys, got [1, 2]",
        "TypeError: timer 'k': its data would come back changed ({'pair': [1, 2]}, not "
        "{'pair': (1, 2)}): give it values msgpack keeps as they are (str, int, float, bool, "
        "None, lists and dicts of them)",
        "ValueError: Saga.set_timer: a timer key is a non-empty str without NUL characters, "
        "got 'k\\x00'",
        "ValueError: Saga.set_timer: a timer key is text UTF-8 can encode, got 'k\\ud800' (a "
        "lone surrogate)",
        "ValueError: Saga.set_timer: a timer key is at most 1,000 bytes in UTF-8, got 1,001 "
        "('kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk'...)",
    ]


def test_a_timer_counts_from_its_events_time_however_late_the_manager_runs(
    events: EventSourcing,
) -> None:
    manager = Expiring()
    manager.timeout = 0.2
    order = place(events, "ann")
    time.sleep(0.4)
    order.add_line("socks")  # too late: the timeout fell due 0.2 s before
    events.save(order)
    SagaRunner(events, manager).catch_up()  # both events in one page, handled now
    assert manager.expired == [order.id]  # as a manager running live would have seen it


class Reserving(riverbed.ProcessManager):
    """Adds a line to each order placed, and expects its own line within ``timeout`` seconds."""

    name = "reserving"
    timeout = 0.3

    def handle(self, event: riverbed.Envelope, saga: riverbed.Saga) -> None:
        if isinstance(event.event, Order.Placed):  # type: ignore[attr-defined]
            saga.command(Order, event.stream, lambda order: order.add_line("reserved"))
            saga.set_timer(event.stream, self.timeout)
        elif isinstance(event.event, Order.LineAdded):  # type: ignore[attr-defined]
            saga.cancel_timer(event.stream)
            saga.save_state(event.stream, {"outcome": "reserved"})

    def on_timeout(self, key: str, data: dict[str, Any], saga: riverbed.Saga) -> None:
        saga.save_state(key, {"outcome": "timed out"})


def test_a_manager_running_late_meets_its_own_commands_as_a_live_one_would(
    events: EventSourcing,
) -> None:
    order = place(events, "ann")
    time.sleep(0.5)  # the manager is late: its timer is due by the time it runs
    SagaRunner(events, Reserving()).catch_up()
    placed, reserved = events.store.read_stream(order.id)
    assert reserved.timestamp_ms == placed.timestamp_ms  # stamped as of what it handled
    assert events.store.get_document("saga:reserving", order.id) == {"outcome": "reserved"}
    plain = place(events, "bob")  # no cause: its events correlate with the first
    assert events.read()[-1].correlation_id == events.store.read_stream(plain.id)[0].id


class Checkout(riverbed.ProcessManager):
    """Reminds (a command) after 0.2 s, expires after 0.4 s unless paid first."""

    name = "checkout"

    def handle(self, event: riverbed.Envelope, saga: riverbed.Saga) -> None:
        if isinstance(event.event, Order.Placed):  # type: ignore[attr-defined]
            saga.set_timer(f"remind:{event.stream}", 0.2, {"order": event.stream})
            saga.set_timer(f"expire:{event.stream}", 0.4, {"order": event.stream})
        elif isinstance(event.event, Order.Paid) and saga.state(event.stream) is None:  # type: ignore[attr-defined]
            saga.cancel_timer(f"expire:{event.stream}")
            saga.save_state(event.stream, {"outcome": "paid"})

    def on_timeout(self, key: str, data: dict[str, Any], saga: riverbed.Saga) -> None:
        if key.startswith("remind:"):
            saga.command(Order, data["order"], lambda order: order.add_line("reminded"))
        else:
            saga.save_state(data["order"], {"outcome": "expired"})


def test_a_late_payment_loses_to_the_timeout_past_the_managers_own_commands_too(
    events: EventSourcing,
) -> None:
    order = place(events, "ann")
    time.sleep(0.6)  # paid after it expired
    events.handle(Order, order.id, lambda o: o.pay())
    SagaRunner(events, Checkout()).catch_up()  # the reminder's line is stored after the payment
    assert events.store.get_document("saga:checkout", order.id) == {"outcome": "expired"}


def test_async_handlers_and_names_the_stores_cannot_take_are_refused_when_registered(
    events: EventSourcing,
) -> None:
    class Awaiting(riverbed.ProcessManager):
        name = "awaiting"

        async def handle(self, event: riverbed.Envelope, saga: riverbed.Saga) -> None:  # type: ignore[override]
            pass

    class AwaitingTimeouts(Expiring):
        name = "awaiting-timeouts"

        async def on_timeout(self, key: str, data: dict[str, Any], saga: riverbed.Saga) -> None:  # type: ignore[override]
            pass

    class AwaitingProjection(riverbed.Projection):
        name = "awaiting-projection"

        async def handle(
            self, event: riverbed.Envelope, tx: riverbed.eventsourcing.ReadModel
        ) -> None:  # type: ignore[override]
            pass

    for refused, method in [(Awaiting(), "handle"), (AwaitingTimeouts(), "on_timeout")]:
        with pytest.raises(EventSourcingError, match=f"{method} is async: riverbed runs it"):
            events.process_manager(refused)
    with pytest.raises(EventSourcingError, match=r"AwaitingProjection\.handle is async"):
        events.projection(AwaitingProjection())
    for name, refusal in [
        ("a\x00b", "without NUL"),
        ("m" * 201, "at most 200 bytes"),
        ("relay:orders", "names starting 'relay:' are relays'"),  # statuses would show two
    ]:
        manager = Expiring()
        manager.name = name
        with pytest.raises(ValueError, match=refusal):
            events.process_manager(manager)
    events.process_manager(Expiring())
    with pytest.raises(EventSourcingError, match="'expiring' is a process manager, not a proj"):
        events.projections.rebuild("expiring")


def test_timer_data_that_does_not_encode_is_named(events: EventSourcing) -> None:
    class Huge(Expiring):
        name = "huge"

        def handle(self, event: riverbed.Envelope, saga: riverbed.Saga) -> None:
            saga.set_timer("k", 1, {"n": 2**70})

    place(events, "ann")
    SagaRunner(events, events.process_manager(Huge())).catch_up()
    (parked,) = events.parked("huge")
    assert "TypeError: timer 'k': its data does not encode: " in parked.error


def test_a_page_of_slow_handling_ends_early_for_other_writers(events: EventSourcing) -> None:
    class Slow(riverbed.Projection):
        name = "slow"

        def handle(self, event: riverbed.Envelope, tx: riverbed.eventsourcing.ReadModel) -> None:
            time.sleep(0.12)

    for name in ("ann", "bob", "cy", "dan"):
        place(events, name)
    runner = events.projections.runner(events.projection(Slow()).name)
    assert runner.run_once() == 2  # 0.24 s: the page ends there, committing what it did
    assert runner.checkpoint == 2


def test_a_handler_that_raises_system_exit_fails_its_runner_loudly(
    events: EventSourcing,
) -> None:
    class Exiting(riverbed.Projection):
        name = "exiting"

        def handle(self, event: riverbed.Envelope, tx: riverbed.eventsourcing.ReadModel) -> None:
            raise SystemExit(3)

    events.projection(Exiting())
    place(events, "ann")
    stop = threading.Event()
    threads = events.run(stop)
    for thread in threads:
        thread.join(30)
    assert stop.is_set()  # the others were stopped too
    (failure,) = events.failures
    assert "the projection exiting failed: SystemExit(3)" in str(failure)


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise TypeError("no words")


def test_an_error_whose_message_cannot_be_made_is_parked(events: EventSourcing) -> None:
    class Mute(riverbed.Projection):
        name = "mute"

        def handle(self, event: riverbed.Envelope, tx: riverbed.eventsourcing.ReadModel) -> None:
            raise UnprintableError

    events.projection(Mute())
    place(events, "ann")
    events.projections.runner("mute").catch_up()
    (parked,) = events.projections.parked("mute")
    assert parked.error.startswith("UnprintableError: (its message could not be made: <")


def test_on_error_is_park_or_stop(events: EventSourcing) -> None:
    class Typo(riverbed.Projection):
        name = "typo"
        on_error = "Stop"  # type: ignore[assignment]

        def handle(self, event: riverbed.Envelope, tx: riverbed.eventsourcing.ReadModel) -> None:
            pass

    with pytest.raises(EventSourcingError, match=r"Typo.on_error = 'Stop': use 'park'"):
        events.projection(Typo())


def test_a_handler_that_ends_the_sqlite_transaction_is_parked_and_nothing_is_lost(
    tmp_path: Path,
) -> None:
    # On SQLite only: a PostgreSQL handler's failed statement aborts the transaction instead.
    events = EventSourcing("shop", f"sqlite:///{tmp_path}/events.db")

    class Ending(riverbed.Projection):
        name = "ending"

        def handle(self, event: riverbed.Envelope, tx: riverbed.eventsourcing.ReadModel) -> None:
            tx.put("seen", event.stream, {"seen": True})
            if event.event.customer == "bad":
                tx.execute("CREATE TABLE IF NOT EXISTS once (k TEXT PRIMARY KEY)")
                tx.execute("INSERT INTO once VALUES ('x')")
                with contextlib.suppress(Exception):
                    tx.execute("INSERT OR ROLLBACK INTO once VALUES ('x')")  # ends it
                tx.put("after", event.stream, {"written": True})  # would commit on its own

    events.projection(Ending())
    orders = [place(events, name) for name in ("ann", "bad", "cy")]
    events.projections.runner("ending").catch_up()
    (parked,) = events.projections.parked("ending")
    assert parked.position == 2
    assert "the handler ended the store's transaction" in parked.error
    seen = events.projections.all("ending", "seen")
    assert orders[0].id in seen and orders[2].id in seen  # applied, not lost with the page
    assert events.projections.status("ending").checkpoint == 3
    assert events.projections.all("ending", "after") == {}  # nothing after the end stands
    events.close()


ONE_STATEMENT = ("one statement at a time", "cannot insert multiple commands")  # SQLite, PG


@pytest.mark.parametrize(
    ("statement", "refusals"),
    [
        ("  rollback", ["tx.execute('rollback'): the statement would end"]),
        ("/* mine */ COMMIT", ["tx.execute('/* mine */ COMMIT'): the statement would end"]),
        ("-- done\rCOMMIT", ["tx.execute('-- done\\rCOMMIT'): the statement would end"]),
        ("/* SQLite's /* */ COMMIT /* */", ["the statement would end"]),  # comments not nested
        (";COMMIT", ["tx.execute(';COMMIT'): the statement would end"]),  # an empty one first
        ("; /* x */ ROLLBACK", ["the statement would end"]),
        (" ;;END", ["the statement would end"]),
        ("\ufeffCOMMIT", ["the statement would end"]),  # SQLite skips a byte order mark
        ("SELECT 1; COMMIT", ONE_STATEMENT),
        ("CREATE TABLE spans (begin int); COMMIT", ONE_STATEMENT),
        ("SELECT a$E'\\'; COMMIT; --'", [*ONE_STATEMENT, "no such column"]),  # a$E: a name
    ],
)
def test_statements_that_end_the_transaction_are_refused(
    events: EventSourcing, statement: str, refusals: list[str]
) -> None:
    class Committing(riverbed.Projection):
        name = "committing"

        def handle(self, event: riverbed.Envelope, tx: riverbed.eventsourcing.ReadModel) -> None:
            tx.put("seen", event.stream, {"seen": True})
            if event.event.customer == "bad":
                tx.execute("SELECT ';COMMIT' /* ; */ -- ;")  # quoted and commented: kept
                tx.execute(statement)

    events.projection(Committing())
    orders = [place(events, name) for name in ("ann", "bad", "cy")]
    events.projections.runner("committing").catch_up()
    (parked,) = events.projections.parked("committing")
    assert any(refusal in parked.error for refusal in refusals), parked.error
    assert set(events.projections.all("committing", "seen")) == {orders[0].id, orders[2].id}
    assert events.projections.status("committing").checkpoint == 3


def test_a_parked_event_handled_again_sets_its_timers_from_now(events: EventSourcing) -> None:
    class Refusing(Expiring):
        refused = True

        def handle(self, event: riverbed.Envelope, saga: riverbed.Saga) -> None:
            if self.refused:
                raise RuntimeError("not yet")
            super().handle(event, saga)

    manager = events.process_manager(Refusing())
    manager.timeout = 0.3
    order = place(events, "ann")
    runner = SagaRunner(events, manager)
    runner.catch_up()
    (parked,) = events.parked("expiring")
    time.sleep(0.4)  # the timeout would have fallen due, counted from the event's time
    manager.refused = False
    assert events.retry_parked("expiring", parked.position) is None
    runner.catch_up()
    assert manager.expired == []  # due 0.3 s after the retry, not at once
    time.sleep(0.4)
    runner.catch_up()
    assert manager.expired == [order.id]
