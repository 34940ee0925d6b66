"""Snapshots load only what the events would build: a snapshot of other code, another shape of
a state's types or other event versions is ignored, private attributes are kept, a state whose
stream key was deleted since it loaded is not snapshotted, and a snapshot never fails a save."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
import functools
import importlib
import logging
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import msgspec
import pytest

import riverbed
from riverbed.eventsourcing import EventSourcing, snapshots
from riverbed.eventsourcing.errors import EventSourcingError


def deployed(source: str) -> dict[str, Any]:
    """A module's classes as one release of it defines them: each release's classes have the
    same module and names, as after a redeploy."""
    namespace: dict[str, Any] = {"__name__": "tests.eventsourcing.ledger_release"}
    # Not inheriting this module's postponed annotations, which would look for the module.
    exec(compile(textwrap.dedent(source), "<release>", "exec", dont_inherit=True), namespace)
    return namespace


RELEASE_1 = """
    import msgspec
    import riverbed

    def to_cents(data):
        return {"amount": 100 * data["amount"]}

    class Money(msgspec.Struct):
        amount: int

    class Ledger(riverbed.Aggregate):
        snapshot_every = 2
        total: Money

        @riverbed.event("Opened")
        def __init__(self, owner: str) -> None:
            self.owner = owner
            self.total = Money(0)
            self._closed = False

        @riverbed.event("Credited")
        def credit(self, amount: int) -> None:
            self.total = Money(self.total.amount + amount)

        @riverbed.event("Closed")
        def close(self) -> None:
            self._closed = True
