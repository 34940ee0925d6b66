"""Aggregates saved and loaded through ``app.events`` on both stores: versions, concurrency,
snapshots, upcasting, metadata, crypto-shredding, bad stored data, async, given/when/then."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest

import riverbed
from riverbed.eventsourcing import EventSourcing, repository, scenario, snapshots, turns
from riverbed.eventsourcing.codec import registry
from riverbed.eventsourcing.errors import EventDecodeError, EventSourcingError
from riverbed.eventsourcing.records import NewEvent, StreamAppend
from tests.eventsourcing.shop import Money, Order, OrderShipped, Payment

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def place(customer: str = "ada", order_id: str | None = None) -> Order:
    return Order.create(
        customer, f"{customer}@example.com", Money(Decimal("12.50"), "EUR"), NOW, id=order_id
    )


def test_save_and_load_an_aggregate(events: EventSourcing) -> None:
    order = place()
    order.add_line("sku-1")
    order.add_line("sku-2")
    assert order.version == 3
    position = events.save(order)
    assert position == 3
    assert order.pending == []

    loaded = events.get(Order, order.id)
    assert (loaded.version, loaded.status, loaded.lines) == (3, "placed", ["sku-1", "sku-2"])
    assert loaded.total == Money(Decimal("12.50"), "EUR")
    assert loaded.placed_at == NOW
    assert uuid.UUID(order.id)  # a UUID unless given

    loaded.pay()
    loaded.ship("ups")
    events.save(loaded)
    again = events.get(Order, order.id)
    assert (again.status, again.carrier, again.version) == ("shipped", "ups", 5)  # type: ignore[attr-defined]

    named = place("bob", order_id="order-bob")
    events.save(named)
    assert events.get(Order, "order-bob").customer == "bob"
    with pytest.raises(riverbed.AggregateNotFoundError, match="no Order with id 'nope'"):
        events.get(Order, "nope")


def test_an_in_memory_store_saves_and_loads_in_its_thread() -> None:
    # SQLite keeps ":memory:" out of WAL mode: the store takes the mode it gets.
    events = EventSourcing("in-memory", "sqlite:///:memory:")
    try:
        order = place()
        events.save(order)
        assert events.get(Order, order.id).customer == "ada"
    finally:
        events.close()


def test_time_travel_loads_an_older_version(events: EventSourcing) -> None:
    order = place()
    for sku in ("a", "b", "c", "d"):
        order.add_line(sku)
    events.save(order)
    assert events.get(Order, order.id, version=2).lines == ["a"]
    assert events.get(Order, order.id, version=4).lines == ["a", "b", "c"]
    stored = events.store.read_stream(order.id, 2, 3)
    assert [e.version for e in stored] == [2, 3]


def test_a_concurrent_save_raises_and_appends_nothing(events: EventSourcing) -> None:
    order = place()
    events.save(order)
    first, second = events.get(Order, order.id), events.get(Order, order.id)
    first.add_line("x")
    events.save(first)
    second.add_line("y")
    other = place("bob")
    with pytest.raises(riverbed.ConcurrencyError) as raised:
        events.save(other, second)  # one save, two streams: all or nothing
    assert raised.value.stream == order.id
    assert (raised.value.expected, raised.value.actual) == (1, 2)
    assert f"stream '{order.id}' is at version 2, not the expected 1" in str(raised.value)
    with pytest.raises(riverbed.AggregateNotFoundError):
        events.get(Order, other.id)


def test_a_command_handler_retries_on_conflict(events: EventSourcing) -> None:
    order = place()
    events.save(order)
    raced = []

    def decide(loaded: Order) -> None:
        if not raced:  # another writer gets in between the load and the save, once
            rival = events.get(Order, order.id)
            rival.add_line("rival")
            events.save(rival)
            raced.append(True)
        loaded.add_line("mine")

    loaded, position = events.handle(Order, order.id, decide, command_id="cmd-1")
    assert loaded.lines == ["rival", "mine"]
    last = events.read(position - 1)[-1]
    assert last.metadata["causation_id"] == "cmd-1"
    assert last.metadata["correlation_id"] == "cmd-1"
    with pytest.raises(ValueError, match="cannot be paid"):
        events.handle(Order, order.id, lambda o: (o.pay(), o.pay()))


def test_commands_racing_for_one_aggregate_all_apply_once(events: EventSourcing) -> None:
    order = place()
    events.save(order)
    writers = 8

    def add_line(n: int) -> None:
        events.handle(Order, order.id, lambda o: o.add_line(f"sku-{n}"))

    # Retries after a lost race wait a random, growing pause, so the writers spread out; without
    # it some ran out of retries colliding with each other.
    threads = [threading.Thread(target=add_line, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    loaded = events.get(Order, order.id)
    assert sorted(loaded.lines) == sorted(f"sku-{n}" for n in range(writers))
    assert loaded.version == 1 + writers


def test_events_saved_together_share_a_correlation_id(events: EventSourcing) -> None:
    order = place()
    order.add_line("x")
    events.save(order, metadata={"user": "ada"})
    placed, added = events.read()
    assert placed.metadata["correlation_id"] == added.metadata["correlation_id"]
    assert placed.metadata["user"] == "ada"
    assert "causation_id" not in placed.metadata
    assert placed.id != added.id


def reads_from(events: EventSourcing, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The first version of each stream read from now on (a load after a snapshot at version N
    reads from N + 1)."""
    starts: list[int] = []
    read_stream = events.store.read_stream

    def recorded(stream: str, from_version: int = 1, to_version: int | None = None) -> list[Any]:
        starts.append(from_version)
        return read_stream(stream, from_version, to_version)

    monkeypatch.setattr(events.store, "read_stream", recorded)
    return starts


