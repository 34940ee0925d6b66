"""What an event method accepts: no events recorded from inside an event's body, arguments that
match its annotations (what will load back), and ids that a store keeps as they are."""

from __future__ import annotations

import asyncio
import enum
import importlib
import inspect
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import msgspec
import pytest

import riverbed
from riverbed.eventsourcing import EventSourcing, scenario
from riverbed.eventsourcing.errors import EventSourcingError
from riverbed.eventsourcing.records import NewEvent, StreamAppend

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


class Stamped(riverbed.DomainEvent):
    event_type = "Nest.Stamped"

    def apply(self, nest: Any) -> None:
        nest.log.append("stamped")
        nest.check()  # records from an apply: refused like from a body


class Nest(riverbed.Aggregate):
    @riverbed.event("Opened")
    def __init__(self) -> None:
        self.log: list[str] = []

    @riverbed.event("Checked")
    def check(self) -> None:
        self.log.append("checked")

    @riverbed.event("Closed")
    def close(self) -> None:
        self.check()
        self.log.append("closed")

    @riverbed.event("Sealed")
    def seal(self) -> None:
        self.trigger(Stamped())

    def finish(self) -> None:
        """The remedy: a plain method that records one event after the other."""
        self.check()
        self._finished()

    @riverbed.event("Finished")
    def _finished(self) -> None:
        self.log.append("finished")


def test_an_event_recorded_while_another_is_applied_is_refused(events: EventSourcing) -> None:
    nest = Nest.create()
    for command, inner, outer in [
        (nest.close, "Nest.Checked", "Nest.Closed"),
        (nest.seal, "Nest.Stamped", "Nest.Sealed"),
        (lambda: nest.trigger(Stamped()), "Nest.Checked", "Nest.Stamped"),
    ]:
        with pytest.raises(EventSourcingError) as raised:
            command()
        assert f"{inner} recorded while applying {outer}" in str(raised.value)
        assert "plain, undecorated method" in str(raised.value)
        assert (nest.version, [r.type.name for r in nest.pending]) == (1, ["Nest.Opened"])

    nest.log.clear()  # the refused apply had appended before it recorded
    nest.finish()  # the guard is lifted after a refusal
    events.save(nest)  # no ConcurrencyError: the pending events match the versions
    loaded = events.get(Nest, nest.id)
    assert (loaded.version, loaded.log) == (3, ["checked", "finished"])
    # Replaying runs the body again, and is refused the same way.
    with pytest.raises(
        EventSourcingError, match=r"Nest\.Checked recorded while applying Nest\.Closed"
    ):
        scenario(Nest).given(Nest.Opened(), Nest.Closed())  # type: ignore[attr-defined]


class Tip(riverbed.DomainEvent):
    event_type = "Wallet.Tipped"
    amount: int

    def apply(self, wallet: Any) -> None:
        wallet.entries.append(self.amount)


class Wallet(riverbed.Aggregate):
    @riverbed.event("Opened")
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.entries: list[Any] = []

    @riverbed.event("Credited")
    def credit(self, amount: int) -> None:
        self.entries.append(amount)

    @riverbed.event("Noted")
    def note(self, text) -> None:  # type: ignore[no-untyped-def]  # Any: whatever encodes
        self.entries.append(text)


def refused(message: str) -> pytest.RaisesExc[TypeError]:
    return pytest.raises(TypeError, match=re.escape(message))


def test_arguments_that_would_not_load_back_are_refused_before_the_body_runs() -> None:
    with refused("Wallet.Opened: Expected `str`, got `int` - at `$.owner`"):
        Wallet(5)  # type: ignore[arg-type]
    wallet = Wallet("ada")
    with refused("Wallet.Credited: Expected `int`, got `str` - at `$.amount`"):
        wallet.credit("100")  # type: ignore[arg-type]
    with refused("Wallet.Credited: Expected `int`, got `bool` - at `$.amount`"):
        wallet.credit(True)
    with refused("Wallet.Noted: objects of type object are not supported - at `$.text`"):
        wallet.note(object())
    with refused("Wallet.Noted: can't serialize ints < -2**63 or > 2**64 - 1 - at `$.text`"):
        wallet.note(2**70)
    with refused("Wallet.Tipped: Expected `int`, got `str` - at `$.amount`"):
        wallet.trigger(Tip(amount="5"))  # type: ignore[arg-type]
    assert (wallet.entries, wallet.version, len(wallet.pending)) == ([], 1, 1)

    wallet.credit(100)
    wallet.note({"any": ["thing", 1, None]})
    wallet.trigger(Tip(amount=5))
    assert wallet.entries == [100, {"any": ["thing", 1, None]}, 5]


@dataclass(frozen=True)
class Address:
    street: str
    city: str


class Price(msgspec.Struct, frozen=True):
    amount: Decimal
    currency: str


class Line(msgspec.Struct, frozen=True):
    sku: str
    price: Price