"""


def saved_in_release_1(events: EventSourcing) -> str:
    ledger = deployed(RELEASE_1)["Ledger"]("ada")
    ledger.credit(5)
    events.save(ledger)
    assert events.store.load_snapshot(ledger.id) is not None
    return str(ledger.id)


def test_private_attributes_are_part_of_a_snapshot(events: EventSourcing) -> None:
    ledger = deployed(RELEASE_1)["Ledger"]("ada")
    ledger.close()
    events.save(ledger)
    assert events.store.load_snapshot(ledger.id) is not None
    assert events.get(type(ledger), ledger.id)._closed is True


def test_a_snapshot_of_other_code_is_ignored(events: EventSourcing) -> None:
    ledger_id = saved_in_release_1(events)
    release_2 = deployed(RELEASE_1.replace(
        "self._closed = False", "self._closed = False\n            self.discount = 0"
    ))  # fmt: skip
    loaded = events.get(release_2["Ledger"], ledger_id)
    assert loaded.discount == 0  # replayed by the new __init__, not loaded without it


def test_a_snapshot_of_another_shape_of_a_states_type_is_ignored(events: EventSourcing) -> None:
    ledger_id = saved_in_release_1(events)
    # Release 2 renames Money's field, the Ledger's code unchanged.
    cents = (
        "cents: int = 0\n\n        @property\n        def amount(self):\n"
        "            return self.cents\n"
    )
    release_2 = deployed(RELEASE_1.replace("amount: int\n", cents))
    assert events.get(release_2["Ledger"], ledger_id).total.cents == 5


def test_a_snapshot_of_older_event_versions_is_ignored(events: EventSourcing) -> None:
    ledger_id = saved_in_release_1(events)
    # Release 2 counts in cents: the same bodies, Credited at version 2, old amounts upcast.
    release_2 = deployed(RELEASE_1.replace(
        '@riverbed.event("Credited")',
        '@riverbed.event("Credited", version=2, upcasters={1: to_cents})',
    ))  # fmt: skip
    assert events.get(release_2["Ledger"], ledger_id).total.amount == 500


def test_a_snapshot_is_ignored_once_an_events_upcaster_changed(events: EventSourcing) -> None:
    ledger_id = saved_in_release_1(events)
    upcasting = RELEASE_1.replace(
        '@riverbed.event("Credited")',
        '@riverbed.event("Credited", version=2, upcasters={1: to_cents})',
    )
    ledger = events.get(deployed(upcasting)["Ledger"], ledger_id)
    ledger.credit(1)
    ledger.credit(1)
    events.save(ledger)  # a snapshot at version 4: 502 cents
    assert events.store.load_snapshot(ledger_id).version == 4  # type: ignore[union-attr]
    # Release 3 fixes the upcaster only (a function, not the aggregate's code).
    fixed = deployed(upcasting.replace("100 * data", "1000 * data"))
    assert events.get(fixed["Ledger"], ledger_id).total.amount == 5002


def test_a_snapshot_never_fails_a_save(
    events: EventSourcing, caplog: pytest.LogCaptureFixture
) -> None:
    class Huge(riverbed.Aggregate):
        snapshot_every = 1

        @riverbed.event("Grown")
        def __init__(self) -> None:
            self.size = 2**70  # msgpack holds 64 bits

    huge = Huge()
    with caplog.at_level(logging.WARNING):
        events.save(huge)
    assert [e.type for e in events.read()] == ["Huge.Grown"] and huge.pending == []
    assert "no snapshots of" in caplog.text and "Huge" in caplog.text
    assert events.get(Huge, huge.id).size == 2**70


def test_a_snapshot_every_that_is_not_a_count_is_refused_at_definition() -> None:
    for every in ("2", 0, -1, 2.5, True):
        with pytest.raises(EventSourcingError, match=r"snapshot_every = .*: give a number"):

            class Bad(riverbed.Aggregate):
                snapshot_every = every  # type: ignore[assignment]


def test_a_snapshot_every_set_wrong_later_fails_no_save(
    events: EventSourcing, caplog: pytest.LogCaptureFixture
) -> None:
    class Counted(riverbed.Aggregate):
        @riverbed.event("Counted")
        def count(self) -> None:
            pass

    Counted.snapshot_every = "2"  # type: ignore[assignment]
    counted = Counted()
    counted.count()
    with caplog.at_level(logging.WARNING):
        events.save(counted)
    assert counted.pending == []  # saved: the next save does not conflict
    counted.count()
    events.save(counted)
    assert events.get(Counted, counted.id).version == 2
    assert "Counted.snapshot_every = '2': give a number of events >= 1" in caplog.text


class Member(riverbed.Aggregate):
    snapshot_every = 2

    @riverbed.event("Joined")
    def __init__(self, email: Annotated[str, riverbed.Personal]) -> None:
        self.email = email
        self.visits = 0

    @riverbed.event("Visited")
    def visit(self) -> None:
        self.visits += 1


def test_a_state_loaded_before_its_key_was_deleted_is_not_snapshotted(
    events: EventSourcing,
) -> None:
    member = Member("ada@example.com")
    events.save(member)
    in_flight = events.get(Member, member.id)  # a command loads the member...
    events.store.delete_stream_key(member.id)  # ...while the member is forgotten
    in_flight.visit()
    events.save(in_flight)  # version 2: a snapshot is due
    snapshot = events.store.load_snapshot(member.id)
    assert snapshot is None or b"ada@example.com" not in snapshot.data
    assert events.get(Member, member.id).email == riverbed.ERASED


class Tally(riverbed.Aggregate):
    snapshot_every = 2

    @riverbed.event("Started")
    def __init__(self) -> None:
        self.count = 0

    @riverbed.event("Counted")
    def count_one(self) -> None:
        self.count += 1


def test_events_recorded_while_an_async_save_awaits_stay_pending(events: EventSourcing) -> None:
    async def run() -> None:
        tally = Tally()
        store = await events.async_store()
        append = store.append

        async def append_while_another_task_records(appends: Any) -> int:
            tally.count_one()  # another task, while the save awaits the store
            return await append(appends)

        store.append = append_while_another_task_records  # type: ignore[method-assign]
        await events.save_async(tally)
        store.append = append  # type: ignore[method-assign]
        assert [r.version for r in tally.pending] == [2]  # saved next time, not dropped
        assert events.store.load_snapshot(tally.id) is None  # the state is ahead of the store
        await events.save_async(tally)
        loaded = await events.get_async(Tally, tally.id)
        assert (loaded.version, loaded.count) == (2, 1)
        await events.close_async()

    asyncio.run(run())


def test_get_async_reads_the_key_after_the_events_it_decrypts(events: EventSourcing) -> None:
    async def run() -> None:
        member = Member("ada@example.com")
        store = await events.async_store()
        read_stream = store.read_stream

        async def saved_meanwhile(*args: Any) -> Any:
            events.save(member)  # the first personal event, and its key, land in between
            return await read_stream(*args)

        store.read_stream = saved_meanwhile  # type: ignore[method-assign]
        loaded = await events.get_async(Member, member.id)
        assert loaded.email == "ada@example.com"
        await events.close_async()

    asyncio.run(run())


STABLE_MODULE = """
import dataclasses
import riverbed


