"""Mistakes a user can make modelling aggregates: refused when the class is defined or the
event recorded, before anything is stored that would not load back as it was recorded."""

from __future__ import annotations

import copy
import pickle
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

import riverbed
from riverbed.eventsourcing import EventSourcing, scenario
from riverbed.eventsourcing.codec import registry
from riverbed.eventsourcing.errors import EventSourcingError
from riverbed.eventsourcing.records import NewEvent, StreamAppend


class Purse(riverbed.Aggregate):
    """Module level, so that its events can be pickled."""

    snapshot_every = 1

    @riverbed.event("Opened")
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.held: list[str] = []

    @riverbed.event("Held")
    def hold(self, item: str) -> None:
        self.held.append(item)  # changed before it refuses
        if item.startswith("!"):
            raise ValueError(f"cannot hold {item}")


def test_two_event_methods_of_one_class_may_not_share_an_event_name() -> None:
    with pytest.raises(EventSourcingError, match=r"Patron\.rename and Patron\.change_email both"):

        class Patron(riverbed.Aggregate):
            @riverbed.event("Changed")
            def rename(self, name: str) -> None:
                self.name = name

            @riverbed.event("Changed")
            def change_email(self, email: str) -> None:
                self.email = email


NESTED_CLASH = """
class Bundle(riverbed.Aggregate):
    class Sent(riverbed.DomainEvent):
        carrier: str

        def apply(self, parcel) -> None:
            parcel.carrier = self.carrier

    @riverbed.event("Sent")
    def refund(self, reason: str) -> None:
        self.reason = reason
"""


def test_a_nested_domain_event_may_not_take_an_event_methods_name() -> None:
    # Both are named Bundle.Sent: a load would run one's apply for the other's events.
    with pytest.raises(EventSourcingError, match="is both a DomainEvent class and an @event"):
        exec(NESTED_CLASH, {"__name__": "parcels", "riverbed": riverbed})


def test_an_event_may_not_take_a_name_its_class_uses() -> None:
    # Its payload class becomes Class.<name>: it would replace Aggregate.pending (every record
    # fails), Aggregate.create, or hide behind the method of the same name.
    with pytest.raises(
        EventSourcingError,
        match=r"@riverbed.event\('pending'\) on Chores.mark_pending: Chores.pending is a "
        r"property of riverbed.eventsourcing.aggregate.Aggregate, and the event's payload",
    ):

        class Chores(riverbed.Aggregate):
            @riverbed.event("pending")
            def mark_pending(self) -> None:
                self.status = "pending"

    with pytest.raises(EventSourcingError, match=r"Kiosk.create is a classmethod of"):

        class Kiosk(riverbed.Aggregate):
            @riverbed.event("create")
            def __init__(self, owner: str) -> None:
                self.owner = owner

    with pytest.raises(EventSourcingError, match=r"Piggy.deposit is this event method"):

        class Piggy(riverbed.Aggregate):
            @riverbed.event("deposit")
            def deposit(self, amount: int) -> None:
                self.amount = amount


def test_a_payload_annotation_out_of_the_modules_reach_is_named() -> None:
    class Coin(msgspec.Struct):  # inside a function, as in a test: out of the module's reach
        cents: int

    class Satchel(riverbed.Aggregate):
        @riverbed.event("Filled")
        def __init__(self, coin: Coin) -> None:
            self.cents = coin.cents

    with pytest.raises(
        EventSourcingError,
        match=r"event Satchel.Filled: the annotation 'Coin' of its payload does not resolve "
        r"in module 'tests.eventsourcing.test_modelling_mistakes'.*define Coin at module level",
    ):
        Satchel(Coin(5))


def test_a_non_empty_mutable_default_is_refused_naming_the_parameter() -> None:
    with pytest.raises(
        EventSourcingError,
        match=r"Tote.__init__: parameter 'tags' defaults to a non-empty list, which every call",
    ):

        class Tote(riverbed.Aggregate):
            @riverbed.event("Opened")
            def __init__(self, tags: list[str] = ["new"]) -> None:  # noqa: B006 - the mistake
                self.tags = tags