class Kit(riverbed.Aggregate):
    @riverbed.event("Ordered")
    def __init__(
        self,
        email: Annotated[str, riverbed.Personal],
        ship_to: Address,
        lines: list[Line],
        total: Decimal,
        at: datetime,
        ref: uuid.UUID,
        note: str | None = None,
    ) -> None:
        self.email, self.ship_to, self.lines = email, ship_to, lines
        self.total, self.at, self.ref, self.note = total, at, ref, note


def test_payloads_of_custom_types_are_accepted_and_load_back(events: EventSourcing) -> None:
    address, ref = Address("Main St 1", "Oslo"), uuid.uuid4()
    lines = [Line("a", Price(Decimal("2.50"), "EUR")), Line("b", Price(Decimal(10), "EUR"))]
    wrong = [lines[0], Line("b", Price("ten", "EUR"))]  # type: ignore[arg-type]
    with refused("Kit.Ordered: Invalid decimal string - at `$.lines[1].price.amount`"):
        Kit.create("ada@example.com", address, wrong, Decimal("12.50"), NOW, ref)
    with refused("Kit.Ordered: Expected `str | null`, got `int` - at `$.note`"):
        Kit.create("ada@example.com", address, lines, Decimal("12.50"), NOW, ref, 7)

    kit = Kit.create("ada@example.com", address, lines, Decimal("12.50"), NOW, ref)
    other = Kit.create("bob@example.com", address, [], Decimal(0), NOW, ref, note="gift")
    events.save(kit, other)
    loaded = events.get(Kit, kit.id)
    assert (loaded.email, loaded.ship_to, loaded.lines) == ("ada@example.com", address, lines)
    assert (loaded.total, loaded.at, loaded.ref, loaded.note) == (Decimal("12.50"), NOW, ref, None)
    assert events.get(Kit, other.id).note == "gift"


def test_an_id_that_is_empty_not_a_str_holds_a_nul_or_is_too_long_is_refused(
    events: EventSourcing,
) -> None:
    message = "an aggregate id is a non-empty str without NUL characters"
    too_long = "an aggregate id is at most 1,000 bytes in UTF-8, got 1,002"
    for bad, refusal in [("", message), ("a\x00X", message), (42, message), ("é" * 501, too_long)]:
        with pytest.raises(ValueError, match=rf"Wallet\.create: {refusal}"):
            Wallet.create("ada", id=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=rf"get\(Wallet, id\): {refusal}"):
            events.get(Wallet, bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=refusal):
            asyncio.run(events.get_async(Wallet, bad))  # type: ignore[arg-type]
    wallet = Wallet.create("ada", id="wallet-1")
    wallet.id = "a\x00X"  # set by hand
    with pytest.raises(ValueError, match=rf"save: {message}"):
        events.save(wallet)
    assert events.read() == []
    assert Wallet.create("ada").id  # None: a generated id
    longest = "é" * 500  # 1,000 bytes: stored on both stores
    events.save(Wallet.create("ada", id=longest))
    assert events.get(Wallet, longest).id == longest


# The body applies the event as a load will


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Basket(riverbed.Aggregate):
    snapshot_every = 100

    @riverbed.event("Filled")
    def __init__(
        self, email: Annotated[str, riverbed.Personal], lines: list[str], color: Color,
        price: Decimal, at: datetime, tags: tuple[str, ...],
    ) -> None:  # fmt: skip
        self.email = email
        self.lines = lines  # shares the payload's list, then changes it
        self.color = color
        self.price = price
        self.at = at
        self.tags = tags
        self.red = color is Color.RED

    @riverbed.event("LineAdded")
    def add_line(self, sku: str) -> None:
        self.lines.append(sku)


def test_the_body_applies_the_event_as_stored_and_a_later_one_changes_neither(
    events: EventSourcing,
) -> None:
    lines = ["sku-1"]
    basket = Basket("ada@x", lines, "red", 10, "2026-11-26T12:00:00Z", ["a"])  # type: ignore[arg-type]
    basket.add_line("sku-2")
    assert lines == ["sku-1"]  # the caller's list is not the state's
    assert (basket.color, basket.red, basket.price, basket.at, basket.tags) == (
        Color.RED, True, Decimal("10"), NOW, ("a",)
    )  # fmt: skip
    # The recorded events stay as recorded, before the save and in the store.
    assert [type(e.event).__name__ for e in basket.pending] == ["Basket.Filled", "Basket.LineAdded"]
    assert basket.pending[0].event.lines == ["sku-1"]
    events.save(basket)
    placed = events.read()[0].event
    assert placed.lines == ["sku-1"] and placed.email == "ada@x"
    loaded = events.get(Basket, basket.id)
    state = {k: v for k, v in vars(basket).items() if not k.startswith("_")}
    assert {k: v for k, v in vars(loaded).items() if not k.startswith("_")} == state


