"""Projections and process managers on both stores: catch-up then live, exactly once, read your
writes, parked events, rebuilds, and the order-payment-shipping saga with its compensation."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

import riverbed
from riverbed.eventsourcing import (
    EventSourcing,
    EventSourcingError,
    ReadModel,
    Relay,
    subscriptions,
)
from riverbed.eventsourcing.errors import EventDecodeError, StoreUnavailableError
from riverbed.eventsourcing.projections import ProjectionRunner, subscriber
from riverbed.eventsourcing.records import NewEvent, ParkedEvent, StreamAppend
from riverbed.eventsourcing.sagas import SagaRunner
from riverbed.eventsourcing.stores import sqlite as sqlite_store
from tests.eventsourcing.shop import Fulfilment, Money, Order, OrderTotals, Payment
from tests.support import published, wait_until

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def place(events: EventSourcing, customer: str, amount: str = "10") -> Order:
    order = Order.create(customer, f"{customer}@x", Money(Decimal(amount), "EUR"), NOW)
    events.save(order)
    return order


def test_a_projection_catches_up_then_follows_live(events: EventSourcing) -> None:
    for customer in ("ada", "bob", "ada"):
        place(events, customer)
    events.projection(OrderTotals())
    stop = threading.Event()
    threads = events.run(stop)
    try:
        events.projections.wait_for("order-totals", 3)
        assert events.projections.get("order-totals", "customers", "ada") == {
            "orders": 2, "total": "20",
        }  # fmt: skip
        order = Order.create("cy", "cy@x", Money(Decimal("5"), "EUR"), NOW)
        position = events.save(order)
        # Read your writes: wait until the projection has applied the save's position.
        assert events.projections.get("order-totals", "customers", "cy", wait_for=position) == {
            "orders": 1,
            "total": "5",
        }
        assert set(events.projections.all("order-totals", "customers")) == {"ada", "bob", "cy"}
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)


def test_queries_from_async_code_wait_without_blocking_the_event_loop(
    events: EventSourcing,
) -> None:
    events.projection(OrderTotals())
    stop = threading.Event()
    threads: list[threading.Thread] = []

    async def main() -> None:
        order = Order.create("ada", "ada@x", Money(Decimal("7"), "EUR"), NOW)
        position = await events.save_async(order)
        waiting = asyncio.create_task(
            events.projections.get_async("order-totals", "customers", "ada", wait_for=position)
        )
        await asyncio.sleep(0.1)  # the loop runs on while the query waits for the projection
        assert not waiting.done()
        threads.extend(events.run(stop))
        assert await waiting == {"orders": 1, "total": "7"}
        assert await events.projections.all_async("order-totals", "customers") == {
            "ada": {"orders": 1, "total": "7"}
        }
        await events.projections.wait_for_async("order-totals", position)
        with pytest.raises(TimeoutError, match=f"has not reached position {position + 1}"):
            await events.projections.wait_for_async("order-totals", position + 1, timeout=0.05)
        with pytest.raises(EventSourcingError, match="no projection named 'nope'"):
            await events.projections.get_async("nope", "customers", "ada")
        await events.close_async()

    try:
        asyncio.run(main())
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)


class Counting(riverbed.Projection):
    """Counts events per type, and fails where told to."""

    name = "counting"
    fail_on: set[str] = set()  # noqa: RUF012 - set per test

    def handle(self, event: riverbed.Envelope, tx: ReadModel) -> None:
        current = tx.get("types", event.type) or {"n": 0}
        tx.put("types", event.type, {"n": current["n"] + 1})
        if event.stream in self.fail_on:
            raise RuntimeError(f"cannot project {event.stream}")


def test_each_event_is_applied_once_and_a_failing_one_is_parked(events: EventSourcing) -> None:
    orders = [place(events, name) for name in ("ada", "bob", "cy", "dan")]
    projection = Counting()
    projection.fail_on = {orders[1].id}
    runner = ProjectionRunner(events, projection)
    assert runner.catch_up() == 4
    # bob's event was parked: its writes rolled back, the rest applied exactly once.
    assert events.store.documents("counting@v1/types") == {"Order.Placed": {"n": 3}}
    (parked,) = events.store.parked("counting@v1")
    assert parked.position == 2 and parked.type == "Order.Placed"
    assert f"RuntimeError: cannot project {orders[1].id}" in parked.error
    assert parked.error.count("Traceback") == 1  # not the failed page's as well
    assert runner.checkpoint == 4
    assert runner.run_once() == 0  # nothing applied twice
    assert events.store.unpark("counting@v1", 2)
    assert events.store.parked("counting@v1") == []


@pytest.mark.parametrize("on_error", ["park", "stop"])
def test_an_error_whose_text_a_store_cannot_keep_is_parked_with_it_escaped(
    events: EventSourcing, on_error: str
) -> None:
    class Picky(riverbed.Projection):
        name = f"picky-{on_error}"

        def handle(self, event: riverbed.Envelope, tx: ReadModel) -> None:
            if event.position == 2:  # NUL, which PostgreSQL's text refuses, and a lone
                # surrogate, as in a file name Python read with surrogateescape
                raise ValueError("bad\x00name caf\udce9")

    Picky.on_error = on_error  # type: ignore[assignment]
    for name in ("ada", "bob", "cy"):
        place(events, name)
    runner = ProjectionRunner(events, Picky())
    runner.catch_up()
    escaped = "ValueError: bad\\x00name caf\\udce9"
    if on_error == "park":
        assert runner.checkpoint == 3
        (parked,) = runner.parked()
        assert escaped in parked.error
    else:
        assert runner.checkpoint == 1
        status = runner.status()
        assert status.stopped_at == 2 and escaped in (status.stopped_error or "")


def test_a_payload_that_no_longer_decodes_is_parked_with_the_reason(
    events: EventSourcing,
) -> None:
    place(events, "ada")
    events.store.append([StreamAppend("p-1", 0, [NewEvent(
        str(uuid.uuid4()), "p-1", 1, "Payment.Requested", 1,
        msgspec.msgpack.encode({"order_id": 5}), msgspec.msgpack.encode({}), 1,
    )])])  # fmt: skip
    place(events, "bob")
    runner = ProjectionRunner(events, Counting())
    runner.catch_up()
    (parked,) = events.store.parked("counting@v1")
    assert parked.position == 2
    assert "EventDecodeError" in parked.error and "Payment.Requested" in parked.error
    assert events.store.documents("counting@v1/types") == {"Order.Placed": {"n": 2}}


def test_an_event_whose_metadata_is_damaged_is_named_parked_and_stops_the_relay(
    events: EventSourcing, tmp_path: Path
) -> None:
    place(events, "ada")
    events.store.append([StreamAppend("p-1", 0, [NewEvent(
        str(uuid.uuid4()), "p-1", 1, "Payment.Requested", 1,
        msgspec.msgpack.encode({"order_id": "o-1", "amount": "1"}), b"\xc1", 1,
    )])])  # fmt: skip
    with pytest.raises(EventDecodeError, match="the metadata of the event at position 2 "):
        events.read()
    ProjectionRunner(events, Counting()).catch_up()
    (parked,) = events.store.parked("counting@v1")
    assert parked.position == 2 and "the metadata of the event at position 2" in parked.error
    log = riverbed.connect(f"sqlite:///{tmp_path}/log.db")
    relay = Relay(events, log, "orders")
    with pytest.raises(EventDecodeError, match="the metadata of the event at position 2 "):
        relay.run_once()
    relay.close()
    log.close()


def test_another_apps_events_of_types_this_process_does_not_know_are_left_alone(
    events: EventSourcing,
) -> None:
    place(events, "ada")
    payload = msgspec.msgpack.encode({"total": 5})
    saved = [("inv-1", "billing"), ("inv-2", None), ("inv-3", "old-shop")]  # None: from before
    for stream, app in saved:
        metadata = msgspec.msgpack.encode({"riverbed_app": app} if app else {"app": "ios"})
        events.store.append([StreamAppend(stream, 0, [NewEvent(
            str(uuid.uuid4()), stream, 1, "Invoice.Issued", 1, payload, metadata, 1,
        )])])  # fmt: skip
    place(events, "bob")
    events.take_over_names("old-shop")  # this app, renamed: its events are this app's
    ProjectionRunner(events, Counting()).catch_up()
    parked = events.store.parked("counting@v1")  # billing's: not parked
    assert [entry.position for entry in parked] == [3, 4]
    assert all("UnknownEventTypeError" in entry.error for entry in parked)
    assert events.store.documents("counting@v1/types") == {"Order.Placed": {"n": 2}}
    assert events.read(0, 1)[0].metadata["riverbed_app"] == "shop"  # a save names its app
    order = Order.create("cy", "cy@x", Money(Decimal(1), "EUR"), NOW)
    with pytest.raises(EventSourcingError, match="metadata 'riverbed_app' is set by riverbed"):
        events.save(order, metadata={"riverbed_app": "x"})
    events.save(order, metadata={"app": "ios"})  # an "app" of the user's own


def test_parked_events_belong_to_the_version_that_parked_them(events: EventSourcing) -> None:
    orders = [place(events, name) for name in ("ada", "bob")]
    projection = events.projection(Counting())
    projection.fail_on = {orders[1].id}
    events.projections.runner("counting").catch_up()
    assert [p.projection for p in events.projections.parked("counting")] == ["counting@v1"]
    # Filed under the bare name, as a riverbed before versioned entries did: listed too.
    with events.store.transaction("legacy") as tx:
        tx.park(ParkedEvent("counting", 1, "e1", "Order.Placed", "old", 0))
    assert [p.position for p in events.projections.parked("counting")] == [1, 2]
    assert events.projections.status("counting").parked == 2
    projection.fail_on = set()
    assert events.projections.rebuild("counting") == 2
    # Version 2 applied both events; version 1's entries went with it.
    assert events.projections.parked("counting") == []
    assert events.store.parked("counting@v1") == events.store.parked("counting") == []
    projection.fail_on = {orders[0].id}
    assert events.projections.rebuild("counting") == 3
    (parked,) = events.projections.parked("counting")
    assert (parked.projection, parked.position) == ("counting@v3", 1)
    assert events.projections.unpark("counting", 1)
    assert not events.projections.unpark("counting", 1)
    assert events.projections.parked("counting") == []


def test_a_projection_can_stop_on_error_instead(events: EventSourcing) -> None:
    orders = [place(events, name) for name in ("ada", "bob", "cy")]

    class Strict(Counting):
        name = "strict"
        on_error = "stop"

    projection = events.projection(Strict())
    projection.fail_on = {orders[1].id}
    stop = threading.Event()
    (thread,) = events.run(stop)
    try:
        # The runner stops there, instead of trying the event again and again.
        wait_until(lambda: events.projections.status("strict").stopped_at == 2, 10, "the stop")
        assert thread.is_alive() and not stop.is_set() and events.failures == []
        status = events.projections.status("strict")
        assert (status.checkpoint, status.stopped_at, status.parked) == (1, 2, 0)
        assert status.stopped_error is not None
        assert "RuntimeError: cannot project" in status.stopped_error
        refusal = (
            r"rebuild of projection 'strict' stopped at position 2 \(Order.Placed\), and "
            "version 1 stays active"
        )
        with pytest.raises(EventSourcingError, match=refusal):
            events.projections.rebuild("strict")
        assert events.projections.active_version("strict") == 1
        # Fixed and rebuilt, the running worker follows the new version.
        projection.fail_on = set()
        assert events.projections.rebuild("strict") == 3
        position = events.save(Order.create("dan", "d@x", Money(Decimal(1), "EUR"), NOW))
        events.projections.wait_for("strict", position, timeout=10)
        assert events.projections.status("strict").stopped_at is None
    finally:
        stop.set()
        thread.join(10)


def test_rebuild_fills_a_new_version_beside_the_live_one(events: EventSourcing) -> None:
    for customer in ("ada", "bob"):
        place(events, customer)
    events.projection(OrderTotals())
    stop = threading.Event()
    threads = events.run(stop)
    try:
        events.projections.wait_for("order-totals", 2)
        assert events.projections.rebuild("order-totals") == 2
        assert events.projections.active_version("order-totals") == 2
        assert events.store.documents("order-totals@v1/customers") == {}  # the old version
        assert set(events.projections.all("order-totals", "customers")) == {"ada", "bob"}
        # The running worker follows the switch: new events reach version 2.
        position = events.save(Order.create("cy", "c@x", Money(Decimal(1), "EUR"), NOW))
        assert events.projections.get("order-totals", "customers", "cy", wait_for=position)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)


def test_a_rebuild_stopped_before_its_switch_starts_afresh_the_next_time(
    events: EventSourcing,
) -> None:
    orders = [place(events, name) for name in ("ada", "bob", "cy")]

    projection = events.projection(Counting())
    projection.fail_on = {orders[1].id}  # the code of the first rebuild has a bug
    events.store.acquire_lease("rebuild:counting", "first", 60_000)
    runner = ProjectionRunner(events, projection, 2, rebuild_lease=("rebuild:counting", "first"))
    runner.run_once(limit=2)  # the first rebuild got this far, then was interrupted
    events.store.release_lease("rebuild:counting", "first")  # as its lease ran out
    assert len(events.store.parked("counting@v2")) == 1
    projection.fail_on = set()  # fixed
    assert events.projections.rebuild("counting") == 2
    assert events.projections.all("counting", "types") == {"Order.Placed": {"n": 3}}
    assert events.projections.parked("counting") == []


def test_pages_whose_time_runs_out_read_fewer_events_not_the_same_again(
    events: EventSourcing, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(60):
        place(events, f"c{i}")
    monkeypatch.setattr(subscriptions, "PAGE_S", 0.0)  # as for events of megabytes each
    read = 0
    read_all = events.store.read_all

    def counted(after: int = 0, limit: int = 1000) -> list[Any]:
        nonlocal read
        page = read_all(after, limit)
        read += len(page)
        return page

    monkeypatch.setattr(events.store, "read_all", counted)
    assert ProjectionRunner(events, Counting()).catch_up() == 60
    assert read < 4 * 60  # each page read all the rest, handling one: 1,830


def test_a_rebuild_that_lost_its_lease_writes_nothing_and_does_not_switch(
    events: EventSourcing,
) -> None:
    place(events, "ada")
    projection = events.projection(Counting())
    events.projections.runner("counting").catch_up()
    lease = "rebuild:counting"
    assert events.store.acquire_lease(lease, "frozen", 1)  # its lease ran out while frozen...
    time.sleep(0.01)
    assert events.store.acquire_lease(lease, "next", 60_000)  # ...and another rebuild took it
    frozen = ProjectionRunner(events, projection, 2, rebuild_lease=(lease, "frozen"))
    with pytest.raises(EventSourcingError, match="rebuild of projection 'counting' lost its lease"):
        frozen.run_once()  # as it wakes
    assert frozen.checkpoint == 0 and events.store.documents("counting@v2/types") == {}
    with pytest.raises(EventSourcingError, match="lost its lease"):
        events.projections._switched(projection, 1, frozen)
    assert events.projections.active_version("counting") == 1
    assert events.projections.all("counting", "types") == {"Order.Placed": {"n": 1}}


class SeenTable(riverbed.Projection):
    """Rows in a table of its own per version; ``interrupt_at``: a stream whose event stops
    the process (Ctrl-C) while a rebuild runs."""

    name = "seen"
    interrupt_at = ""

    def handle(self, event: riverbed.Envelope, tx: ReadModel) -> None:
        if event.stream == self.interrupt_at and tx.version > 1:
            raise KeyboardInterrupt
        mark = "?" if isinstance(tx.tx, sqlite_store.SqliteTransaction) else "%s"
        tx.execute(f"CREATE TABLE IF NOT EXISTS seen_v{tx.version} (stream TEXT)")
        tx.execute(f"INSERT INTO seen_v{tx.version} VALUES ({mark})", (event.stream,))


def test_a_rebuild_after_an_interrupted_one_fills_tables_of_a_new_version(
    events: EventSourcing,
) -> None:
    orders = [place(events, name) for name in ("ada", "bob", "cy")]
    projection = events.projection(SeenTable())
    events.projections.runner("seen").catch_up()
    projection.interrupt_at = orders[1].id
    with pytest.raises(KeyboardInterrupt):
        events.projections.rebuild("seen")  # version 2 got one row, then the process stopped
    projection.interrupt_at = ""
    assert events.projections.rebuild("seen") == 3
    with events.store.transaction("test") as tx:
        assert tx.execute("SELECT count(*) FROM seen_v3") == [(3,)]


def test_one_rebuild_of_a_projection_runs_at_a_time(events: EventSourcing) -> None:
    events.projection(Counting())
    assert events.store.acquire_lease("rebuild:counting", "another process", 10_000)
    with pytest.raises(EventSourcingError, match="projection 'counting' is being rebuilt else"):
        events.projections.rebuild("counting")
    events.store.release_lease("rebuild:counting", "another process")
    assert events.projections.rebuild("counting") == 2


def test_a_rebuild_right_after_another_one_switched_keeps_the_active_version(
    events: EventSourcing, monkeypatch: pytest.MonkeyPatch
) -> None:
    for customer in ("ada", "bob"):
        place(events, customer)
    events.projection(OrderTotals())
    projections = events.projections
    assert projections.rebuild("order-totals") == 2
    first_switched = threading.Event()
    seen_while_rebuilding: list[object] = []
    acquire_lease = events.store.acquire_lease

    def acquire(lease: str, owner: str, ttl_ms: int) -> bool:
        if threading.current_thread().name == "second rebuild":
            if not first_switched.is_set():  # its first try: the other rebuild goes first
                assert first_switched.wait(30)
            else:  # renewing, while it fills its version beside the active one
                seen_while_rebuilding.append(projections.get("order-totals", "customers", "ada"))
        return acquire_lease(lease, owner, ttl_ms)

    monkeypatch.setattr(events.store, "acquire_lease", acquire)
    second: list[int] = []
    thread = threading.Thread(
        target=lambda: second.append(projections.rebuild("order-totals")), name="second rebuild"
    )
    thread.start()
    assert projections.rebuild("order-totals") == 3
    first_switched.set()
    thread.join(30)
    assert second == [4]
    assert seen_while_rebuilding and all(seen_while_rebuilding)  # version 3 stayed whole
    assert set(projections.all("order-totals", "customers")) == {"ada", "bob"}


def test_reading_your_writes_follows_a_rebuild_to_the_new_version(
    events: EventSourcing, monkeypatch: pytest.MonkeyPatch
) -> None:
    events.projection(OrderTotals())
    place(events, "ada")
    position = events.store.last_position()
    answers: list[object] = []
    waiting = threading.Thread(target=lambda: answers.append(events.projections.get(
        "order-totals", "customers", "ada", wait_for=position, timeout=10
    )))  # fmt: skip
    looked_up = threading.Event()
    active_version = events.projections.active_version

    def noted(name: str) -> int:
        version = active_version(name)
        looked_up.set()
        return version

    monkeypatch.setattr(events.projections, "active_version", noted)
    waiting.start()
    assert looked_up.wait(10)  # it waits on version 1, which no worker runs
    assert events.projections.rebuild("order-totals") == 2  # fills version 2 and switches
    waiting.join(15)
    assert answers == [{"orders": 1, "total": "10"}]


@pytest.mark.parametrize("query", ["get", "all", "get_async", "all_async"])
def test_a_query_that_a_rebuilds_switch_overtook_reads_the_new_version(
    events: EventSourcing, query: str
) -> None:
    place(events, "ada")
    events.projection(OrderTotals())
    ProjectionRunner(events, OrderTotals()).catch_up()
    projections, store = events.projections, events.store
    read_document, switched = store.get_document, []

    def switching_first(collection: str, key: str) -> object:
        if collection.endswith("customers") and not switched:  # read of the old version...
            switched.append(projections.rebuild("order-totals"))  # ...after the switch
        return read_document(collection, key)

    def documents_switching_first(collection: str, limit: int | None = None) -> object:
        if not switched:
            switched.append(projections.rebuild("order-totals"))
        return type(store).documents(store, collection, limit)

    store.get_document = switching_first  # type: ignore[method-assign]
    store.documents = documents_switching_first  # type: ignore[method-assign]
    try:
        if query == "get":
            found: object = projections.get("order-totals", "customers", "ada")
        elif query == "all":
            found = projections.all("order-totals", "customers").get("ada")
        else:
            found = asyncio.run(_query_async(events, query, switched))
    finally:
        del store.get_document, store.documents  # type: ignore[method-assign]
    assert switched == [2]
    assert found == {"orders": 1, "total": "10"}


async def _query_async(events: EventSourcing, query: str, switched: list[int]) -> object:
    """The async query, with the same switch before its first read of the collection."""
    store = await events.async_store()
    read_document, read_documents = store.get_document, store.documents

    async def rebuild_once() -> None:
        if not switched:
            switched.append(await asyncio.to_thread(events.projections.rebuild, "order-totals"))

    async def switching_first(collection: str, key: str) -> object:
        if collection.endswith("customers"):
            await rebuild_once()
        return await read_document(collection, key)

    async def documents_switching_first(collection: str, limit: int | None = None) -> object:
        await rebuild_once()
        return await read_documents(collection, limit)

    store.get_document = switching_first  # type: ignore[method-assign]
    store.documents = documents_switching_first  # type: ignore[method-assign]
    try:
        if query == "get_async":
            return await events.projections.get_async("order-totals", "customers", "ada")
        return (await events.projections.all_async("order-totals", "customers")).get("ada")
    finally:
        del store.get_document, store.documents  # type: ignore[method-assign]
        await events.close_async()


def test_wait_for_takes_a_position_and_says_when_it_is_beyond_the_store(
    events: EventSourcing,
) -> None:
    place(events, "ada")
    events.projection(OrderTotals())
    ProjectionRunner(events, OrderTotals()).catch_up()
    for bad in ("1", 1.5):
        with pytest.raises(TypeError, match=r"wait_for=.*: give the position \(an int\)"):
            events.projections.get("order-totals", "customers", "ada", wait_for=bad)  # type: ignore[arg-type]
    with pytest.raises(TimeoutError, match="the store holds events up to position 1 only"):
        events.projections.get("order-totals", "customers", "ada", wait_for=5, timeout=0.2)
    for timeout in (float("nan"), "1", True):
        with pytest.raises(TypeError, match=r"timeout=.*: give the seconds to wait"):
            events.projections.wait_for("order-totals", 5, timeout=timeout)  # type: ignore[arg-type]
    found = events.projections.get("order-totals", "customers", "ada", wait_for=1, timeout=None)
    assert found == {"orders": 1, "total": "10"}
    with pytest.raises(TypeError, match="a document's collection is a str, got None"):
        events.projections.all("order-totals", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a document's collection is a str, got None"):
        asyncio.run(events.projections.get_async("order-totals", None, "ada"))  # type: ignore[arg-type]


def test_wait_for_keeps_its_timeout_when_no_pooled_connection_comes_free(
    postgres_url: str,
) -> None:
    # One connection, held elsewhere: each read would wait the URL's 30 s pool_timeout for it.
    url = f"{postgres_url}?schema=busy_{uuid.uuid4().hex[:8]}&pool_size=1&pool_timeout=30"
    events = EventSourcing("shop", url)
    try:
        place(events, "ada")
        position = events.store.last_position()
        events.projection(OrderTotals())
        errors: list[BaseException] = []

        def wait(call: Any) -> None:
            started = time.monotonic()
            try:
                call()
            except TimeoutError as error:
                errors.append(error)
            assert time.monotonic() - started < 5

        async def wait_async() -> None:
            store = await events.async_store()
            held = await store._pool.getconn()  # type: ignore[attr-defined]  # its only one
            try:
                await events.projections.wait_for_async("order-totals", position, timeout=0.3)
            finally:
                await store._pool.putconn(held)  # type: ignore[attr-defined]

        with events.store.transaction("holder"):  # the pool's only connection
            for call in (
                lambda: events.projections.wait_for("order-totals", position, timeout=0.3),
                lambda: asyncio.run(wait_async()),
            ):
                waiter = threading.Thread(target=wait, args=(call,))
                waiter.start()
                waiter.join(10)
        assert len(errors) == 2
        for error in errors:
            assert "projection 'order-totals' was not seen to reach position" in str(error)
            assert "all 1 of the pool's were in use" in str(error)
    finally:
        events.close()


def test_waiting_for_a_projection_inside_a_sqlite_handler_fails_at_once(tmp_path: Path) -> None:
    events = EventSourcing("shop", f"sqlite:///{tmp_path}/events.db")

    class Report(riverbed.Projection):
        """Reads another projection's writes: the store's one write lock is its own."""

        name = "report"

        def handle(self, event: riverbed.Envelope, tx: ReadModel) -> None:
            events.projections.get("order-totals", "customers", "ada", wait_for=event.position)

    events.projection(OrderTotals())
    events.projection(Report())
    place(events, "ada")
    started = time.monotonic()
    events.projections.runner("report").catch_up()
    assert time.monotonic() - started < 5  # not the query's 10 s timeout
    (parked,) = events.projections.parked("report")
    assert "cannot wait for projection 'order-totals' to reach position 1 inside" in parked.error
    events.projections.runner("order-totals").catch_up()
    events.projections.retry("report", 1)  # applied now: nothing to wait for
    assert events.projections.parked("report") == []
    events.close()


def test_a_sqlite_store_locked_for_longer_than_its_busy_timeout_is_an_outage(
    tmp_path: Path,
) -> None:
    events = EventSourcing("shop", f"sqlite:///{tmp_path}/events.db")
    place(events, "ada")
    other = sqlite3.connect(tmp_path / "events.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process's writer, holding the lock
    events.store._conn.execute("PRAGMA busy_timeout=100")  # type: ignore[attr-defined]
    try:
        with pytest.raises(StoreUnavailableError, match="stayed locked by another writer"):
            place(events, "bob")
        with (
            pytest.raises(StoreUnavailableError, match="stayed locked by another writer"),
            events.store.transaction("view"),
        ):
            pass
    finally:
        other.execute("ROLLBACK")
        other.close()
    place(events, "bob")
    events.close()


def test_a_page_begun_for_a_replaced_version_writes_nothing(events: EventSourcing) -> None:
    place(events, "ada")
    events.projection(OrderTotals())
    # A worker that chose version 1 before the rebuild switched, and runs its next page after.
    worker = events.projections.runner("order-totals")
    assert worker.catch_up() == 1
    assert events.projections.rebuild("order-totals") == 2
    place(events, "bob")
    assert worker.run_once() == 1
    assert events.store.documents("order-totals@v1/customers") == {}
    assert worker.version == 2
    assert set(events.projections.all("order-totals", "customers")) == {"ada", "bob"}


class PausingTotals(OrderTotals):
    """``OrderTotals`` that waits for ``release`` the first time it has written position 3: a
    page still in flight."""

    def __init__(self) -> None:
        self.paused = threading.Event()
        self.release = threading.Event()

    def handle(self, event: riverbed.Envelope, tx: ReadModel) -> None:
        super().handle(event, tx)
        if event.position == 3 and not self.paused.is_set():
            self.paused.set()
            self.release.wait(30)


def test_a_rebuild_drops_what_a_page_in_flight_of_the_old_version_writes(
    events: EventSourcing, store_url: str
) -> None:
    for customer in ("ada", "bob"):
        place(events, customer)
    projection = events.projection(PausingTotals())
    stop = threading.Event()
    threads = events.run(stop)
    rebuilt: list[int] = []
    rebuilding = threading.Thread(
        target=lambda: rebuilt.append(events.projections.rebuild("order-totals"))
    )
    try:
        events.projections.wait_for("order-totals", 2)
        place(events, "cy")
        assert projection.paused.wait(30), "version 1 never reached position 3"
        rebuilding.start()
        if store_url.startswith("postgresql"):
            # Version 2 fills beside the paused page (on SQLite that page holds the write lock).
            version_2 = subscriber("order-totals", 2)
            wait_until(lambda: events.store.checkpoint(version_2) == 3, 30, "version 2 to fill")
        rebuilding.join(0.5)
        assert rebuilding.is_alive(), "the switch did not wait for version 1's page in flight"
        projection.release.set()
        rebuilding.join(30)
        assert rebuilt == [2]
        order = Order.create("dan", "d@x", Money(Decimal("4"), "EUR"), NOW)
        position = events.save(order)
        # The worker followed the switch.
        assert events.projections.get("order-totals", "customers", "dan", wait_for=position)
    finally:
        projection.release.set()
        stop.set()
        for thread in [*threads, rebuilding]:
            if thread.ident is not None:
                thread.join(10)
    assert events.store.documents("order-totals@v1/customers") == {}
    assert events.projections.all("order-totals", "customers") == {
        "ada": {"orders": 1, "total": "10"},
        "bob": {"orders": 1, "total": "10"},
        "cy": {"orders": 1, "total": "10"},
        "dan": {"orders": 1, "total": "4"},
    }


def test_the_saga_pays_and_ships_an_order(events: EventSourcing) -> None:
    order = place(events, "ada")
    runner = SagaRunner(events, Fulfilment())
    runner.catch_up()
    payment = events.get(Payment, f"payment-{order.id}")
    assert payment.status == "requested"
    payment.succeed()
    events.save(payment)
    runner.catch_up()
    shipped = events.get(Order, order.id)
    assert shipped.status == "shipped"
    # Metadata links the chain: the command events were caused by the payment's event.
    last = events.read()[-1]
    succeeded = next(e for e in events.read() if e.type == "Payment.Succeeded")
    assert last.metadata["causation_id"] == succeeded.id
    requested = next(e for e in events.read() if e.type == "Payment.Requested")
    placed = events.read()[0]
    assert requested.metadata["causation_id"] == placed.id
    assert requested.metadata["correlation_id"] == placed.metadata["correlation_id"]


def test_a_failed_payment_is_compensated(events: EventSourcing) -> None:
    order = place(events, "bob")
    runner = SagaRunner(events, Fulfilment())
    runner.catch_up()
    payment = events.get(Payment, f"payment-{order.id}")
    payment.fail("card declined")
    events.save(payment)
    runner.catch_up()
    cancelled = events.get(Order, order.id)
    assert cancelled.status == "cancelled"
    reason = events.read()[-1].event.reason
    assert reason == "payment failed: card declined"
    assert events.store.get_document("saga:fulfilment", order.id) is None  # state ended


def test_a_payment_that_never_answers_times_out(events: EventSourcing) -> None:
    class Impatient(Fulfilment):
        payment_timeout = 0.3

    order = place(events, "cy")
    stop = threading.Event()
    runner = SagaRunner(events, Impatient())
    thread = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: events.get(Order, order.id).status == "cancelled", 30, "the timeout")
    finally:
        stop.set()
        thread.join(10)
    assert events.read()[-1].event.reason == "no payment in time"
    # The timer fired once: a second run changes nothing.
    assert runner.run_once() == 0
    time.sleep(0.4)
    assert events.get(Order, order.id).version == 2


def test_app_run_runs_the_projections_of_an_app_without_pipelines(
    store_url: str, tmp_path: Path
) -> None:
    app = riverbed.App("shop", url=f"sqlite:///{tmp_path}/log.db", events_url=store_url)
    app.events.projection(OrderTotals())
    app.events.relay("shop-events")
    stop = threading.Event()
    thread = threading.Thread(target=app.run, args=(stop,))
    thread.start()
    try:
        order = Order.create("ada", "a@x", Money(Decimal("3"), "EUR"), NOW)
        position = app.events.save(order)
        totals = app.events.projections.get("order-totals", "customers", "ada", wait_for=position)
        assert totals == {"orders": 1, "total": "3"}
        wait_until(lambda: published(app.log, "shop-events") == 1, 30, "the relay")
    finally:
        stop.set()
        thread.join(30)
        app.close()
    assert not thread.is_alive()


class SkuIndex(riverbed.Projection):
    """Inserts into a table of its own, ignoring a duplicate by catching its error."""

    name = "sku-index"

    def handle(self, event: riverbed.Envelope, tx: ReadModel) -> None:
        mark = "?" if isinstance(tx.tx, sqlite_store.SqliteTransaction) else "%s"
        tx.execute(f"CREATE TABLE IF NOT EXISTS skus_v{tx.version} (sku TEXT PRIMARY KEY)")
        tx.execute(f"SELECT count(*) FROM skus_v{tx.version} WHERE sku LIKE 's%'")  # no params
        with contextlib.suppress(Exception):  # the duplicate, as the user meant to ignore it
            tx.execute(f"INSERT INTO skus_v{tx.version} VALUES ({mark})", ("same",))


def test_a_handler_that_swallows_a_failed_statement_is_parked_not_fatal(
    events: EventSourcing,
) -> None:
    for name in ("ada", "bob"):
        place(events, name)
    runner = ProjectionRunner(events, SkuIndex())
    assert runner.catch_up() == 2  # no exception: the runner goes on
    parked = events.store.parked("sku-index@v1")
    if isinstance(events.store, sqlite_store.SqliteEventStore):
        assert parked == []  # SQLite's transaction survives a failed statement
    else:  # PostgreSQL's is aborted: the second event's insert failed
        (second,) = parked
        assert second.position == 2
        assert "the handler left its transaction unusable" in second.error
    assert runner.checkpoint == 2


def test_a_retry_that_swallows_a_failed_statement_stays_parked(events: EventSourcing) -> None:
    for name in ("ada", "bob"):
        place(events, name)
    events.projection(SkuIndex())
    events.projections.runner("sku-index").catch_up()
    if isinstance(events.store, sqlite_store.SqliteEventStore):
        # SQLite's transaction survives a failed statement: there is nothing to retry.
        assert events.projections.parked("sku-index") == []
        return
    (parked,) = events.projections.parked("sku-index")
    again = events.projections.retry("sku-index", parked.position)
    assert again is not None  # not "handled": what the handler did was rolled back
    assert "aborts the transaction on PostgreSQL all the same" in again.error
    assert events.projections.parked("sku-index") == [again]


def test_a_rebuild_drops_every_collection_of_the_old_version(events: EventSourcing) -> None:
    for name in ("ada", "bob"):
        place(events, name)
    seen: list[int] = []

    class Tagged(Counting):
        def handle(self, event: riverbed.Envelope, tx: ReadModel) -> None:
            seen.append(tx.version)
            super().handle(event, tx)
            tx.put("undeclared", event.stream, {"seen": True})

    events.projection(Tagged())
    events.projections.runner("counting").catch_up()
    assert events.projections.rebuild("counting") == 2
    assert seen == [1, 1, 2, 2]
    assert events.store.documents("counting@v1/types") == {}
    assert events.store.documents("counting@v1/undeclared") == {}
    assert len(events.projections.all("counting", "undeclared")) == 2


def test_a_handler_may_forget_a_stream_and_its_writes_join_its_transaction(
    events: EventSourcing,
) -> None:
    order = place(events, "ada")

    class Forgetting(riverbed.Projection):
        name = "forgetting"

        def handle(self, event: riverbed.Envelope, tx: ReadModel) -> None:
            assert events.store.delete_stream_key(event.stream)

    runner = ProjectionRunner(events, Forgetting())
    assert runner.catch_up() == 1
    assert events.store.parked("forgetting@v1") == []
    assert events.store.stream_key(order.id, False) is None


class Strict(Counting):
    on_error = "stop"


def stopped_at_the_first_of_two(events: EventSourcing) -> Strict:
    """A projection that stops on errors, stopped at position 1 of 2."""
    orders = [place(events, name) for name in ("ada", "bob")]
    projection = events.projection(Strict())
    projection.fail_on = {orders[0].id}
    events.projections.runner("counting").catch_up()
    return projection


def test_waiting_for_a_projection_stopped_before_the_position_fails_at_once(
    events: EventSourcing,
) -> None:
    stopped_at_the_first_of_two(events)
    started = time.monotonic()
    with pytest.raises(EventSourcingError, match=r"'counting' stopped at position 1 .*will not"):
        events.projections.wait_for("counting", 2, timeout=30)
    with pytest.raises(EventSourcingError, match="stopped at position 1"):
        asyncio.run(events.projections.wait_for_async("counting", 2, timeout=30))
    assert time.monotonic() - started < 10


def test_a_restarted_runner_lets_read_your_writes_wait_for_the_event_it_stopped_at(
    events: EventSourcing,
) -> None:
    projection = stopped_at_the_first_of_two(events)
    assert events.projections.status("counting").stopped_at == 1
    projection.fail_on = set()  # fixed, and the worker restarted:
    restarted = events.projections.runner("counting")
    restarted._restarted()  # what its run does first
    assert events.projections.status("counting").stopped_at is None
    with pytest.raises(TimeoutError):  # waits, rather than failing at once
        events.projections.wait_for("counting", 2, timeout=0.3)
    restarted.catch_up()
    events.projections.wait_for("counting", 2, timeout=5)
