"""The worker's runners (projections, process managers, relays) through outages and failures:
they wait out a store or log they cannot reach, and one that fails otherwise stops the worker
with its error instead of ending its thread unseen."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import riverbed
from riverbed.eventsourcing import (
    EventSourcing,
    EventSourcingError,
    RunnerFailedError,
    StoreUnavailableError,
)
from riverbed.eventsourcing.claims import claim
from riverbed.log.api import Record
from tests.eventsourcing.shop import Fulfilment, Money, Order, OrderTotals
from tests.services import unavailable
from tests.services.postgres import postgres_missing, start_postgres, terminate_connections
from tests.support import published, stopped, wait_until

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
TOPIC = "shop-events"


def place(events: EventSourcing, customer: str) -> int:
    return events.save(Order.create(customer, f"{customer}@x", Money(Decimal("2"), "EUR"), NOW))


def failing_first(calls: int, method: Callable[..., Any]) -> Callable[..., Any]:
    """``method``, raising StoreUnavailableError on its first ``calls`` calls (from any thread)."""
    left = [calls]
    lock = threading.Lock()

    def call(*args: Any, **kwargs: Any) -> Any:
        with lock:
            left[0] -= 1
            if left[0] >= 0:
                raise StoreUnavailableError("cannot reach the event store (test)")
        return method(*args, **kwargs)

    return call


@pytest.mark.parametrize("when", ["running", "starting"])
def test_runners_wait_out_a_store_and_a_log_they_cannot_reach(
    events: EventSourcing, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    log = riverbed.connect(f"sqlite:///{tmp_path}/log.db")
    events.projection(OrderTotals())
    events.relay(TOPIC)
    place(events, "ada")
    store = events.store
    connect: Callable[[], riverbed.Log] = lambda: log  # noqa: E731
    if when == "running":
        # The projection's and the relay's reads fail 6 times between them.
        monkeypatch.setattr(store, "read_all", failing_first(6, store.read_all))
    else:
        # The store is out as the workers claim their names, the log a while longer.
        monkeypatch.setattr(store, "get_document", failing_first(2, store.get_document))
        connect = failing_first(3, connect)
    stop = threading.Event()
    threads = events.run(stop, log=connect)
    try:
        position = place(events, "bob")
        assert events.projections.get("order-totals", "customers", "bob", wait_for=position) == {
            "orders": 1, "total": "2",
        }  # fmt: skip
        wait_until(lambda: published(log, TOPIC) == 2, 30, "the relay")
        assert all(thread.is_alive() for thread in threads) and events.failures == []
    finally:
        stopped(stop, threads)
        log.close()


def test_a_projection_goes_on_after_postgresql_drops_its_connections(
    postgres_url: str,
) -> None:
    name = f"dropped_{uuid.uuid4().hex[:8]}"
    events = EventSourcing("shop", f"{postgres_url}?schema={name}&application_name={name}")
    events.projection(OrderTotals())
    stop = threading.Event()
    threads = events.run(stop)
    try:
        events.projections.wait_for("order-totals", place(events, "ada"))
        # The runner's connection and the listener's, at least.
        assert terminate_connections(postgres_url, name) >= 2
        # The first call after the drop may fail; the store replaces its connections.
        position = 0
        for _ in range(3):
            try:
                position = place(events, "bob")
                break
            except StoreUnavailableError:
                pass
        assert events.projections.get("order-totals", "customers", "bob", wait_for=position) == {
            "orders": 1, "total": "2",
        }  # fmt: skip
        assert all(thread.is_alive() for thread in threads) and events.failures == []
    finally:
        stopped(stop, threads)
        events.close()


def test_a_runner_that_fails_stops_the_others_and_the_app_raises_its_error(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = riverbed.App("shop", url=f"sqlite:///{tmp_path}/log.db", events_url=store_url)
    app.events.projection(OrderTotals())
    app.events.relay(TOPIC)
    store = app.events.store

    def broken(name: str) -> int:
        raise RuntimeError("the checkpoint table is gone")

    monkeypatch.setattr(store, "checkpoint", broken)
    stop = threading.Event()
    try:
        with pytest.raises(RunnerFailedError, match="failed: RuntimeError") as raised:
            app.run(stop)  # returns once a runner failed, without waiting for a signal
        assert isinstance(raised.value.__cause__, RuntimeError)
        assert stop.is_set()
    finally:
        app.close()


def test_two_apps_cannot_run_runners_of_one_name_in_one_store(
    store_url: str, tmp_path: Path
) -> None:
    log = riverbed.connect(f"sqlite:///{tmp_path}/log.db")
    shop, billing, shop_again = (
        EventSourcing(app, store_url) for app in ("shop", "billing", "shop")
    )
    for events in (shop, billing, shop_again):
        events.projection(OrderTotals())
        events.relay(TOPIC)
    stop = threading.Event()
    threads = shop.run(stop, log=log)
    try:
        with pytest.raises(EventSourcingError, match=(
            r"app 'shop' runs the projection order-totals in this event store, so app 'billing' "
            r"cannot run the projection order-totals too"
        )):  # fmt: skip
            billing.run(stop, log=log)
        billing.projections.registered.clear()
        with pytest.raises(EventSourcingError, match="app 'shop' runs the relay to shop-events"):
            billing.run(stop, log=log)
        threads += shop_again.run(stop, log=log)  # another process of the same app
        position = place(shop, "ada")
        shop_again.projections.wait_for("order-totals", position)
        stopped(stop, threads)
        assert billing.take_over_names("shop") == 2  # shop was renamed billing
        stop = threading.Event()
        threads = billing.run(stop, log=log)
        with pytest.raises(EventSourcingError, match="app 'billing' runs the projection"):
            shop.run(stop, log=log)
    finally:
        stopped(stop, threads)
        for events in (shop, billing, shop_again):
            events.close()
        log.close()


def test_another_apps_names_are_refused_before_their_state_is_touched(store_url: str) -> None:
    shop, billing = (EventSourcing(app, store_url) for app in ("shop", "billing"))
    try:
        shop.process_manager(Fulfilment())
        shop.projection(OrderTotals())
        place(shop, "ada")
        shop.projections.runner("order-totals").catch_up()
        claim(shop.store, "shop", ["process manager fulfilment", "projection order-totals"])
        claim(shop.store, "shop", ["inbox mailer"])  # as its first handle() does

        class Named(OrderTotals):
            name = "fulfilment"

        billing.projection(Named())  # a projection of the manager's name, in another app
        billing.projection(OrderTotals())
        refused = "app 'shop' runs the {} in this event store, so app 'billing' cannot run"
        mailer = riverbed.Inbox(billing, "mailer")  # made without the store: refused in use
        record = Record("shop-events", 0, 0, 0, b"order", b"{}")
        with pytest.raises(EventSourcingError, match=refused.format("inbox mailer")):
            mailer.handle(record, lambda event, tx: None)  # it would drop shop's events as seen
        for call, what in (
            (lambda: billing.projections.rebuild("order-totals"), "projection order-totals"),
            (lambda: billing.retry_parked("order-totals", 1), "projection order-totals"),
            (lambda: billing.unpark("fulfilment", 1), "process manager fulfilment"),
            (lambda: billing.projections.unpark("order-totals", 1), "projection order-totals"),
        ):
            with pytest.raises(EventSourcingError, match=refused.format(what)):
                call()
        assert shop.projections.active_version("order-totals") == 1
        assert shop.projections.get("order-totals", "customers", "ada") is not None
    finally:
        shop.close()
        billing.close()


def test_an_outage_inside_a_handler_is_waited_out_not_parked(events: EventSourcing) -> None:
    outages = [StoreUnavailableError("cannot reach the event store (test)")] * 2

    class Reading(OrderTotals):
        name = "reading"  # reads the store in its handler, which may be down for a moment

        def handle(self, event: riverbed.Envelope, tx: Any) -> None:
            if outages:
                raise outages.pop()
            super().handle(event, tx)

    events.projection(Reading())
    stop = threading.Event()
    threads = events.run(stop)
    try:
        position = place(events, "ada")
        assert events.projections.get("reading", "customers", "ada", wait_for=position) == {
            "orders": 1, "total": "2",
        }  # fmt: skip
        assert events.projections.parked("reading") == [] and events.failures == []
    finally:
        stopped(stop, threads)


def test_the_postgresql_store_works_again_soon_after_a_long_outage(tmp_path: Path) -> None:
    reason = postgres_missing()
    if reason is not None:
        unavailable("PostgreSQL", reason)
    server = start_postgres(tmp_path)
    # Its calls fail fast; its one connection, being replaced, is not one in use by a call.
    failing = EventSourcing("shop", f"{server.url}?pool_timeout=1&pool_size=1")
    waiting = EventSourcing("shop", server.url)  # its calls wait up to 30 s for a connection
    done: list[float] = []

    def wait_for_the_server() -> None:
        while True:  # as a runner does: a call that failed is tried again
            try:
                place(waiting, "eve")
                done.append(time.monotonic())
                return
            except StoreUnavailableError:
                time.sleep(0.1)

    waiter = threading.Thread(target=wait_for_the_server)
    try:
        place(failing, "ada")
        place(waiting, "bob")
        server.halt()
        outage_ends = time.monotonic() + 8  # the pool's pauses between tries would reach 8 s
        while time.monotonic() < outage_ends:
            with pytest.raises(StoreUnavailableError) as raised:
                place(failing, "cy")
            assert "cannot reach the event store" in str(raised.value)
            time.sleep(0.2)
            if waiter.ident is None and outage_ends - time.monotonic() < 3:
                waiter.start()  # a call that waits for the server's return
        server.resume()
        back = time.monotonic()
        while True:
            try:
                place(failing, "dan")
                break
            except StoreUnavailableError:
                time.sleep(0.1)
        assert time.monotonic() - back < 4
        waiter.join(30)
        assert done and done[0] - back < 8  # not the rest of its call's 30 s
        assert len(failing.read()) == 4
    finally:
        failing.close()
        waiting.close()
        server.stop()


def test_a_forked_child_connects_anew(events: EventSourcing) -> None:
    ada = Order.create("ada", "ada@x", Money(Decimal("2"), "EUR"), NOW)
    events.save(ada)  # the parent's connections are open

    def add_lines() -> None:
        for _ in range(20):
            events.handle(Order, ada.id, lambda order: order.add_line("socks"))
        events.close()

    children = [multiprocessing.get_context("fork").Process(target=add_lines) for _ in range(2)]
    for child in children:
        child.start()
    add_lines_here = [events.handle(Order, ada.id, lambda o: o.add_line("hats")) for _ in range(20)]
    for child in children:
        child.join(60)
    assert [child.exitcode for child in children] == [0, 0]
    assert len(add_lines_here) == 20
    assert len(events.get(Order, ada.id).lines) == 60
