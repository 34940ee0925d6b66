"""``riverbed projections``: status and lag, parked events, unparking and rebuilds of an app's
projections and process managers, on a SQLite event store."""

from __future__ import annotations

import re
import sqlite3
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from typer.testing import CliRunner, Result

import riverbed
from riverbed.cli.common import out
from riverbed.cli.main import app as cli
from riverbed.eventsourcing.claims import claim
from riverbed.eventsourcing.sagas import SagaRunner

APP_MODULE = textwrap.dedent(
    """
    import riverbed

    app = riverbed.App("rooms", events_url=EVENTS_URL)


    class Booking(riverbed.Aggregate):
        @riverbed.event("Made")
        def __init__(self, guest: str) -> None:
            self.guest = guest


    class BookingsPerGuest(riverbed.Projection):
        name = "bookings-per-guest"
        refused = frozenset({"mallory"})

        def handle(self, event: riverbed.Envelope, tx: riverbed.eventsourcing.ReadModel) -> None:
            guest = event.event.guest
            if guest in self.refused:
                raise ValueError(f"{guest} cannot book")
            count = (tx.get("guests", guest) or {"bookings": 0})["bookings"]
            tx.put("guests", guest, {"bookings": count + 1})


    class Welcome(riverbed.ProcessManager):
        name = "welcome"
        refused = frozenset({"eve"})

        def handle(self, event: riverbed.Envelope, saga: riverbed.Saga) -> None:
            if event.event.guest in self.refused:
                raise ValueError(f"cannot welcome {event.event.guest}")
            saga.save_state(event.event.guest, {"welcomed": True})


    app.events.projection(BookingsPerGuest())
    app.events.process_manager(Welcome())
    """
)
NAME = "bookings-per-guest"


@pytest.fixture
def rooms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The app module, importable here and by the command (which imports from the cwd)."""
    url = f"sqlite:///{tmp_path}/events.db"
    (tmp_path / "rooms.py").write_text(APP_MODULE.replace("EVENTS_URL", repr(url)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import rooms as module  # type: ignore[import-not-found]

    yield module
    module.app.close()
    sys.modules.pop("rooms", None)


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, ["projections", *args], catch_exceptions=False)


def book(rooms: ModuleType, *guests: str) -> None:
    for guest in guests:
        rooms.app.events.save(rooms.Booking(guest))


def status_row(listed: Result, name: str = NAME) -> list[str]:
    """The cells of a projection's or process manager's row in ``list``'s table."""
    row = next(line for line in listed.stdout.splitlines() if f" {name} " in line)
    return [cell for cell in re.split(r"[\s│|]+", row) if cell]


def test_list_shows_each_projection_with_its_version_checkpoint_and_lag(
    rooms: ModuleType,
) -> None:
    book(rooms, "ada", "bob", "ada")
    rooms.app.events.projections.runner(NAME).run_once(limit=2)
    listed = run("list", "rooms:app")
    assert listed.exit_code == 0, listed.output
    assert status_row(listed) == [NAME, "1", "2", "3", "1", "0"]
    assert status_row(listed, "welcome") == ["welcome", "0", "3", "3", "0"]