@dataclasses.dataclass
class Tag:
    names: set[str] = dataclasses.field(default_factory=lambda: {"x", "y"})


class Basket(riverbed.Aggregate):
    snapshot_every = 10
    ALLOWED = {"apple", "pear", "plum", "fig"}
    RULES = {"max": frozenset({"a", "b", "c"})}
    tag: Tag

    @riverbed.event("Filled")
    def __init__(self, fruit: str) -> None:
        self.fruit = fruit if fruit in {"apple", "pear", "plum"} else "fig"
        self.tag = Tag()
"""


def test_a_classs_snapshot_schema_is_the_same_in_every_process(tmp_path: Path) -> None:
    (tmp_path / "stable_basket.py").write_text(STABLE_MODULE)
    script = (
        "import stable_basket\n"
        "from riverbed.eventsourcing.snapshots import _state_hints\n"
        "print(_state_hints(stable_basket.Basket)[1])\n"
    )
    schemas = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": f"{tmp_path}:{os.getcwd()}"}
        ran = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        schemas.add(ran.stdout)
    assert len(schemas) == 1


def test_a_classs_snapshot_schema_does_not_depend_on_what_was_imported_first(
    tmp_path: Path,
) -> None:
    (tmp_path / "pkgx").mkdir()
    (tmp_path / "pkgx" / "__init__.py").write_text("")
    (tmp_path / "pkgx" / "kinds.py").write_text(
        "import msgspec\n\nclass Money(msgspec.Struct):\n    amount: int\n"
    )
    wallet = "import riverbed\nimport pkgx.kinds\n\nclass Wallet(riverbed.Aggregate):\n"
    wallet += "    total: pkgx.kinds.Money\n"  # through the package: its module not imported here
    (tmp_path / "wallets.py").write_text(wallet)
    till = "import riverbed\nfrom pkgx.kinds import Money\n\nclass Till(riverbed.Aggregate):\n"
    (tmp_path / "tills.py").write_text(till + "    total: Money\n")  # the module itself
    printing = "from riverbed.eventsourcing.snapshots import _state_hints\n"
    printing += "print(_state_hints(wallets.Wallet)[1])\n"
    schemas = set()
    for first in ("import wallets\n", "import tills\nimport wallets\n"):
        env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{os.getcwd()}"}
        ran = subprocess.run(
            [sys.executable, "-c", "import riverbed\n" + first + printing],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        schemas.add(ran.stdout)
    assert len(schemas) == 1  # a web app and a worker importing in other orders share snapshots


def test_a_scripts_snapshots_serve_it_imported_as_a_module_too(tmp_path: Path) -> None:
    printing = "from riverbed.eventsourcing.snapshots import _state_hints\n"
    printing += "print(_state_hints(Basket)[1])\n"
    (tmp_path / "stable_basket.py").write_text(f"{STABLE_MODULE}\n{printing}")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{os.getcwd()}"}
    schemas = {
        subprocess.run(
            [sys.executable, *how], env=env, capture_output=True, text=True, check=True
        ).stdout
        for how in ([str(tmp_path / "stable_basket.py")], ["-c", "import stable_basket"])
    }
    assert len(schemas) == 1


def test_a_snapshot_taken_by_an_async_save_is_of_what_it_saved(events: EventSourcing) -> None:
    async def run() -> None:
        tally = Tally()
        await events.save_async(tally)
        tally.count_one()  # version 2: a snapshot is due
        store = await events.async_store()
        stream_key = store.stream_key

        async def recorded_meanwhile(*args: Any) -> Any:
            if tally.version == 2:
                tally.count_one()  # another task, while the save awaits the key
            return await stream_key(*args)

        store.stream_key = recorded_meanwhile  # type: ignore[method-assign]
        await events.save_async(tally)
        store.stream_key = stream_key  # type: ignore[method-assign]
        snapshot = events.store.load_snapshot(tally.id)
        assert snapshot is None or snapshot.version == 2
        loaded = events.get(Tally, tally.id)
        assert (loaded.version, loaded.count) == (2, 1)
        await events.close_async()

    asyncio.run(run())


def test_a_live_aggregate_whose_key_was_deleted_is_not_snapshotted(
    events: EventSourcing,
) -> None:
    member = Member("ada@example.com")
    events.save(member)
    events.store.delete_stream_key(member.id)  # the member is forgotten while still in memory
    member.visit()
    events.save(member)  # version 2: a snapshot is due
    snapshot = events.store.load_snapshot(member.id)
    assert snapshot is None or b"ada@example.com" not in snapshot.data
    assert events.get(Member, member.id).email == riverbed.ERASED


MIXIN_MODULE = """
import functools
import riverbed