def test_snapshots_are_used_and_survive_custom_types(
    events: EventSourcing, monkeypatch: pytest.MonkeyPatch
) -> None:
    order = place()
    for sku in ("a", "b", "c", "d", "e"):
        order.add_line(sku)
    events.save(order)  # version 6: snapshots every 3 events
    snapshot = events.store.load_snapshot(order.id)
    assert snapshot is not None and snapshot.version == 6
    starts = reads_from(events, monkeypatch)
    loaded = events.get(Order, order.id)
    assert starts == [7]  # the events below the snapshot are not read again
    assert loaded.total == Money(Decimal("12.50"), "EUR")
    assert loaded.placed_at == NOW and loaded.lines == ["a", "b", "c", "d", "e"]
    loaded.add_line("f")
    events.save(loaded)
    assert events.get(Order, order.id).lines[-1] == "f"
    # Loading an older version ignores a later snapshot.
    assert events.get(Order, order.id, version=2).lines == ["a"]


class RushOrder(Order):
    """A subclass loads its base class's streams."""


def test_an_aggregate_loads_only_from_a_stream_of_its_class(events: EventSourcing) -> None:
    order = place()
    events.save(order)
    assert events.get(RushOrder, order.id).customer == "ada"
    for other in (Payment, riverbed.Aggregate):
        with pytest.raises(
            riverbed.AggregateNotFoundError,
            match=rf"no {other.__name__} with id '{order.id}': its stream holds events of another "
            r"aggregate class \(Order.Placed at position 1\)",
        ):
            events.get(other, order.id)


def test_a_version_below_1_and_reserved_or_unencodable_metadata_are_refused(
    events: EventSourcing,
) -> None:
    order = place()
    for version in (0, -1):
        with pytest.raises(ValueError, match=f"version={version}: give a version >= 1"):
            events.get(Order, order.id, version=version)
    with pytest.raises(ValueError, match="version=0"):
        asyncio.run(events.get_async(Order, order.id, version=0))
    for key in ("correlation_id", "causation_id"):
        with pytest.raises(EventSourcingError, match=f"metadata '{key}' is set by riverbed"):
            events.save(order, metadata={key: "mine"})
    with pytest.raises(EventSourcingError, match="metadata does not encode: objects of type"):
        events.save(order, metadata={"user": object()})
    with pytest.raises(EventSourcingError, match="metadata does not encode: can't serialize"):
        events.save(order, metadata={"request": 2**70})
    for not_a_dict in ("r1", [("user", "ada")]):
        with pytest.raises(EventSourcingError, match="metadata is a dict of str keys to values"):
            events.save(order, metadata=not_a_dict)  # type: ignore[arg-type]
        with pytest.raises(EventSourcingError, match="metadata is a dict of str keys to values"):
            asyncio.run(events.save_async(order, metadata=not_a_dict))  # type: ignore[arg-type]
    with pytest.raises(EventSourcingError, match=r"metadata keys are strings, not int \(1\)"):
        events.save(order, metadata={1: "one"})
    for bad_id in ("", 5, ["a"]):
        with pytest.raises(ValueError, match="causing: a cause id is a non-empty str"):
            events.handle(Order, order.id, lambda o: None, command_id=bad_id)  # type: ignore[arg-type]
        bad_correlation = riverbed.eventsourcing.causing("cause", correlation_id=bad_id)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="causing: a correlation id is a non-empty str"):
            bad_correlation.__enter__()
    with pytest.raises(TypeError, match="<class 'dict'> is not an aggregate class"):
        events.get(dict, order.id)  # type: ignore[type-var]
    assert events.read() == [] and len(order.pending) == 1  # nothing saved, nothing lost
    events.save(order, metadata={"user": "ada"})
    assert events.read()[0].metadata["user"] == "ada"


@dataclass(frozen=True)
class Address:
    street: str
    city: str


@dataclass
class CartLine:
    sku: str
    tags: list[str] = field(default_factory=list)


class Cart(riverbed.Aggregate):
    """Custom types in attributes the class does not annotate: a snapshot would load them back
    as dicts."""

    snapshot_every = 2

    @riverbed.event("Opened")
    def __init__(self, ship_to: Address) -> None:
        self.ship_to = ship_to
        self.lines: list[CartLine] = []
        self.opened_at = NOW

    @riverbed.event("Added")
    def add(self, line: CartLine) -> None:
        self.lines.append(line)