def test_an_aggregate_cannot_trigger_another_aggregates_event(events: EventSourcing) -> None:
    class Voucher(riverbed.Aggregate):
        @riverbed.event("Issued")
        def __init__(self, total: int) -> None:
            self.total = total

    class Slip(riverbed.Aggregate):
        @riverbed.event("Printed")
        def __init__(self) -> None:
            self.printed = True

        def copy_invoice(self) -> None:
            self.trigger(Voucher.Issued(total=5))  # type: ignore[attr-defined]

    receipt = Slip()
    with pytest.raises(EventSourcingError, match=r"Slip cannot record .*Voucher\.Issued"):
        receipt.copy_invoice()
    assert len(receipt.pending) == 1
    events.save(receipt)
    assert events.get(Slip, receipt.id).version == 1  # the stream still loads


def test_a_body_that_raised_after_changing_the_state_leaves_no_snapshot(
    events: EventSourcing,
) -> None:
    wallet = Purse("ada")
    with pytest.raises(ValueError, match="cannot hold !x"):
        wallet.hold("!x")  # refused, but its change stays in memory
    wallet.hold("ok")
    events.save(wallet)
    assert events.store.load_snapshot(wallet.id) is None  # it would keep "!x"
    assert events.get(Purse, wallet.id).held == ["ok"]
    loaded = events.get(Purse, wallet.id)
    loaded.hold("more")
    events.save(loaded)  # a state as the events make it: snapshotted again
    snapshot = events.store.load_snapshot(wallet.id)
    assert snapshot is not None and snapshot.version == 3
    assert events.get(Purse, wallet.id).held == ["ok", "more"]


def test_an_aggregates_own_private_attributes_are_its_state(events: EventSourcing) -> None:
    class Siren(riverbed.Aggregate):
        snapshot_every = 1
        _triggered: int  # a name an aggregate may well use
        _body_raised: bool

        @riverbed.event("Installed")
        def __init__(self) -> None:
            self._triggered = 0
            self._body_raised = False

        @riverbed.event("Sounded")
        def sound(self) -> None:
            self._triggered += 1

    siren = Siren()
    siren.sound()
    events.save(siren)
    assert events.store.load_snapshot(siren.id) is not None
    loaded = events.get(Siren, siren.id)  # from the snapshot
    loaded.sound()
    assert (loaded._triggered, loaded._body_raised) == (2, False)


def test_async_and_generator_event_methods_are_refused() -> None:
    async def deposit(self: Any, amount: int) -> None:
        self.balance += amount

    def withdraw(self: Any, amount: int) -> Iterator[int]:
        yield amount

    with pytest.raises(
        EventSourcingError, match=r"on .*deposit: an event's body .* cannot be async"
    ):
        riverbed.event("Deposited")(deposit)
    with pytest.raises(EventSourcingError, match=r"on .*withdraw: an event's body cannot be a gen"):
        riverbed.event("Withdrawn")(withdraw)


def test_aliases_given_as_one_string_are_refused() -> None:
    with pytest.raises(EventSourcingError, match=r"write \('Kiosk\.Paid',\)"):

        class Kiosk(riverbed.Aggregate):
            @riverbed.event("Settled", aliases="Kiosk.Paid")  # type: ignore[arg-type]
            def __init__(self) -> None:
                self.settled = True

    with pytest.raises(EventSourcingError, match=r"write \('Kiosk\.Closed',\)"):

        class Shut(riverbed.DomainEvent):
            event_aliases = "Kiosk.Closed"  # type: ignore[assignment]

    assert "T" not in {
        entry.name for entry in riverbed.eventsourcing.codec.registry._by_name.values()
    }


def test_an_init_event_may_make_its_id_parameter_the_aggregates_id(
    events: EventSourcing,
) -> None:
    class Product(riverbed.Aggregate):
        @riverbed.event("Listed")
        def __init__(self, id: str, name: str) -> None:
            self.id = id  # the natural key
            self.name = name

    events.save(Product(f"sku-{uuid.uuid4()}", "cup"))
    stream = events.read()[-1].stream
    assert events.get(Product, stream).name == "cup" and stream.startswith("sku-")


def test_a_subclass_naming_a_base_event_method_records_the_bases_event(
    events: EventSourcing,
) -> None:
    class Tray(riverbed.Aggregate):
        @riverbed.event("Made")
        def __init__(self) -> None:
            self.items: list[str] = []

        @riverbed.event("Filled")
        def fill(self, item: str) -> None:
            self.items.append(item)

    class BigTray(Tray):
        add = Tray.fill  # the base's event method, under another name

    tray, big = Tray(), BigTray()
    tray.fill("a")
    big.add("b")
    events.save(tray, big)
    assert events.get(Tray, tray.id).items == ["a"]  # still the base's own event
    assert events.get(BigTray, big.id).items == ["b"]