class Scoring:
    def points(self, amount: int) -> int:
        return amount


def doubled(method):
    @functools.wraps(method)
    def wrapper(self, amount):
        return method(self, amount)
    return wrapper


class Score(Scoring, riverbed.Aggregate):
    snapshot_every = 2

    @riverbed.event("Started")
    def __init__(self) -> None:
        self.total = 0

    @riverbed.event("Scored")
    def score(self, amount: int) -> None:
        self.total += self.points(amount)
"""


def test_a_snapshot_is_ignored_after_a_mixins_code_changed(
    events: EventSourcing, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"mixin_score_{uuid.uuid4().hex[:8]}"  # a module of its own for each store
    module_file = tmp_path / f"{name}.py"
    module_file.write_text(MIXIN_MODULE.replace("Score", f"Score{name[-8:]}"))
    monkeypatch.syspath_prepend(str(tmp_path))
    release_1 = importlib.import_module(name)
    score = getattr(release_1, f"Score{name[-8:]}")()
    score.score(3)
    events.save(score)
    assert events.store.load_snapshot(score.id) is not None
    release_2 = MIXIN_MODULE.replace("Score", f"Score{name[-8:]}")
    module_file.write_text(release_2.replace("return amount\n", "return amount * 10\n"))
    score_2 = getattr(importlib.reload(release_1), f"Score{name[-8:]}")
    assert events.get(score_2, score.id).total == 30  # replayed by the new mixin
    sys.modules.pop(name)


def test_a_snapshot_is_keyed_by_the_code_running_not_the_file_on_disk_since(
    events: EventSourcing, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"deployed_{uuid.uuid4().hex[:8]}"
    source = MIXIN_MODULE.replace("Score", f"Score{name[-8:]}")
    module_file = tmp_path / f"{name}.py"
    module_file.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    running = importlib.import_module(name)  # release 1, imported by a process still running
    module_file.write_text(source.replace("return amount\n", "return amount * 10\n"))  # deploy
    score = getattr(running, f"Score{name[-8:]}")()
    score.score(3)
    events.save(score)  # release 1's first snapshot of the class, after the file changed
    assert events.store.load_snapshot(score.id) is not None
    release_2 = getattr(importlib.reload(running), f"Score{name[-8:]}")  # a new process
    assert events.get(release_2, score.id).total == 30  # replayed by release 2's code
    sys.modules.pop(name)


class Releases:
    """Modules written to files and imported in order, then rewritten and reloaded, as releases
    of an app's code; ``ID`` in their sources is a suffix of their own (each store's test run
    has its module and class names)."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.dir = tmp_path
        self.suffix = uuid.uuid4().hex[:8]
        self.modules: dict[str, ModuleType] = {}
        monkeypatch.syspath_prepend(str(tmp_path))

    def deploy(self, **sources: str) -> dict[str, ModuleType]:
        """Write each module, then import it, or reload it if an earlier release did."""
        for name, source in sources.items():
            text = textwrap.dedent(source).replace("ID", self.suffix)
            (self.dir / f"{name}_{self.suffix}.py").write_text(text)
        for name in sources:
            module = self.modules.get(name)
            if module is None:
                self.modules[name] = importlib.import_module(f"{name}_{self.suffix}")
            else:
                importlib.reload(module)
        return self.modules

    def close(self) -> None:
        for module in self.modules.values():
            sys.modules.pop(module.__name__, None)