@pytest.fixture
def warnings_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The unsnapshotted classes warned about: none yet (it warns once per class and process)."""
    monkeypatch.setattr(snapshots, "_warned_unsnapshotted", set())


@pytest.mark.usefixtures("warnings_again")
def test_a_state_that_would_load_back_changed_gets_no_snapshot(
    events: EventSourcing, caplog: pytest.LogCaptureFixture
) -> None:
    cart = Cart(Address("Main St 1", "Oslo"))
    cart.add(CartLine("a", ["gift"]))
    cart.add(CartLine("b"))
    events.save(cart)
    assert events.store.load_snapshot(cart.id) is None
    loaded = events.get(Cart, cart.id)  # replayed: the types are the classes', not dicts
    assert loaded.ship_to == Address("Main St 1", "Oslo")
    assert loaded.lines == [CartLine("a", ["gift"]), CartLine("b")]
    assert loaded.opened_at == NOW
    assert "no snapshots of Cart" in caplog.text
    assert "ship_to (Address loads back as dict)" in caplog.text
    assert "lines (list whose items load back changed)" in caplog.text
    assert "opened_at" not in caplog.text  # a datetime loads back as itself


class Parcel(riverbed.Aggregate):
    snapshot_every = 1

    @riverbed.event("Sent")
    def __init__(self, weight: int) -> None:
        self.scale = Scale(weight)  # no encoding for it


class Scale:
    def __init__(self, weight: int) -> None:
        self.weight = weight


@pytest.mark.usefixtures("warnings_again")
def test_a_state_that_does_not_encode_is_saved_without_a_snapshot(
    events: EventSourcing, caplog: pytest.LogCaptureFixture
) -> None:
    parcel = Parcel(3)
    assert events.save(parcel) == 1  # the save succeeds: its events are what counts
    assert parcel.pending == []
    assert events.store.load_snapshot(parcel.id) is None
    assert events.get(Parcel, parcel.id).scale.weight == 3
    assert "no snapshots of Parcel" in caplog.text
    assert "objects of type Scale are not supported" in caplog.text


def test_a_snapshot_of_an_older_class_shape_is_ignored(events: EventSourcing) -> None:
    class Counter(riverbed.Aggregate):
        snapshot_every = 2
        count: int

        @riverbed.event("Started")
        def __init__(self) -> None:
            self.count = 0

        @riverbed.event("Incremented")
        def increment(self) -> None:
            self.count += 1

    counter = Counter()
    counter.increment()
    counter.increment()
    events.save(counter)
    assert events.store.load_snapshot(counter.id) is not None
    Counter.__annotations__["count"] = "str"  # the class changed shape since the snapshot
    Counter.__dict__.get("_riverbed_state") and delattr(Counter, "_riverbed_state")
    assert events.get(Counter, counter.id).count == 2  # replayed, not loaded wrong


def append_raw(
    events: EventSourcing, stream: str, *types: str, payload: dict[str, Any] | None = None
) -> None:
    """Events as an earlier version of the program stored them, each with ``payload``."""
    data, no_metadata = msgspec.msgpack.encode(payload or {}), msgspec.msgpack.encode({})
    events.store.append([StreamAppend(stream, 0, [
        NewEvent(str(uuid.uuid4()), stream, version, type_, 1, data, no_metadata, 1)
        for version, type_ in enumerate(types, start=1)
    ])])  # fmt: skip


def test_old_events_are_upcast_when_read(events: EventSourcing) -> None:
    stream = "customer-1"
    append_raw(events, stream, "Customer.Registered", payload={"name": "Ada Lovelace"})

    def split_name(data: dict[str, Any]) -> dict[str, Any]:
        first, _, last = data.pop("name").partition(" ")
        return {**data, "first": first, "last": last}

    class Customer(riverbed.Aggregate):
        @riverbed.event("Registered", version=2, upcasters={1: split_name})
        def __init__(self, first: str, last: str) -> None:
            self.first = first
            self.last = last

    customer = events.get(Customer, stream)
    assert (customer.first, customer.last) == ("Ada", "Lovelace")
    new = Customer("Grace", "Hopper")
    events.save(new)
    assert events.store.read_stream(new.id)[0].schema == 2


def test_renamed_aggregates_and_events_still_load_their_stored_events(
    events: EventSourcing, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A class renamed from Locker keeps its events' stored names.
    append_raw(events, "safe-1", "Locker.Installed", "Locker.Opened")

    class Safe(riverbed.Aggregate):
        stored_name = "Locker"

        @riverbed.event("Installed")
        def __init__(self) -> None:
            self.opened = 0

        @riverbed.event("Opened")
        def open(self) -> None:
            self.opened += 1

    safe = events.get(Safe, "safe-1")
    assert (safe.opened, safe.version) == (1, 2)
    safe.open()
    events.save(safe)
    assert [e.type for e in events.store.read_stream("safe-1")][-1] == "Locker.Opened"
    # Its snapshots too are filed under the old name, which the class had as its own.
    Safe.snapshot_every = 2
    safe.open()
    events.save(safe)
    snapshot = events.store.load_snapshot("safe-1")
    assert snapshot is not None and (snapshot.type, snapshot.version) == ("Locker", 4)
    starts = reads_from(events, monkeypatch)
    assert events.get(Safe, "safe-1").opened == 3 and starts == [5]

    # An event renamed from Shelved (and a DomainEvent from Stocktaken) loads under its new name.
    append_raw(events, "stock-1", "Stock.Created", "Stock.Shelved", "Stock.Stocktaken")

    class Counted(riverbed.DomainEvent):
        event_type = "Stock.Counted"
        event_aliases = ("Stock.Stocktaken",)

        def apply(self, stock: Any) -> None:
            stock.counted = True

    class Stock(riverbed.Aggregate):
        @riverbed.event("Created")
        def __init__(self) -> None:
            self.stored = False
            self.counted = False

        @riverbed.event("Stored", aliases=("Stock.Shelved",))
        def store(self) -> None:
            self.stored = True

    stock = events.get(Stock, "stock-1")
    assert (stock.stored, stock.counted, stock.version) == (True, True, 3)
    assert [e.type for e in events.read()][-2:] == ["Stock.Stored", "Stock.Counted"]
    # An alias another class has (Python 3.11 wraps the error of __set_name__).
    with pytest.raises((EventSourcingError, RuntimeError)) as raised:

        class Vault(riverbed.Aggregate):
            @riverbed.event("Opened", aliases=("Locker.Opened",))
            def __init__(self) -> None:
                pass

    assert "'Locker.Opened' is already registered" in str(raised.value.__cause__ or raised.value)


def test_a_missing_upcaster_is_refused_at_definition() -> None:
    # Python 3.11 wraps errors of __set_name__ in a RuntimeError; later versions do not.
    with pytest.raises((riverbed.RiverbedError, RuntimeError)) as raised:

        class Shipment(riverbed.Aggregate):
            @riverbed.event("Created", version=2)
            def __init__(self, carrier: str) -> None:
                self.carrier = carrier

    error = raised.value.__cause__ or raised.value
    assert isinstance(error, riverbed.RiverbedError)
    assert "no upcaster from version 1" in str(error)


def test_crypto_shredding_erases_personal_fields_only(events: EventSourcing) -> None:
    order = place()
    for sku in ("a", "b", "c"):
        order.add_line(sku)  # version 4: a snapshot at 3, sealed with the stream's key
    events.save(order)
    stored = events.store.read_stream(order.id)[0]
    assert b"ada@example.com" not in stored.data
    assert events.get(Order, order.id).email == "ada@example.com"

    assert events.store.delete_stream_key(order.id)
    shredded = events.get(Order, order.id)
    assert shredded.email == riverbed.ERASED
    assert (shredded.customer, shredded.lines, shredded.version) == ("ada", ["a", "b", "c"], 4)
    placed = events.read()[0].event
    assert placed.email == riverbed.ERASED and placed.customer == "ada"


def test_an_unknown_event_type_names_the_type_and_position(events: EventSourcing) -> None:
    events.store.append([StreamAppend("legacy", 0, [NewEvent(
        str(uuid.uuid4()), "legacy", 1, "Legacy.Removed", 1, msgspec.msgpack.encode({}),
        msgspec.msgpack.encode({}), 1,
    )])])  # fmt: skip
    with pytest.raises(riverbed.UnknownEventTypeError) as raised:
        events.read()
    assert "type 'Legacy.Removed' at position 1" in str(raised.value)


def test_an_event_over_what_a_store_takes_is_refused_with_nothing_saved(
    events: EventSourcing, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(repository, "MAX_EVENT_BYTES", 2000)  # 900 MB: PostgreSQL's 1 GiB
    order = place()
    order.add_line("x" * 3000)
    with pytest.raises(EventSourcingError, match=(
        r"event Order.LineAdded of '\w+' \(version 2\) is 3,\d+ bytes encoded, over the 2,000 an "
        r"event store takes; keep large data elsewhere"
    )):  # fmt: skip
        events.save(order)
    assert events.store.last_position() == 0


def test_a_payload_that_no_longer_decodes_is_a_clear_error(events: EventSourcing) -> None:
    events.store.append([StreamAppend("p-1", 0, [NewEvent(
        str(uuid.uuid4()), "p-1", 1, "Payment.Requested", 1,
        msgspec.msgpack.encode({"order_id": 5}), msgspec.msgpack.encode({}), 1,
    )])])  # fmt: skip
    with pytest.raises(riverbed.EventDecodeError, match=r"Payment\.Requested at position 1"):
        events.get(Payment, "p-1")


def test_async_save_load_and_command(events: EventSourcing) -> None:
    async def main() -> Order:
        order = place()
        assert await events.save_async(order) == 1
        await events.handle_async(Order, order.id, lambda o: o.add_line("async"))
        loaded = await events.get_async(Order, order.id)
        assert await events.save_async(loaded) == 2  # nothing new: the last position
        raced = []

        def decide(current: Order) -> None:
            if not raced:  # another writer saves between the load and the save, once
                rival = events.get(Order, order.id)
                rival.add_line("rival")
                events.save(rival)
                raced.append(True)
            current.add_line("mine")

        retried, _ = await events.handle_async(Order, order.id, decide)
        assert retried.lines == ["async", "rival", "mine"]
        await events.close_async()
        return loaded

    loaded = asyncio.run(main())
    assert loaded.lines == ["async"]
    assert loaded.email == "ada@example.com"


def test_async_commands_may_await_and_sync_ones_refuse_a_coroutine(
    events: EventSourcing,
) -> None:
    order = place()
    events.save(order)

    async def decide(current: Order) -> None:
        await asyncio.sleep(0)
        current.add_line("awaited")

    async def main() -> None:
        handled, position = await events.handle_async(Order, order.id, decide)
        assert handled.lines == ["awaited"] and position == 2
        await events.close_async()

    asyncio.run(main())
    with pytest.raises(TypeError, match=r"is async: await app\.events\.handle_async"):
        events.handle(Order, order.id, decide)
    assert events.get(Order, order.id).lines == ["awaited"]


def test_each_event_loop_gets_its_own_async_store(events: EventSourcing, store_url: str) -> None:
    order = place()

    async def first_use() -> None:  # racing to open the store: one is kept, none is leaked
        stores = await asyncio.gather(*(events.async_store() for _ in range(5)))
        assert len({id(store) for store in stores}) == 1
        await events.save_async(order)

    async def later() -> Order:  # another loop, as in one test per loop under pytest-asyncio
        loaded = await events.get_async(Order, order.id)
        await events.close_async()
        return loaded

    asyncio.run(first_use())  # left open: its loop is closed now
    assert asyncio.run(later()).customer == "ada"
    assert asyncio.run(later()).customer == "ada"

    async def opened() -> object:
        return await events.async_store()

    # SQLite's runs the sync store's calls in threads, for every loop: nothing to leak. Both
    # kept: the first one's id may be the second's once it is freed.
    first, second = asyncio.run(opened()), asyncio.run(opened())
    assert (first is second) == store_url.startswith("sqlite")


def test_event_loops_that_end_without_close_async_leave_no_connections_open(
    postgres_url: str,
) -> None:
    name = f"loops_{uuid.uuid4().hex[:8]}"
    events = EventSourcing("shop", f"{postgres_url}?schema={name}&application_name={name}")

    async def save_one() -> None:
        await events.save_async(place())

    try:
        for _ in range(6):
            asyncio.run(save_one())  # a loop per test under pytest-asyncio, say
        gc.collect()
        with psycopg.connect(postgres_url) as admin:
            (count,) = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,)
            ).fetchone() or (0,)
        assert count <= 2  # the last loop's, not every loop's
    finally:
        events.close()


def test_calls_racing_to_open_a_loops_store_open_one(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = EventSourcing("shop", f"{postgres_url}?schema=open_{uuid.uuid4().hex[:8]}")
    order = place()
    events.save(order)
    opened: list[str | None] = []
    connect = repository.connect_async_store

    async def counted(url: str | None) -> Any:
        opened.append(url)
        return await connect(url)

    monkeypatch.setattr(repository, "connect_async_store", counted)

    async def first_calls() -> None:
        try:
            loaded = await asyncio.gather(*(events.get_async(Order, order.id) for _ in range(20)))
            assert {o.version for o in loaded} == {order.version}
        finally:
            await events.close_async()

    try:
        asyncio.run(first_calls())
        assert len(opened) == 1  # each call opened a pool of its own, beyond pool_size
    finally:
        events.close()


def test_calls_cancelled_while_their_loops_store_opens_leave_no_pool_running(
    postgres_url: str,
) -> None:
    events = EventSourcing("shop", f"{postgres_url}?schema=open_{uuid.uuid4().hex[:8]}")
    order = place()
    events.save(order)

    async def cancelled_calls() -> set[asyncio.Task[Any]]:
        for step in range(20):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(events.get_async(Order, order.id), timeout=step / 1000)
        await events.close_async()
        return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]

    try:
        assert asyncio.run(cancelled_calls()) == set()  # a pool's workers ran on
    finally:
        events.close()


def test_a_store_opening_as_use_url_replaces_its_url_is_closed_by_close_async(
    postgres_url: str,
) -> None:
    first, second = (f"{postgres_url}?schema=open_{uuid.uuid4().hex[:8]}" for _ in range(2))
    events = EventSourcing("shop", first)

    async def switched_while_opening() -> list[Any]:
        opening = asyncio.create_task(events.async_store())
        await asyncio.sleep(0)
        events.use_url(second)
        stores = await asyncio.gather(opening, events.async_store())
        await events.close_async()
        return stores

    try:
        for _ in range(3):  # either opening may end first
            stores = asyncio.run(switched_while_opening())
            assert [store._pool.closed for store in stores] == [True, True]
            events.use_url(first)
    finally:
        events.close()


LOOP_ENDING_MID_GROWTH = """
import asyncio, os, sys, threading, time
import riverbed
from riverbed.eventsourcing import EventSourcing