def test_a_decorator_above_event_says_it_must_be_the_outermost() -> None:
    def logged(method: Any) -> Any:
        def logging(*args: Any, **kwargs: Any) -> Any:
            return method(*args, **kwargs)

        return logging

    class Door(riverbed.Aggregate):
        @riverbed.event("Made")
        def __init__(self) -> None:
            self.open = False

        @logged
        @riverbed.event("Opened")
        def open_(self) -> None:
            self.open = True

    with pytest.raises(TypeError, match=r"on .*Door.open_ must be the outermost decorator"):
        Door().open_()


def test_an_aggregate_with_unsaved_events_copies_and_pickles(events: EventSourcing) -> None:
    wallet = Purse("ada")
    wallet.hold("pen")
    for copied in (copy.deepcopy(wallet), pickle.loads(pickle.dumps(wallet))):
        assert (copied.id, copied.version, copied.held) == (wallet.id, 2, ["pen"])
        assert [r.event for r in copied.pending] == [r.event for r in wallet.pending]
    events.save(pickle.loads(pickle.dumps(wallet)))
    assert events.get(Purse, wallet.id).held == ["pen"]


RENAMED = """
class Package(riverbed.Aggregate):
    stored_name = "Hamper"

    @riverbed.event("Packed")
    def __init__(self, size: str) -> None:
        self.size = size

    class Shipped(riverbed.DomainEvent):
        carrier: str

        def apply(self, package) -> None:
            package.carrier = self.carrier

    class Events:
        class Lost(riverbed.DomainEvent):
            def apply(self, package) -> None:
                package.carrier = None
"""


def test_a_renamed_class_keeps_its_nested_domain_events_stored_names(
    events: EventSourcing,
) -> None:
    stream = f"hamper-{uuid.uuid4()}"
    no_metadata = msgspec.msgpack.encode({})
    events.store.append([StreamAppend(stream, 0, [  # written when the class was named Hamper
        NewEvent("e1", stream, 1, "Hamper.Packed", 1, msgspec.msgpack.encode({"size": "l"}),
                 no_metadata, 1),
        NewEvent("e2", stream, 2, "Hamper.Shipped", 1, msgspec.msgpack.encode({"carrier": "ups"}),
                 no_metadata, 1),
    ])])  # fmt: skip
    module: dict[str, Any] = {"__name__": "warehouse", "riverbed": riverbed}
    exec(RENAMED, module)
    package = events.get(module["Package"], stream)
    assert (package.size, package.carrier) == ("l", "ups")
    package.trigger(module["Package"].Shipped(carrier="dhl"))
    events.save(package)
    assert [e.type for e in events.store.read_stream(stream)][-1] == "Hamper.Shipped"
    assert registry.named("Package.Shipped").name == "Hamper.Shipped"  # its old name loads
    assert registry.of_class(module["Package"].Events.Lost).name == "Hamper.Events.Lost"


def test_given_applies_a_copy_of_the_tests_event_as_a_load_would() -> None:
    class Basket(riverbed.Aggregate):
        @riverbed.event("Opened")
        def __init__(self, items: list[str]) -> None:
            self.items = items

        @riverbed.event("Added")
        def add(self, item: str) -> None:
            if item in self.items:
                raise ValueError(f"{item} already in the cart")
            self.items.append(item)

    opened = Basket.Opened(items=[])  # type: ignore[attr-defined]
    for _ in range(2):  # the first scenario leaves the shared event as it was
        scenario(Basket).given(opened).when(lambda c: c.add("apple")).then(Basket.Added("apple"))  # type: ignore[attr-defined]
    assert opened.items == []


def test_scenario_failures_say_what_happened() -> None:
    class Account(riverbed.Aggregate):
        @riverbed.event("Opened")
        def __init__(self) -> None:
            self.balance = 0

        @riverbed.event("Withdrawn")
        def withdraw(self, amount: int) -> None:
            self.balance -= amount

        def close(self) -> None:
            self.withdraw(self.balance)
            raise ValueError("closed (for good)")

    opened = Account.Opened()  # type: ignore[attr-defined]
    refused = scenario(Account).given(opened).when(lambda a: a.close())
    with pytest.raises(AssertionError, match=r"recorded \[.*Account.Withdrawn\(amount=0\)\]$"):
        refused.then_raises(ValueError, r"closed \(for")  # a regular expression, as in pytest

    async def command(account: Any) -> None:
        account.withdraw(5)

    with pytest.raises(TypeError, match="this one is async, so nothing of it ran"):
        scenario(Account).given(opened).when(command)