@pytest.fixture
def releases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Releases]:
    made = Releases(tmp_path, monkeypatch)
    yield made
    made.close()


CREDITED_V1 = """
    import riverbed

    class Credited(riverbed.DomainEvent):
        event_type = "WalletID.Credited"
        amount: int

        def apply(self, wallet):
            wallet.total += self.amount
"""
WALLET = """
    import riverbed
    import credits_ID

    class WalletID(riverbed.Aggregate):
        snapshot_every = 2
        total: int

        @riverbed.event("Opened")
        def __init__(self) -> None:
            self.total = 0

        def credit(self, amount: int) -> None:
            self.trigger(credits_ID.Credited(amount=amount))
"""


def test_a_snapshot_is_ignored_once_an_event_class_it_triggers_changed_version(
    events: EventSourcing, releases: Releases
) -> None:
    release_1 = releases.deploy(credits=CREDITED_V1, wallet=WALLET)
    wallet = getattr(release_1["wallet"], f"Wallet{releases.suffix}")()
    wallet.credit(5)
    events.save(wallet)
    assert events.store.load_snapshot(wallet.id) is not None
    upcaster = "upcasters = {1: lambda d: {'amount': 100 * d['amount']}}"
    in_cents = CREDITED_V1.replace(
        "        amount: int\n",
        f"        event_version = 2\n        {upcaster}\n        amount: int\n",
    )
    release_2 = releases.deploy(credits=in_cents, wallet=WALLET)
    assert (
        events.get(getattr(release_2["wallet"], f"Wallet{releases.suffix}"), wallet.id).total == 500
    )


BARE_PURSE = """
    import riverbed

    class PurseID(riverbed.Aggregate):
        snapshot_every = 2
        total: int

        @riverbed.event("Opened")
        def __init__(self) -> None:
            self.total = 0
"""
PURSE_SERVICE = """
    import credits_ID

    def credit(purse, amount: int) -> None:  # the purse's own code names no event class
        purse.trigger(credits_ID.Credited(amount=amount))
"""


def test_a_snapshot_is_ignored_once_an_event_class_other_code_triggered_changed_version(
    events: EventSourcing, releases: Releases
) -> None:
    credited = CREDITED_V1.replace("WalletID", "PurseID")
    release_1 = releases.deploy(credits=credited, purse=BARE_PURSE, service=PURSE_SERVICE)
    purse = getattr(release_1["purse"], f"Purse{releases.suffix}")()
    release_1["service"].credit(purse, 5)
    events.save(purse)
    assert events.store.load_snapshot(purse.id) is not None
    upcaster = "upcasters = {1: lambda d: {'amount': 100 * d['amount']}}"
    in_cents = credited.replace(
        "        amount: int\n",
        f"        event_version = 2\n        {upcaster}\n        amount: int\n",
    )
    release_2 = releases.deploy(credits=in_cents, purse=BARE_PURSE, service=PURSE_SERVICE)
    cls = getattr(release_2["purse"], f"Purse{releases.suffix}")
    assert events.get(cls, purse.id).total == 500  # replayed, not the snapshot's 5
    loaded = events.get(cls, purse.id)
    release_2["service"].credit(loaded, 1)
    release_2["service"].credit(loaded, 1)
    events.save(loaded)  # a snapshot of release 2, which release 2 uses
    assert events.store.load_snapshot(purse.id).version == 4  # type: ignore[union-attr]
    assert events.get(cls, purse.id).total == 502