class Crate(riverbed.Aggregate):
    @riverbed.event("Made")
    def __init__(self) -> None:
        self.kicks = 0

    @riverbed.event("Kicked")
    def kick(self) -> None:
        self.kicks += 1

events = EventSourcing("crates", sys.argv[1])
crate = Crate()
events.save(crate)

async def main() -> None:
    await events.handle_async(Crate, crate.id, lambda c: c.kick())
    # Calls at once: the pool grows, and is still connecting when the loop ends.
    await asyncio.gather(*(events.get_async(Crate, crate.id) for _ in range(8)))

threading.Thread(target=lambda: (time.sleep(20), os._exit(3)), daemon=True).start()
asyncio.run(main())
print("returned")
"""


def test_a_loop_that_ends_while_the_async_pool_grows_ends(postgres_url: str) -> None:
    for attempt in range(3):  # it hung in 5 runs of 6
        result = subprocess.run(
            [sys.executable, "-c", LOOP_ENDING_MID_GROWTH,
             f"{postgres_url}?schema=loops_{uuid.uuid4().hex[:8]}"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert (result.returncode, result.stdout) == (0, "returned\n"), (attempt, result.stderr)


def test_commands_racing_for_one_aggregate_in_one_process_take_turns(
    events: EventSourcing,
) -> None:
    order = place()
    events.save(order)

    def add_line() -> None:  # no retries: a command that conflicted would fail
        events.handle(Order, order.id, lambda o: o.add_line("thread"), retries=0)

    threads = [threading.Thread(target=add_line) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    async def race() -> list[BaseException | tuple[Any, int]]:
        commands = [
            events.handle_async(Order, order.id, lambda o: o.add_line("task"), retries=0)
            for _ in range(30)
        ]
        try:
            return await asyncio.gather(*commands, return_exceptions=True)
        finally:
            await events.close_async()

    assert [r for r in asyncio.run(race()) if isinstance(r, BaseException)] == []
    assert events.get(Order, order.id).lines.count("thread") == 20
    assert events.get(Order, order.id).version == 1 + 20 + 30


def test_sync_commands_and_those_of_several_event_loops_take_turns_too(
    events: EventSourcing,
) -> None:
    order = place()
    events.save(order)

    def slow_line(o: Order) -> None:  # long enough for the others to load the same version
        time.sleep(0.05)
        o.add_line("slow")

    failed: list[BaseException] = []

    def sync_command() -> None:
        try:
            events.handle(Order, order.id, slow_line, retries=0)
        except BaseException as error:
            failed.append(error)

    def loop_of_commands() -> None:
        async def commands() -> None:
            try:
                results = await asyncio.gather(
                    *(events.handle_async(Order, order.id, slow_line, retries=0) for _ in range(2)),
                    return_exceptions=True,
                )
                failed.extend(r for r in results if isinstance(r, BaseException))
            finally:
                await events.close_async()

        asyncio.run(commands())

    threads = [threading.Thread(target=f) for f in (sync_command, loop_of_commands) * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failed == []
    assert events.get(Order, order.id).lines.count("slow") == 6


def test_a_sync_command_on_an_event_loops_thread_does_not_wait_for_its_tasks_turn(
    events: EventSourcing, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(turns, "TURN_WAIT_S", 30.0)  # a wait would block the holder too
    order = place()
    events.save(order)

    async def sync_beside_async() -> None:
        async def slow(o: Order) -> None:
            await asyncio.sleep(0.05)
            o.add_line("task")

        task = asyncio.create_task(events.handle_async(Order, order.id, slow))
        await asyncio.sleep(0.01)  # the task holds the turn
        events.handle(Order, order.id, lambda o: o.add_line("sync"))  # goes ahead at once
        await task  # which meets the sync command's event and retries
        await events.close_async()

    asyncio.run(asyncio.wait_for(sync_beside_async(), 10))
    assert sorted(events.get(Order, order.id).lines) == ["sync", "task"]


def test_a_command_cancelled_as_its_turn_comes_does_not_run(events: EventSourcing) -> None:
    order = place()
    events.save(order)

    async def cancelled_as_given() -> None:
        release = asyncio.Event()

        async def holding(o: Order) -> None:
            o.add_line("first")
            await release.wait()

        first = asyncio.create_task(events.handle_async(Order, order.id, holding))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(
            events.handle_async(Order, order.id, lambda o: o.add_line("second"))
        )
        await asyncio.sleep(0.05)  # waiting for its turn
        release.set()
        await first  # which hands the turn on: in the same step as the cancel
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        third = await events.handle_async(Order, order.id, lambda o: o.add_line("third"))
        assert third[0].lines[-2:] == ["first", "third"]  # the turn was passed on
        await events.close_async()

    asyncio.run(cancelled_as_given())
    assert "second" not in events.get(Order, order.id).lines


def test_a_command_waiting_for_another_on_its_aggregate_goes_ahead(
    events: EventSourcing, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(turns, "TURN_WAIT_S", 0.2)
    order = place()
    events.save(order)

    def in_a_thread(o: Order) -> None:  # the thread's command waits for this one's turn
        if not o.lines:
            thread = threading.Thread(
                target=lambda: events.handle(Order, order.id, lambda i: i.add_line("inner"))
            )
            thread.start()
            thread.join()
        o.add_line("outer")

    events.handle(Order, order.id, in_a_thread)  # the inner saved first: the outer retried
    assert events.get(Order, order.id).lines == ["inner", "outer"]

    def nested(o: Order) -> None:  # in the same thread: its turn is the outer's
        if "nested" not in o.lines:
            events.handle(Order, order.id, lambda inner: inner.add_line("nested"))
        o.add_line("after")

    events.handle(Order, order.id, nested)

    async def served() -> None:
        requests: asyncio.Queue[None] = asyncio.Queue()
        done: asyncio.Queue[None] = asyncio.Queue()

        async def server() -> None:  # a task started before the command: not its child
            await requests.get()
            await events.handle_async(Order, order.id, lambda inner: inner.add_line("served"))
            await done.put(None)

        task = asyncio.create_task(server())

        async def ask(o: Order) -> None:
            if "served" not in o.lines:
                await requests.put(None)
                await done.get()
            o.add_line("asked")

        try:
            await events.handle_async(Order, order.id, ask)
            await task
        finally:
            await events.close_async()

    asyncio.run(served())
    assert events.get(Order, order.id).lines[2:] == ["nested", "after", "served", "asked"]


def test_given_when_then() -> None:
    placed = Order.Placed(  # type: ignore[attr-defined]
        customer="ada", email="a@x", total=Money(Decimal(1), "EUR"), placed_at=NOW
    )
    order = scenario(Order).given(placed).when(lambda o: o.pay()).then(Order.Paid())  # type: ignore[attr-defined]
    assert order.status == "paid"
    scenario(Order).given(placed, Order.Paid()).when(lambda o: o.pay()).then_raises(  # type: ignore[attr-defined]
        ValueError, "cannot be paid"
    )
    scenario(Order).given(placed).when(lambda o: o.ship("dhl")).then(OrderShipped(carrier="dhl"))
    requested = Payment.Requested(order_id="o-1", amount=Decimal(1))  # type: ignore[attr-defined]
    with pytest.raises(AssertionError, match=r"Payment\.Requested is an event of another"):
        scenario(Order).given(requested)
    with pytest.raises(AssertionError, match=(
        r"expected ValueError matching '', but the command raised nothing and recorded "
        r"\[Order\.Paid\(\)\]"
    )):  # fmt: skip
        scenario(Order).given(placed).when(lambda o: o.pay()).then_raises(ValueError)


def test_event_type_names_are_unique() -> None:
    with pytest.raises(riverbed.RiverbedError, match="already registered"):
        registry.register("Order.Placed", dict)


BILLING_ORDER = """
class Order(riverbed.Aggregate):
    @riverbed.event("Placed")
    def __init__(self, customer: str) -> None:
        self.customer = customer
