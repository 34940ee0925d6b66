"""``SqliteFile`` with background checkpoints: writers never checkpoint inside a commit, and the
write-ahead log still stays bounded under a writer that never pauses. Each kind of riverbed file
refuses another kind's file, and another program's."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import riverbed
from riverbed import sqlite_file
from riverbed.errors import RiverbedError
from riverbed.eventsourcing.stores import connect_store, missing_store
from riverbed.log.sqlite.kinds import KINDS
from riverbed.log.sqlite.store import write_transaction
from riverbed.sqlite_file import SqliteFile
from riverbed.tasks.brokers import connect_broker


def test_background_checkpoints_keep_the_log_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_file, "WRITER_CHECKPOINT_PAGES", 1024)
    monkeypatch.setattr(sqlite_file, "JOURNAL_LIMIT_BYTES", 4 * 1024 * 1024)
    database = SqliteFile(tmp_path / "x.db", "NORMAL", "event store", background_checkpoints=True)
    database.create_schema(["CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v BLOB)"], 1)
    conn = database.conn
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1024
    wal = tmp_path / "x.db-wal"
    largest = 0
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:  # one writer, never pausing, ~50 MB of pages
        with write_transaction(conn):
            conn.executemany("INSERT INTO t (v) VALUES (?)", [(os.urandom(512),)] * 20)
        largest = max(largest, wal.stat().st_size)
    database.close()
    # With no checkpoint completing between writes, the log would hold every page written.
    assert largest < 16 * 1024 * 1024, largest
    assert (tmp_path / "x.db").stat().st_size > 4 * 1024 * 1024  # the pages reached the file


CLOSED_UNDER_A_READER = """
import sys, threading, time
from riverbed.eventsourcing.stores import connect_store, missing_store
from riverbed.log.sqlite.kinds import KINDS

store = connect_store(f"sqlite:///{sys.argv[1]}/events.db")
errors = []

def read():
    while True:
        try:
            store.read_all()
        except Exception as error:
            errors.append(str(error))
            return

reader = threading.Thread(target=read)
reader.start()
time.sleep(0.3)
store.close()  # while the reader runs statements on its own connection
reader.join(10)
print(errors)
"""


def test_closing_while_another_thread_reads_ends_its_calls_not_the_process(
    tmp_path: Path,
) -> None:
    # Closing that thread's connection under a running statement crashed the interpreter.
    done = subprocess.run(
        [sys.executable, "-c", CLOSED_UNDER_A_READER, str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"event store '{tmp_path}/events.db' is closed" in done.stdout


@pytest.mark.parametrize("user_version", [0, 1])
def test_another_programs_database_is_refused_and_left_as_it_was(
    tmp_path: Path, user_version: int
) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:  # an events table of its own, not riverbed's
        conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, title TEXT)")
        conn.execute(f"PRAGMA user_version={user_version}")
    for opener in OPENERS.values():
        with pytest.raises(RiverbedError, match=(
            r"is a database riverbed did not create \(it holds events\); give riverbed a file"
        )):  # fmt: skip
            opener(f"sqlite:///{path}")
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("events",)]
        assert conn.execute("PRAGMA user_version").fetchone() == (user_version,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # not made WAL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


def test_connections_of_ended_threads_are_closed(tmp_path: Path) -> None:
    store = connect_store(f"sqlite:///{tmp_path}/events.db")
    opened = len(os.listdir("/proc/self/fd"))
    try:
        for _ in range(100):  # what each event loop's thread pool does
            reader = threading.Thread(target=store.last_position)
            reader.start()
            reader.join()
        store.last_position()
        assert len(os.listdir("/proc/self/fd")) < opened + 10
    finally:
        store.close()


OPENERS = {
    "log": riverbed.connect,
    "task database": connect_broker,
    "event store": connect_store,
}


@pytest.mark.parametrize("kind", list(OPENERS))
def test_a_file_of_another_riverbed_kind_is_refused_and_left_as_it_was(
    tmp_path: Path, kind: str
) -> None:
    path = tmp_path / f"{kind}.db"
    OPENERS[kind](f"sqlite:///{path}").close()
    with sqlite3.connect(path) as conn:
        header = (
            conn.execute("PRAGMA user_version").fetchone(),
            conn.execute("PRAGMA application_id").fetchone(),
        )
    for other, opener in OPENERS.items():
        if other == kind:
            continue
        with pytest.raises(RiverbedError, match=f"is a riverbed {kind}, not an? {other}; give"):
            opener(f"sqlite:///{path}")
        with sqlite3.connect(path) as conn:
            assert (
                conn.execute("PRAGMA user_version").fetchone(),
                conn.execute("PRAGMA application_id").fetchone(),
            ) == header
    OPENERS[kind](f"sqlite:///{path}").close()  # still its own kind's


def test_a_file_of_an_earlier_riverbed_is_told_by_its_tables(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    riverbed.connect(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA application_id=0")  # as releases before the header wrote it
    with pytest.raises(RiverbedError, match="is a riverbed log, not an event store"):
        connect_store(f"sqlite:///{path}")
    assert "is a riverbed log, not an event store" in str(missing_store(f"sqlite:///{path}"))
    riverbed.connect(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA application_id").fetchone() == (KINDS["log"][0],)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_url_naming_a_directory_says_so(tmp_path: Path, kind: str) -> None:
    with pytest.raises(RiverbedError, match=(
        rf"{kind} '{tmp_path}' is a directory; name a file \(in it, say\) in the URL"
    )):  # fmt: skip
        OPENERS[kind](f"sqlite:///{tmp_path}")  # SQLite's own words: "disk I/O error"
    assert missing_store(f"sqlite:///{tmp_path}") == (
        f"'{tmp_path}' is a directory; name a file (in it, say) in the URL"
    )