FORWARD_MODULE = """
from __future__ import annotations

import msgspec
import riverbed


class Shipment(riverbed.Aggregate):
    @riverbed.event("Packed")
    def __init__(self, line: Line, extra: list[Line] | None = None) -> None:
        self.line = line
        self.extra = extra or []


class Line(msgspec.Struct):  # defined below the aggregate that records it
    sku: str
"""


def test_an_event_method_may_name_a_class_defined_further_down(
    events: EventSourcing, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "forward_shipments.py").write_text(FORWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("forward_shipments")
    shipment = module.Shipment(module.Line("a"), [{"sku": "b"}])
    assert shipment.extra == [module.Line("b")]
    events.save(shipment)
    assert events.get(module.Shipment, shipment.id).line == module.Line("a")


class Courier(riverbed.Aggregate):
    @riverbed.event("Sent")
    def __init__(self, carrier: str = "ups", *, tracking: str) -> None:
        self.carrier, self.tracking = carrier, tracking

    @riverbed.event("Moved")
    def move(self, to: str, /, *, by: str = "road") -> None:
        self.at, self.by = to, by


def test_keyword_only_and_positional_only_parameters_record_and_load(
    events: EventSourcing,
) -> None:
    courier = Courier(tracking="t1")
    courier.move("paris")
    courier.move("rome", by="air")
    events.save(courier)
    loaded = events.get(Courier, courier.id)
    assert (loaded.carrier, loaded.tracking, loaded.at, loaded.by) == ("ups", "t1", "rome", "air")
    with pytest.raises(TypeError, match=r"Courier\.Sent: missing a required argument: 'tracking'"):
        Courier("dhl")


class Fussy(riverbed.Aggregate):
    @riverbed.event("Made")
    def __init__(self, sku: str) -> None:
        if sku.startswith("legacy"):
            raise ValueError(f"bad sku {sku!r}")
        self.sku = sku


def test_a_body_that_fails_on_load_says_which_event(events: EventSourcing) -> None:
    append = StreamAppend("legacy", 0, [NewEvent(
        "e1", "legacy", 1, "Fussy.Made", 1, msgspec.msgpack.encode({"sku": "legacy-1"}),
        msgspec.msgpack.encode({}), 1,
    )])  # fmt: skip
    events.store.append([append])  # stored by an earlier release that allowed it
    with pytest.raises(ValueError, match="bad sku 'legacy-1'") as raised:
        events.get(Fussy, "legacy")
    assert raised.value.__notes__ == [
        "while loading Fussy 'legacy': applying Fussy.Made (version 1, at position 1)"
    ]


def test_bad_arguments_to_save_get_and_event_are_named(events: EventSourcing) -> None:
    nest = Nest()
    with pytest.raises(TypeError, match="save\\(\\) takes aggregates, not <class"):
        events.save(Nest)  # type: ignore[arg-type]
    with pytest.raises(EventSourcingError, match=f"given aggregate '{nest.id}' twice"):
        events.save(nest, nest)
    events.save(nest)
    with pytest.raises(ValueError, match="version='2': give a version >= 1"):
        events.get(Nest, nest.id, version="2")  # type: ignore[arg-type]
    assert events.get(Nest, nest.id, version=2**70).version == 1  # past the end: the end
    with pytest.raises(EventSourcingError, match="'Counted': version=0, give an int >= 1"):
        riverbed.event("Counted", version=0)
    with pytest.raises(EventSourcingError, match="at version 3 but has no upcaster from version 2"):
        riverbed.event("Counted", version=3, upcasters={1: dict})


class Till(riverbed.Aggregate):
    @riverbed.event("Opened")
    def __init__(self) -> None:
        self.total = 0

    @riverbed.event("Rung")
    def ring(self, amount: int, /) -> None:
        self.total += amount

    add = ring  # a second name for the same event method


def test_an_event_method_under_two_names_records_one_event_class(events: EventSourcing) -> None:
    till = Till()
    till.add(5)
    assert isinstance(till.pending[1].event, Till.Rung)  # type: ignore[attr-defined]
    events.save(till)
    assert isinstance(events.read()[1].event, Till.Rung)  # type: ignore[attr-defined]


def test_a_positional_only_parameter_is_refused_by_keyword() -> None:
    with pytest.raises(TypeError, match=r"Till\.Rung: 'amount' parameter is positional only"):
        Till().ring(amount=5)  # type: ignore[call-arg]


class Shelf(riverbed.Aggregate):
    @riverbed.event("Stocked")
    def stock(self, sku: str, count: int = 1) -> None:
        """Put ``count`` of ``sku`` on the shelf."""
        self.sku = sku


def test_an_event_method_on_an_instance_shows_the_method_s_name_signature_and_doc() -> None:
    stock = Shelf().stock
    assert stock.__name__ == "stock"
    assert str(inspect.signature(stock)) == "(sku: 'str', count: 'int' = 1) -> 'None'"
    assert stock.__doc__ == "Put ``count`` of ``sku`` on the shelf."
    stock("apple")
    assert stock.__self__.version == 1