"""


def test_an_event_type_of_another_module_is_refused() -> None:
    # A second `Order` with a `Placed` event would name its stored events like the first's.
    with pytest.raises(EventSourcingError) as raised:
        exec(BILLING_ORDER, {"__name__": "billing", "riverbed": riverbed})
    assert "tests.eventsourcing.shop.Order.Placed, so billing.Order.Placed cannot" in str(
        raised.value
    )
    placed = Order.Placed(  # type: ignore[attr-defined]
        customer="ada", email="a@x", total=Money(Decimal(1), "EUR"), placed_at=NOW
    )
    assert registry.of(placed).cls.__module__ == "tests.eventsourcing.shop"  # untouched


def test_an_event_type_of_another_class_of_the_module_is_refused() -> None:
    class Bill(riverbed.Aggregate):
        @riverbed.event("Issued")
        def __init__(self, amount: int) -> None:
            self.amount = amount

    # Invoice's events would be stored as Bill's, which could then not load.
    with pytest.raises((EventSourcingError, RuntimeError)) as raised:

        class Invoice(riverbed.Aggregate):
            stored_name = "Bill"

            @riverbed.event("Issued")
            def __init__(self, customer: str) -> None:
                self.customer = customer

    message = str(raised.value.__cause__ or raised.value)
    assert "event type 'Bill.Issued' is already recorded by tests.eventsourcing.test_aggregat" in (
        message
    )
    assert registry.of(Bill.Issued(amount=1)).aggregate is Bill  # type: ignore[attr-defined]


def test_a_scripts_event_types_may_be_registered_again_under_its_module_name() -> None:
    # `python billing.py` defines them in __main__; `import billing` somewhere defines them again.
    for module in ("__main__", "billing_script"):
        exec(BILLING_ORDER.replace("Order", "Invoice"), {"__name__": module, "riverbed": riverbed})


def test_a_scripts_event_type_is_refused_to_another_files_class(tmp_path: Path) -> None:
    (tmp_path / "billing.py").write_text("import riverbed\n" + BILLING_ORDER)
    script = "import riverbed\n" + BILLING_ORDER + "\nimport {}\nprint('imported')\n"
    (tmp_path / "own.py").write_text(script.format("own"))  # itself, by its module name
    (tmp_path / "other.py").write_text(script.format("billing"))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.getcwd()}"}
    ran = {}
    for name in ("own", "other"):
        command = [sys.executable, f"{name}.py"]
        ran[name] = subprocess.run(
            command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
    assert ran["own"].returncode == 0, ran["own"].stderr  # imported itself: the same classes
    assert ran["other"].returncode == 1
    assert "event type 'Order.Placed' is already registered for __main__.Order" in (
        ran["other"].stderr
    )


def test_handle_refuses_a_retry_count_that_is_not_one(events: EventSourcing) -> None:
    order = Order.create("ann", "ann@x", Money(Decimal("5"), "EUR"), NOW)
    events.save(order)
    for retries in (-1, "3", 1.5):
        with pytest.raises(ValueError, match=r"retries=.*: give how many times"):
            events.handle(Order, order.id, lambda o: o.pay(), retries=retries)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"retries=.*: give how many times"):
            asyncio.run(events.handle_async(Order, order.id, lambda o: o.pay(), retries=retries))  # type: ignore[arg-type]
    assert events.get(Order, order.id).version == 1


def test_an_event_stored_by_a_newer_release_is_refused_not_misread(events: EventSourcing) -> None:
    class Gauge(riverbed.Aggregate):
        @riverbed.event("Read")
        def __init__(self, amount: int) -> None:
            self.amount = amount

    data, meta = msgspec.msgpack.encode({"amount": 700}), msgspec.msgpack.encode({})
    events.store.append([StreamAppend("g1", 0, [
        NewEvent(str(uuid.uuid4()), "g1", 1, "Gauge.Read", 2, data, meta, 1)
    ])])  # fmt: skip
    with pytest.raises(EventDecodeError, match="at position 1 was stored at version 2, newer"):
        events.get(Gauge, "g1")


def test_an_upcaster_that_returns_no_dict_is_named(events: EventSourcing) -> None:
    append_raw(events, "m1", "Meter.Read", payload={"value": 1})

    class Meter(riverbed.Aggregate):
        @riverbed.event("Read", version=2, upcasters={1: lambda data: None})
        def __init__(self, value: int) -> None:
            self.value = value

    with pytest.raises(EventDecodeError, match="upcaster from version 1 returned NoneType"):
        events.get(Meter, "m1")


def test_a_subclass_that_records_an_event_of_its_own_names_its_own_payload() -> None:
    class Plan(riverbed.Aggregate):
        @riverbed.event("Chosen")
        def __init__(self, name: str) -> None:
            self.name = name

    class PremiumPlan(Plan):
        @riverbed.event("Chosen")
        def __init__(self, name: str, seats: int = 1) -> None:
            self.name = name
            self.seats = seats

    assert PremiumPlan.Chosen is not Plan.Chosen  # type: ignore[attr-defined]
    assert PremiumPlan.Chosen.__name__ == "PremiumPlan.Chosen"  # type: ignore[attr-defined]


def test_a_cancelled_async_call_gives_its_connection_back(postgres_url: str) -> None:
    events = EventSourcing("shop", f"{postgres_url}?schema=cancelled_{uuid.uuid4().hex[:8]}")

    async def cancel_while_the_connection_goes_back() -> dict[str, int]:
        store = await events.async_store()
        pool = store._pool  # type: ignore[attr-defined]
        putconn, returning = pool.putconn, asyncio.Event()

        async def slow_putconn(conn: Any) -> None:
            returning.set()
            await asyncio.sleep(0.05)
            await putconn(conn)

        pool.putconn = slow_putconn
        save = asyncio.create_task(events.save_async(place()))
        await returning.wait()
        save.cancel()
        with pytest.raises(asyncio.CancelledError):
            await save
        for _ in range(100):  # the shielded return goes on beside the cancelled task
            stats: dict[str, int] = pool.get_stats()
            if stats["pool_available"] == stats["pool_size"]:
                break
            await asyncio.sleep(0.05)
        await events.close_async()
        return stats

    try:
        stats = asyncio.run(cancel_while_the_connection_goes_back())
    finally:
        events.close()
    assert stats["pool_available"] == stats["pool_size"]


def test_use_url_moves_async_calls_too(postgres_url: str) -> None:
    first, second = (f"{postgres_url}?schema=moved_{uuid.uuid4().hex[:8]}" for _ in range(2))
    events = EventSourcing("shop", first)

    async def save_before_and_after_the_move() -> None:
        await events.save_async(place())
        events.use_url(second)
        order = place()
        await events.save_async(order)
        assert (await events.get_async(Order, order.id)).id == order.id
        await events.close_async()

    try:
        asyncio.run(save_before_and_after_the_move())
        assert len(events.store.read_all()) == 1  # the second store's
    finally:
        events.close()