RATE = """
    import msgspec

    class Rate(msgspec.Struct):
        percent: int
        basis: int = 100
"""
PER_MILLE = RATE.replace("basis: int = 100", "basis: int = 1000")
MONEY = """
    import msgspec
    import rate_ID

    class Money(msgspec.Struct):
        cents: int
        rate: rate_ID.Rate
"""
ACCOUNT = """
    import riverbed
    from money_ID import Money
    from rate_ID import Rate

    class AccountID(riverbed.Aggregate):
        snapshot_every = 2
        balance: Money

        @riverbed.event("Opened")
        def __init__(self) -> None:
            self.balance = Money(0, Rate(5))

        @riverbed.event("Rated")
        def rate(self, percent: int) -> None:
            self.balance = Money(self.balance.cents, Rate(percent))
"""


def test_a_snapshot_is_ignored_once_a_type_inside_an_attributes_type_changed(
    events: EventSourcing, releases: Releases
) -> None:
    release_1 = releases.deploy(rate=RATE, money=MONEY, account=ACCOUNT)
    account = getattr(release_1["account"], f"Account{releases.suffix}")()
    account.rate(7)
    events.save(account)
    assert events.store.load_snapshot(account.id) is not None
    release_2 = releases.deploy(rate=PER_MILLE, money=MONEY, account=ACCOUNT)
    loaded = events.get(getattr(release_2["account"], f"Account{releases.suffix}"), account.id)
    assert loaded.balance.rate.basis == 1000  # replayed, not the snapshot's 100


def test_a_snapshot_taken_after_a_deploy_changed_a_types_file_is_of_the_running_code(
    events: EventSourcing, releases: Releases
) -> None:
    release_1 = releases.deploy(rate=RATE, money=MONEY, account=ACCOUNT)
    rate_file = releases.dir / f"rate_{releases.suffix}.py"
    rate_file.write_text(textwrap.dedent(PER_MILLE))  # the deploy, under the running release 1
    account = getattr(release_1["account"], f"Account{releases.suffix}")()
    account.rate(7)
    events.save(account)  # release 1's first snapshot of the class
    release_2 = releases.deploy(rate=PER_MILLE, money=MONEY, account=ACCOUNT)
    loaded = events.get(getattr(release_2["account"], f"Account{releases.suffix}"), account.id)
    assert loaded.balance.rate.basis == 1000


class Status(enum.IntEnum):
    OPEN = 1


TOKYO = datetime.timezone(datetime.timedelta(hours=9))


class Booked(riverbed.Aggregate):
    snapshot_every = 1
    price: float

    @riverbed.event("Made")
    def __init__(self, start: datetime.datetime) -> None:
        self.status = Status.OPEN  # not annotated: it would load back as an int
        self.start = start.astimezone(TOKYO)  # loads back in UTC
        self.price = 5  # loads back as the float its annotation says


def test_a_state_that_loads_back_as_another_type_or_time_zone_gets_no_snapshot(
    events: EventSourcing, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshots, "_warned_unsnapshotted", set())
    with caplog.at_level(logging.WARNING):
        events.save(Booked(datetime.datetime(2026, 5, 1, 20, 0, tzinfo=datetime.UTC)))
    assert "status (Status loads back as int)" in caplog.text
    assert "start (datetime in time zone UTC+09:00 loads back in UTC)" in caplog.text
    assert "price (int loads back as float)" in caplog.text
    booked = events.read()[-1].stream
    assert events.store.load_snapshot(booked) is None
    loaded = events.get(Booked, booked)
    assert loaded.status is Status.OPEN and loaded.start.tzinfo == TOKYO


class Rota(riverbed.Aggregate):
    snapshot_every = 1
    slots: set[datetime.datetime]
    tags: set[tuple[Any, ...]]

    @riverbed.event("Made")
    def __init__(self, start: datetime.datetime) -> None:
        self.slots = {start.astimezone(TOKYO)}  # equal to the UTC one it loads back as
        self.tags = {(Status.OPEN, "urgent")}  # equal to (1, "urgent")


def test_items_of_sets_that_load_back_changed_get_no_snapshot(events: EventSourcing) -> None:
    rota = Rota(datetime.datetime(2026, 5, 1, 20, 0, tzinfo=datetime.UTC))
    events.save(rota)
    assert events.store.load_snapshot(rota.id) is None
    loaded = events.get(Rota, rota.id)
    assert next(iter(loaded.slots)).tzinfo == TOKYO
    assert next(iter(loaded.tags))[0] is Status.OPEN