def test_list_shows_long_names_whole_however_narrow_the_output(
    rooms: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Long(riverbed.Projection):
        name = "inventory-levels-per-warehouse-and-region-of-the-whole-shop"

        def handle(self, event: riverbed.Envelope, tx: riverbed.eventsourcing.ReadModel) -> None:
            pass

    rooms.app.events.projection(Long())
    book(rooms, "ada")
    monkeypatch.setattr(out, "width", 60)
    listed = run("list", "rooms:app")
    assert listed.exit_code == 0, listed.output
    assert status_row(listed, Long.name)[0] == Long.name  # what the other commands take


def test_list_and_parked_say_when_another_app_runs_the_name(rooms: ModuleType) -> None:
    book(rooms, "ada")
    claim(rooms.app.events.store, "hotel", [f"projection {NAME}"])
    for args in (("list", "rooms:app"), ("parked", "rooms:app", NAME)):
        shown = run(*args)
        assert shown.exit_code == 0, shown.output
        assert f"note: app 'hotel' runs '{NAME}' in this event store" in shown.stderr


def test_parked_events_are_listed_and_unparked(rooms: ModuleType) -> None:
    book(rooms, "ada", "mallory")
    rooms.app.events.projections.runner(NAME).catch_up()
    mallory = rooms.app.events.read()[1]

    parked = run("parked", "rooms:app", NAME)
    assert parked.exit_code == 0, parked.output
    (line,) = parked.stdout.splitlines()
    assert line.startswith(f"2  {mallory.id}  Booking.Made  parked=")
    assert line.endswith("ValueError: mallory cannot book")
    with_traceback = run("parked", "rooms:app", NAME, "--traceback")
    assert "Traceback (most recent call last)" in with_traceback.stdout
    assert status_row(run("list", "rooms:app")) == [NAME, "1", "2", "2", "0", "1"]

    unparked = run("unpark", "rooms:app", NAME, "2")
    assert unparked.stdout.strip() == f"unparked 1 events of {NAME}"
    assert run("parked", "rooms:app", NAME).stdout.strip() == f"{NAME} has no parked events"
    again = run("unpark", "rooms:app", NAME, "2")
    assert again.exit_code == 1
    assert again.stderr == f"error: not parked by {NAME}: 2\n"


def test_positions_may_be_negative_huge_or_repeated(rooms: ModuleType) -> None:
    book(rooms, "ada")
    result = run("unpark", "rooms:app", NAME, "-5", "99999999999999999999", "-5")
    assert result.exit_code == 1
    assert result.stderr == f"error: not parked by {NAME}: -5, 99999999999999999999\n"
    result = run("unpark", "rooms:app", NAME, "1,200", "2x")  # 1,200: as `list` prints it
    assert result.exit_code == 1
    assert result.stderr == "error: '2x' is not a position: give whole numbers, as `riverbed " \
        "projections parked` lists them\n"  # fmt: skip
    result = run("unpark", "rooms:app", NAME, "1,200")
    assert result.stderr == f"error: not parked by {NAME}: 1200\n"
    result = run("unpark", "rooms:app", NAME, "1,2")  # a list, not 12
    assert result.stderr.startswith("error: '1,2' is not a position")


def test_retry_applies_parked_events_once_the_handler_is_fixed(rooms: ModuleType) -> None:
    book(rooms, "ada", "mallory", "bob")
    projections = rooms.app.events.projections
    projections.runner(NAME).catch_up()
    (first,) = projections.parked(NAME)

    failed = run("retry", "rooms:app", NAME, "2")
    assert failed.exit_code == 1
    assert failed.stdout.strip() == "2  failed again: ValueError: mallory cannot book"
    assert failed.stderr == f"error: still parked by {NAME}: 2\n"
    (again,) = projections.parked(NAME)
    assert again.parked_ms >= first.parked_ms and "Traceback" in again.error

    rooms.BookingsPerGuest.refused = frozenset()
    fixed = run("retry", "rooms:app", NAME, "2")
    assert fixed.exit_code == 0, fixed.output
    assert fixed.stdout.strip() == "2  applied"
    assert projections.all(NAME, "guests") == {
        "ada": {"bookings": 1}, "bob": {"bookings": 1}, "mallory": {"bookings": 1}
    }  # fmt: skip
    assert status_row(run("list", "rooms:app")) == [NAME, "1", "3", "3", "0", "0"]
    book(rooms, "eve")
    rooms.BookingsPerGuest.refused = frozenset({"eve"})
    projections.runner(NAME).catch_up()  # parks position 4
    several = run("retry", "rooms:app", NAME, "2", "4")
    assert several.exit_code == 1
    assert several.stdout.strip() == "4  failed again: ValueError: eve cannot book"
    assert several.stderr == f"error: still parked by {NAME}: 4; not parked by {NAME}: 2\n"


def test_a_process_managers_parked_events_are_listed_retried_and_unparked(
    rooms: ModuleType,
) -> None:
    book(rooms, "eve", "ada", "eve")
    manager = rooms.app.events.process_managers["welcome"]
    SagaRunner(rooms.app.events, manager).catch_up()
    parked = run("parked", "rooms:app", "welcome")
    assert [line.split("  ")[0] for line in parked.stdout.splitlines()] == ["1", "3"]
    assert parked.stdout.splitlines()[0].endswith("ValueError: cannot welcome eve")
    assert status_row(run("list", "rooms:app"), "welcome")[-1] == "2"

    manager.refused = frozenset()
    retried = run("retry", "rooms:app", "welcome", "1")
    assert retried.exit_code == 0, retried.output
    assert retried.stdout.strip() == "1  applied"
    assert rooms.app.events.store.get_document("saga:welcome", "eve") == {"welcomed": True}
    assert run("unpark", "rooms:app", "welcome", "3").exit_code == 0
    assert run("parked", "rooms:app", "welcome").stdout.strip() == "welcome has no parked events"


def test_list_says_where_a_projection_that_stops_on_errors_stopped(rooms: ModuleType) -> None:
    book(rooms, "ada", "mallory", "bob")
    rooms.BookingsPerGuest.on_error = "stop"
    rooms.app.events.projections.runner(NAME).catch_up()
    listed = run("list", "rooms:app")
    assert status_row(listed) == [NAME, "1", "1", "3", "2", "0"]
    assert listed.stdout.splitlines()[-1] == (
        f"{NAME} stopped at position 2 (on_error = 'stop'): ValueError: mallory cannot book; "
        "fix it and restart the worker"
    )


def test_rebuild_switches_to_a_new_version(rooms: ModuleType) -> None:
    book(rooms, "ada", "bob")
    projections = rooms.app.events.projections
    projections.runner(NAME).catch_up()

    rebuilt = run("rebuild", "rooms:app", NAME)
    assert rebuilt.exit_code == 0, rebuilt.output
    assert rebuilt.stdout.strip() == f"rebuilt {NAME}: version 2 is active (was 1), at position 2"
    assert projections.active_version(NAME) == 2
    assert rooms.app.events.store.documents(f"{NAME}@v1/guests") == {}
    assert projections.all(NAME, "guests") == {"ada": {"bookings": 1}, "bob": {"bookings": 1}}
    assert status_row(run("list", "rooms:app")) == [NAME, "2", "2", "2", "0", "0"]


def test_a_store_that_does_not_exist_is_an_error_and_is_not_created(
    rooms: ModuleType, tmp_path: Path
) -> None:
    for args in (("list", "rooms:app"), ("parked", "rooms:app", NAME)):
        result = run(*args)
        assert result.exit_code == 1
        assert result.stderr.startswith(f"error: no event store at '{tmp_path}/events.db' (no")
        assert "a worker running the app, or its first save, creates the store" in result.stderr
    assert not (tmp_path / "events.db").exists()


def test_a_store_url_at_another_file_is_an_error_and_changes_nothing(
    rooms: ModuleType, tmp_path: Path
) -> None:
    path = tmp_path / "events.db"
    path.touch()  # an empty file: looking does not make it a store
    empty = run("list", "rooms:app")
    assert empty.stderr.startswith(f"error: no event store at '{path}' (the file is an empty")
    assert path.stat().st_size == 0
    path.unlink()
    riverbed.connect(f"sqlite:///{path}").close()  # the log's file, say
    before = schema(path)
    wrong = run("list", "rooms:app")
    assert wrong.exit_code == 1
    assert wrong.stderr.startswith(f"error: '{path}' is a riverbed log, not an event store")
    assert schema(path) == before


def schema(path: Path) -> tuple[object, ...]:
    with sqlite3.connect(path) as conn:
        return (
            conn.execute("PRAGMA user_version").fetchone(),
            conn.execute("PRAGMA application_id").fetchone(),
            conn.execute("SELECT name FROM sqlite_master ORDER BY name").fetchall(),
        )


def test_unknown_projections_and_apps_are_one_line_errors(rooms: ModuleType) -> None:
    book(rooms, "ada")
    for args in (
        ("parked", "rooms:app", "nope"),
        ("unpark", "rooms:app", "nope", "1"),
        ("retry", "rooms:app", "nope", "1"),
        ("rebuild", "rooms:app", "nope"),
    ):
        result = run(*args)
        assert result.exit_code == 1, (args, result.output)
        known = (
            "no projection named 'nope'"
            if args[0] == "rebuild"
            else ("no projection or process manager named 'nope'")
        )
        registered = NAME if args[0] == "rebuild" else f"{NAME}, welcome"
        assert result.stderr == f"error: {known}; registered: {registered}\n"
    for target, message in (
        ("nosuchmodule:app", "cannot import module 'nosuchmodule'"),
        ("rooms:nothing", "rooms:nothing is missing, not a riverbed.App"),
        ("rooms", "expected module:attribute"),
    ):
        result = run("list", target)
        assert result.exit_code == 1, (target, result.output)
        assert result.stderr.startswith(f"error: {message}")
        assert len(result.stderr.splitlines()) == 1