@dataclasses.dataclass
class ShelfLine:
    sku: str

    def __post_init__(self) -> None:
        self.quantities: list[int] = []  # outside the fields: no encoding keeps it


class ShelfTag(msgspec.Struct, dict=True):
    name: str

    @functools.cached_property
    def upper(self) -> str:  # computed again after a load: no reason to refuse a snapshot
        return self.name.upper()


class Shelf(riverbed.Aggregate):
    snapshot_every = 1
    lines: list[ShelfLine]
    tag: ShelfTag

    @riverbed.event("Opened")
    def __init__(self) -> None:
        self.lines = []
        self.tag = ShelfTag("gift")
        assert self.tag.upper == "GIFT"

    @riverbed.event("Added")
    def add(self, sku: str, quantity: int) -> None:
        line = next((line for line in self.lines if line.sku == sku), None)
        if line is None:
            self.lines.append(line := ShelfLine(sku))
        line.quantities.append(quantity)


def test_attributes_outside_a_dataclass_or_structs_fields_get_no_snapshot(
    events: EventSourcing, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    shelf = Shelf()
    events.save(shelf)
    assert events.store.load_snapshot(shelf.id) is not None  # the cached property's no matter
    monkeypatch.setattr(snapshots, "_warned_unsnapshotted", set())
    with caplog.at_level(logging.WARNING):
        shelf.add("apple", 1)
        shelf.add("apple", 5)
        events.save(shelf)
    assert "not ShelfLine.quantities: make it a field" in caplog.text
    assert events.store.load_snapshot(shelf.id).version == 1  # type: ignore[union-attr]
    assert events.get(Shelf, shelf.id).lines[0].quantities == [1, 5]  # a snapshot read []
    shelf.tag.label = "red"  # type: ignore[attr-defined]
    assert not snapshots.same_when_loaded(ShelfTag("gift"), shelf.tag)


@dataclasses.dataclass
class Guarded:
    owner: str

    def __post_init__(self) -> None:
        self._lock = threading.Lock()  # equal only to itself: no state, built again on load


class Coffer(riverbed.Aggregate):
    snapshot_every = 1
    guarded: Guarded

    @riverbed.event("Opened")
    def __init__(self, owner: str) -> None:
        self.guarded = Guarded(owner)


def test_an_object_equal_only_to_itself_made_by_post_init_is_no_reason_to_refuse(
    events: EventSourcing,
) -> None:
    coffer = Coffer("ada")
    events.save(coffer)
    assert events.store.load_snapshot(coffer.id) is not None
    assert events.get(Coffer, coffer.id).guarded.owner == "ada"


BASE = """
    import msgspec

    class BaseMoney(msgspec.Struct):
        currency: str = "EUR"
"""
MONEY_ON_BASE = """
    from base_ID import BaseMoney

    class Money(BaseMoney):
        amount: int = 0
"""
PURSE = """
    import riverbed
    from money_ID import Money

    class PurseID(riverbed.Aggregate):
        snapshot_every = 1
        money: Money

        @riverbed.event("Opened")
        def __init__(self) -> None:
            self.money = Money(amount=1)
"""


def test_a_snapshot_is_ignored_once_a_base_of_an_attributes_type_changed(
    events: EventSourcing, releases: Releases
) -> None:
    release_1 = releases.deploy(base=BASE, money=MONEY_ON_BASE, purse=PURSE)
    purse = getattr(release_1["purse"], f"Purse{releases.suffix}")()
    events.save(purse)
    assert events.store.load_snapshot(purse.id) is not None
    in_dollars = BASE.replace('"EUR"', '"USD"')
    release_2 = releases.deploy(base=in_dollars, money=MONEY_ON_BASE, purse=PURSE)
    loaded = events.get(getattr(release_2["purse"], f"Purse{releases.suffix}"), purse.id)
    assert loaded.money.currency == "USD"  # replayed, not the snapshot's EUR


CREDITS_IN_PACKAGE = """
    import riverbed

    class Credited(riverbed.DomainEvent):
        event_type = "TillID.Credited"
        amount: int

        def apply(self, till):
            till.total += self.amount
"""
TILL = """
    import riverbed
    import pkg_ID.credits

    class TillID(riverbed.Aggregate):
        snapshot_every = 2
        total: int

        @riverbed.event("Opened")
        def __init__(self) -> None:
            self.total = 0

        def credit(self, amount: int) -> None:
            self.trigger(pkg_ID.credits.Credited(amount=amount))
"""


def test_a_snapshot_is_ignored_once_an_event_class_named_through_a_package_changed(
    events: EventSourcing, releases: Releases
) -> None:
    package = releases.dir / f"pkg_{releases.suffix}"
    package.mkdir()
    (package / "__init__.py").write_text("")
    credits_file = package / "credits.py"
    credits_file.write_text(textwrap.dedent(CREDITS_IN_PACKAGE).replace("ID", releases.suffix))
    credits = importlib.import_module(f"pkg_{releases.suffix}.credits")
    release_1 = releases.deploy(till=TILL)
    till = getattr(release_1["till"], f"Till{releases.suffix}")()
    till.credit(3)
    events.save(till)
    assert events.store.load_snapshot(till.id) is not None
    tenfold = CREDITS_IN_PACKAGE.replace("+= self.amount", "+= 10 * self.amount")
    credits_file.write_text(textwrap.dedent(tenfold).replace("ID", releases.suffix))
    importlib.reload(credits)
    release_2 = releases.deploy(till=TILL)
    assert events.get(getattr(release_2["till"], f"Till{releases.suffix}"), till.id).total == 30
    sys.modules.pop(credits.__name__)


def test_a_snapshot_is_ignored_once_a_default_factory_changed(events: EventSourcing) -> None:
    release = """
    import dataclasses
    import riverbed

    @dataclasses.dataclass
    class Line:
        qty: int = dataclasses.field(default_factory=lambda: 1)

    class Crate(riverbed.Aggregate):
        snapshot_every = 1
        line: Line

        @riverbed.event("Filled")
        def __init__(self) -> None:
            self.line = Line()
    """
    crate = deployed(release)["Crate"]()
    events.save(crate)
    assert events.store.load_snapshot(crate.id) is not None
    release_2 = deployed(release.replace("lambda: 1", "lambda: 2"))
    assert events.get(release_2["Crate"], crate.id).line.qty == 2


@dataclasses.dataclass
class CartLine:
    sku: str
    quantity: int


@dataclasses.dataclass(frozen=True)
class Price:
    cents: int


class SkuCart(riverbed.Aggregate):
    snapshot_every = 2
    lines: list[CartLine]
    by_sku: dict[str, CartLine]
    prices: dict[str, Price]

    @riverbed.event("Opened")
    def __init__(self) -> None:
        self.lines, self.by_sku, self.prices = [], {}, {}

    @riverbed.event("Added")
    def add(self, sku: str, shared: bool) -> None:
        line = CartLine(sku, 1)
        self.lines.append(line)
        self.by_sku[sku] = line if shared else CartLine(sku, 1)
        self.prices[sku] = self.prices["first"] = Price(100)  # immutable: may be shared

    @riverbed.event("Incremented")
    def increment(self, sku: str) -> None:
        self.by_sku[sku].quantity += 1
        for line in self.lines:
            if line.sku == sku and line is not self.by_sku[sku]:
                line.quantity += 1


def test_a_state_holding_one_object_in_two_places_gets_no_snapshot(
    events: EventSourcing, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    separate = SkuCart()
    separate.add("apple", shared=False)
    events.save(separate)
    assert events.store.load_snapshot(separate.id) is not None  # shared immutables are fine
    monkeypatch.setattr(snapshots, "_warned_unsnapshotted", set())
    cart = SkuCart()
    cart.add("apple", shared=True)
    with caplog.at_level(logging.WARNING):
        events.save(cart)
    assert "by_sku['apple'] is the same object as lines[0]" in caplog.text
    assert events.store.load_snapshot(cart.id) is None
    events.handle(SkuCart, cart.id, lambda loaded: loaded.increment("apple"))
    # Replayed, not two copies from a snapshot of which the event changed one.
    assert events.get(SkuCart, cart.id).lines == [CartLine("apple", 2)]
