"""The embedded event store: one SQLite file in WAL mode, shared by every process on the machine.

Events are stored in batches: a row per stream per save (up to ``BATCH_EVENTS`` events), keyed
by the global position of its first event and indexed by (stream, first version). The append
numbers events on from the last position under SQLite's one write lock, so positions come in
commit order with no gaps: a reader that has seen position N has seen every event before it. A
row's ``records`` are its events' ``StoredEvent``s as msgpack arrays one after the other, so a
read joins the rows' blobs and decodes a page with one msgspec call (the sqlite3 module builds
rows far slower than msgspec decodes them). A row holds a run of consecutive versions, so its
first version and count say which. With a row per event, a save of 10 events took ~30% more
time, commands included: ten rows to bind and insert, and ten entries in the (stream, version)
index, whose pages are most of what a commit writes. A new stream's first save is one INSERT,
numbered on from the store's last append without asking: the primary key refuses it if another
writer appended since. Event ids are random UUIDs, not indexed.

The read side (checkpoints, documents, parked events, timers, the inbox) lives in the same
file, so a subscriber commits its writes and its checkpoint in one transaction. Leases expire
by the machine's clock: every process using the file runs on it.

Schema version 2 added the ``leases`` table: opening a version-1 file creates it (every
statement of ``SCHEMA`` is idempotent and runs on each open). Version 3 stores events in
batches: opening an older file moves each of its events into a batch of its own.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from riverbed.errors import RiverbedError
from riverbed.eventsourcing.errors import (
    ConcurrencyError,
    EventSourcingError,
    HandlerAbortedTransactionError,
    StoreUnavailableError,
)
from riverbed.eventsourcing.records import (
    ParkedEvent,
    Snapshot,
    StoredEvent,
    StreamAppend,
    Timer,
    continues,
    distinct_streams,
)
from riverbed.eventsourcing.stores.api import (
    MAX_BOUND,
    Document,
    check_document_key,
    check_page,
    check_statement,
    check_versions,
    document_text,
)
from riverbed.eventsourcing.stores.batches import (
    decoded,
    first_after,
    in_range,
    joined_records,
    rows_decoded,
    runs,
    versions,
)
from riverbed.eventsourcing.stores.guesses import PositionGuess, first_save
from riverbed.log.sqlite.store import write_transaction
from riverbed.sqlite_file import SqliteFile, synchronous_option
from riverbed.urls import BackendUrl

SCHEMA_VERSION = 3
POLL_S = 0.001
KEY_BYTES = 32
# Events per batch row, at most; reads go back this many positions (or versions) for the row
# that holds the first one asked for.
BATCH_EVENTS = 64
BATCH_BYTES = 16 * 1024 * 1024  # payloads and metadata per batch row, at most (or one event)

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS batches (
    position INTEGER PRIMARY KEY,
    stream TEXT NOT NULL,
    version INTEGER NOT NULL,
    count INTEGER NOT NULL,
    records BLOB NOT NULL,
    UNIQUE (stream, version)
)
    """,
    # A new stream's first save (_insert_new_stream), refused if the stream holds events.
    """
CREATE VIEW IF NOT EXISTS new_streams AS SELECT position, stream, version, count, records
FROM batches
    """,
    """
CREATE TRIGGER IF NOT EXISTS new_streams_insert INSTEAD OF INSERT ON new_streams BEGIN
    SELECT RAISE(ABORT, 'the stream holds events')
    WHERE EXISTS (SELECT 1 FROM batches WHERE stream = NEW.stream);
    INSERT INTO batches (position, stream, version, count, records)
    VALUES (NEW.position, NEW.stream, NEW.version, NEW.count, NEW.records);
END
    """,
    """
CREATE TABLE IF NOT EXISTS snapshots (
    stream TEXT NOT NULL,
    version INTEGER NOT NULL,
    type TEXT NOT NULL,
    schema INTEGER NOT NULL,
    data BLOB NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    PRIMARY KEY (stream, version)
) WITHOUT ROWID
    """,
    """
CREATE TABLE IF NOT EXISTS stream_keys (stream TEXT PRIMARY KEY, key BLOB NOT NULL) WITHOUT ROWID
    """,
    """
CREATE TABLE IF NOT EXISTS checkpoints (name TEXT PRIMARY KEY, position INTEGER NOT NULL)
    WITHOUT ROWID
    """,
    """
CREATE TABLE IF NOT EXISTS documents (
    collection TEXT NOT NULL,
    key TEXT NOT NULL,
    document TEXT NOT NULL,
    PRIMARY KEY (collection, key)
) WITHOUT ROWID
    """,
    """
CREATE TABLE IF NOT EXISTS parked (
    projection TEXT NOT NULL,
    position INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    type TEXT NOT NULL,
    error TEXT NOT NULL,
    parked_ms INTEGER NOT NULL,
    PRIMARY KEY (projection, position)
) WITHOUT ROWID
    """,
    """
CREATE TABLE IF NOT EXISTS inbox (name TEXT NOT NULL, event_id TEXT NOT NULL,
    PRIMARY KEY (name, event_id)) WITHOUT ROWID
    """,
    """
CREATE TABLE IF NOT EXISTS timers (
    name TEXT NOT NULL,
    key TEXT NOT NULL,
    due_ms INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (name, key)
) WITHOUT ROWID
    """,
    """
CREATE INDEX IF NOT EXISTS timers_due ON timers (name, due_ms)
    """,
    """
CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, owner TEXT NOT NULL,
    expires_ms INTEGER NOT NULL) WITHOUT ROWID
    """,
)

log = logging.getLogger("riverbed.events")
# Rows of each table but the batches, whose events footprint() counts.
_TABLES = ("snapshots", "stream_keys", "checkpoints", "documents", "parked", "inbox",
           "timers", "leases")  # fmt: skip
# Takes the lease when it is free, already ours or expired; parameters: name, owner, the new
# expiry, now.
_ACQUIRE_LEASE = (
    "INSERT INTO leases (name, owner, expires_ms) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE "
    "SET owner = excluded.owner, expires_ms = excluded.expires_ms "
    "WHERE leases.owner = excluded.owner OR leases.expires_ms <= ?"
)
_RENEW_LEASE = "UPDATE leases SET expires_ms = ? WHERE name = ? AND owner = ?"


class SqliteEventStore:
    """``sqlite:///path/events.db?fsync=normal``."""

    def __init__(self, url: BackendUrl) -> None:
        options = url.pop_options({"fsync": "normal"})
        self.url = url.raw
        self.path = Path(url.location)
        self._file = SqliteFile(
            self.path,
            synchronous_option(url, options),
            "event store",
            background_checkpoints=True,
        )
        try:
            self._file.create_schema(SCHEMA, SCHEMA_VERSION, _upgrade)
        except sqlite3.OperationalError as error:
            self._file.close()
            raise (_locked(error) or _cannot_open(self.path, error)) from error
        except (sqlite3.DatabaseError, OSError) as error:
            self._file.close()
            raise _cannot_open(self.path, error) from error
        except RiverbedError:  # a file of a newer riverbed
            self._file.close()  # its connection, and the checkpointing thread that started
            raise
        self._guess = PositionGuess()

    @property
    def _conn(self) -> sqlite3.Connection:
        """This thread's connection: projections and relays read from their own threads."""
        return self._file.conn

    # Appending

    def append(self, appends: Sequence[StreamAppend]) -> int:
        conn = self._conn
        if conn.in_transaction:  # a subscriber's: the append joins it, as on PostgreSQL
            return _append(conn, appends)
        first = first_save(appends)
        last = None if first is None or len(first.events) > BATCH_EVENTS else self._guess.take()
        if first is not None and last is not None:
            try:
                position = _insert_new_stream(conn, first, last)
            except sqlite3.IntegrityError as error:  # the checked append below names a conflict
                if "batches.position" in str(error):
                    self._guess.stale()
            else:
                if position is not None:
                    self._guess.committed(position)
                    return position
        with _write_transaction(conn):
            position = _append(conn, appends)
        self._guess.committed(position)
        return position

    def _writing(self) -> AbstractContextManager[sqlite3.Connection]:
        """A write transaction; inside this thread's open one (a subscriber's handler saving a
        snapshot), the write joins it, as on PostgreSQL. Not a generator: a save that takes a
        snapshot opens one."""
        conn = self._conn
        return nullcontext(conn) if conn.in_transaction else _write_transaction(conn)

    # Reading

    def read_stream(
        self, stream: str, from_version: int = 1, to_version: int | None = None
    ) -> list[StoredEvent]:
        return _read_stream(self._conn, stream, from_version, to_version)

    def stream_version(self, stream: str) -> int:
        return _stream_version(self._conn, stream)

    def read_all(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        check_page(after, limit)
        return _read_all(self._conn, after, limit)

    def last_position(self) -> int:
        return _last_position(self._conn)

    def holds_write_lock(self) -> bool:
        return self._conn.in_transaction

    def wait_for_events(self, after: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            version = self._conn.execute("PRAGMA data_version").fetchone()[0]
            if self.last_position() > after:
                return True
            while self._conn.execute("PRAGMA data_version").fetchone()[0] == version:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                time.sleep(min(POLL_S, remaining))

    # Snapshots and keys

    def save_snapshot(self, snapshot: Snapshot) -> None:
        with self._writing() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO snapshots (stream, version, type, schema, data, "
                "timestamp_ms) VALUES (?, ?, ?, ?, ?, ?)",
                (snapshot.stream, snapshot.version, snapshot.type, snapshot.schema,
                 snapshot.data, snapshot.timestamp_ms),
            )  # fmt: skip
            # Only the latest snapshot matters for loading; older ones would only grow the file.
            conn.execute(
                "DELETE FROM snapshots WHERE stream = ? AND version < ?",
                (snapshot.stream, snapshot.version),
            )

    def load_snapshot(self, stream: str, max_version: int | None = None) -> Snapshot | None:
        row = self._conn.execute(
            "SELECT stream, version, type, schema, data, timestamp_ms FROM snapshots "
            "WHERE stream = ? AND version <= ? ORDER BY version DESC LIMIT 1",
            (stream, max_version if max_version is not None else 2**62),
        ).fetchone()
        return Snapshot(*row) if row is not None else None

    def stream_key(self, stream: str, create: bool) -> bytes | None:
        row = self._conn.execute(
            "SELECT key FROM stream_keys WHERE stream = ?", (stream,)
        ).fetchone()
        if row is not None or not create:
            return row[0] if row is not None else None
        with self._writing() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO stream_keys (stream, key) VALUES (?, ?)",
                (stream, os.urandom(KEY_BYTES)),
            )
            key: bytes = conn.execute(
                "SELECT key FROM stream_keys WHERE stream = ?", (stream,)
            ).fetchone()[0]
        return key

    def delete_stream_key(self, stream: str) -> bool:
        with self._writing() as conn:  # in a handler's transaction, it joins it
            return conn.execute("DELETE FROM stream_keys WHERE stream = ?", (stream,)).rowcount > 0

    # The read side

    @contextmanager
    def transaction(self, name: str) -> Iterator[SqliteTransaction]:
        if self._conn.in_transaction:
            # SQLite has one writer: a subscriber's transaction cannot wait for another one
            # this thread holds open.
            raise EventSourcingError(
                f"cannot open transaction {name!r} of the SQLite event store inside another of "
                "this thread (an Inbox.handle inside a handler, say): handle it after that one"
            )
        # BEGIN IMMEDIATE takes the file's write lock: subscriber transactions never interleave.
        with _write_transaction(self._conn) as conn:
            tx = SqliteTransaction(conn, name)
            yield tx
            tx.check_open()

    def checkpoint(self, name: str) -> int:
        return _checkpoint(self._conn, name)

    def get_document(self, collection: str, key: str) -> Document | None:
        check_document_key(collection, key)
        return _get_document(self._conn, collection, key)

    def documents(self, collection: str, limit: int | None = None) -> dict[str, Document]:
        check_document_key(collection, "")
        rows = self._conn.execute(
            "SELECT key, document FROM documents WHERE collection = ? ORDER BY key LIMIT ?",
            (collection, -1 if limit is None else limit),
        )
        return {key: json.loads(document) for key, document in rows}

    def parked(self, projection: str) -> list[ParkedEvent]:
        rows = self._conn.execute(
            "SELECT projection, position, event_id, type, error, parked_ms FROM parked "
            "WHERE projection = ? ORDER BY position",
            (projection,),
        ).fetchall()
        return [ParkedEvent(*row) for row in rows]

    def parked_count(self, projection: str) -> int:
        query = "SELECT count(*) FROM parked WHERE projection = ?"
        return int(self._conn.execute(query, (projection,)).fetchone()[0])

    def unpark(self, projection: str, position: int) -> bool:
        with self._writing() as conn:
            return _unpark(conn, projection, position)

    def acquire_lease(self, name: str, owner: str, ttl_ms: int) -> bool:
        with self._writing() as conn:
            now = _now_ms()  # read under the write lock, which may take a while to get
            return conn.execute(_ACQUIRE_LEASE, (name, owner, now + ttl_ms, now)).rowcount == 1

    def release_lease(self, name: str, owner: str) -> None:
        with self._writing() as conn:
            conn.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))

    def footprint(self) -> int:
        conn = self._conn
        events: int = conn.execute("SELECT coalesce(sum(count), 0) FROM batches").fetchone()[0]
        return events + sum(
            int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]) for table in _TABLES
        )

    def close(self) -> None:
        self._file.close()


class SqliteTransaction:
    """A subscriber's transaction on the store's file (``Transaction`` in the contract)."""

    def __init__(self, conn: sqlite3.Connection, name: str) -> None:
        self._connection = conn
        self.name = name
        self._checkpoint: int | None = None

    @property
    def checkpoint(self) -> int:
        if self._checkpoint is None:
            self._checkpoint = _checkpoint(self._conn, self.name)
        return self._checkpoint

    def set_checkpoint(self, position: int) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO checkpoints (name, position) VALUES (?, ?)",
            (self.name, position),
        )
        self._checkpoint = position

    def get(self, collection: str, key: str) -> Document | None:
        check_document_key(collection, key)
        return _get_document(self._conn, collection, key)

    def put(self, collection: str, key: str, document: Document) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO documents (collection, key, document) VALUES (?, ?, ?)",
            (collection, key, document_text(collection, key, document)),
        )

    def delete(self, collection: str, key: str) -> None:
        check_document_key(collection, key)
        self._conn.execute(
            "DELETE FROM documents WHERE collection = ? AND key = ?", (collection, key)
        )

    def drop(self, collection: str) -> None:
        self._conn.execute("DELETE FROM documents WHERE collection = ?", (collection,))

    def drop_prefixed(self, prefix: str) -> None:
        self._conn.execute(
            "DELETE FROM documents WHERE substr(collection, 1, ?) = ?", (len(prefix), prefix)
        )

    @property
    def _conn(self) -> sqlite3.Connection:
        """The connection, while the transaction is open: after a handler ended it, each
        statement would commit on its own."""
        self.check_open()
        return self._connection

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        conn = self._connection
        conn.execute("SAVEPOINT riverbed_handler")
        try:
            yield
            self.check_open()
        except BaseException:
            self._checkpoint = None  # the block may have moved it
            if conn.in_transaction:
                conn.execute("ROLLBACK TO riverbed_handler")
                conn.execute("RELEASE riverbed_handler")
            else:  # the block ended it: the failure is settled in a new one
                conn.execute("BEGIN IMMEDIATE")
            raise
        conn.execute("RELEASE riverbed_handler")

    def check_open(self) -> None:
        """Raise if a handler ended the transaction."""
        if not self._connection.in_transaction:
            raise HandlerAbortedTransactionError(
                "the handler ended the store's transaction (a COMMIT or ROLLBACK, or a statement "
                "such as INSERT OR ROLLBACK): what it wrote before that is out of riverbed's hands"
            )

    def park(self, parked: ParkedEvent) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO parked (projection, position, event_id, type, error, "
            "parked_ms) VALUES (?, ?, ?, ?, ?, ?)",
            (parked.projection, parked.position, parked.event_id, parked.type, parked.error,
             parked.parked_ms),
        )  # fmt: skip

    def unpark(self, projection: str, position: int) -> bool:
        return _unpark(self._conn, projection, position)

    def seen(self, event_id: str) -> bool:
        inserted = self._conn.execute(
            "INSERT OR IGNORE INTO inbox (name, event_id) VALUES (?, ?)", (self.name, event_id)
        ).rowcount
        return inserted == 0

    def append(self, appends: Sequence[StreamAppend]) -> int:
        return _append(self._conn, appends)

    def read_stream(
        self, stream: str, from_version: int = 1, to_version: int | None = None
    ) -> list[StoredEvent]:
        return _read_stream(self._conn, stream, from_version, to_version)

    def set_timer(self, key: str, due_ms: int, data: bytes) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO timers (name, key, due_ms, data) VALUES (?, ?, ?, ?)",
            (self.name, key, due_ms, data),
        )

    def cancel_timer(self, key: str) -> None:
        self._conn.execute("DELETE FROM timers WHERE name = ? AND key = ?", (self.name, key))

    def due_timers(self, now_ms: int, limit: int = 100) -> list[Timer]:
        rows = self._conn.execute(
            "SELECT name, key, due_ms, data FROM timers WHERE name = ? AND due_ms <= ? "
            "ORDER BY due_ms, key LIMIT ?",
            (self.name, now_ms, limit),
        ).fetchall()
        return [Timer(*row) for row in rows]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        check_statement(sql)
        rows = self._conn.execute(sql, params).fetchall()
        self.check_open()  # INSERT OR ROLLBACK, a trigger's RAISE(ROLLBACK): it ended here
        return rows

    def renew_lease(self, name: str, owner: str, ttl_ms: int) -> bool:
        # The transaction holds the file's write lock: nobody takes the lease before it ends.
        return self._conn.execute(_RENEW_LEASE, (_now_ms() + ttl_ms, name, owner)).rowcount == 1


# Rows per INSERT (a save of several streams, or of more than BATCH_EVENTS events, has several):
# one statement binding many rows cost 13% less than a row per statement (executemany), and
# sqlite3 caches the at most INSERT_ROWS statement texts.
INSERT_ROWS = 64
_ROW_COLUMNS = ("position", "stream", "version", "count", "records")
_ROW = "(" + ", ".join("?" * len(_ROW_COLUMNS)) + ")"
_INSERT_NEW_STREAM = f"INSERT INTO new_streams ({', '.join(_ROW_COLUMNS)}) VALUES {_ROW}"


@functools.cache
def _insert(rows: int) -> str:
    return f"INSERT INTO batches ({', '.join(_ROW_COLUMNS)}) VALUES " + ", ".join([_ROW] * rows)


def _upgrade(conn: sqlite3.Connection, found: int) -> None:
    """A file of schema version 1 or 2 (a row per event) as version 3: each event a batch.
    Other processes wait for the write lock meanwhile: a large file takes a while."""
    old = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'")
    if found and old.fetchone() is not None:
        moved = conn.execute(
            "INSERT INTO batches (position, stream, version, count, records) "
            "SELECT position, stream, version, 1, record FROM events"
        ).rowcount
        conn.execute("DROP TABLE events")
        log.info("event store upgraded to schema version %d: %d events moved", SCHEMA_VERSION,
                 moved)  # fmt: skip


def _append(conn: sqlite3.Connection, appends: Sequence[StreamAppend]) -> int:
    """Check every stream's version, then insert all the events, positions following the last
    (the caller holds the write lock)."""
    if len(appends) > 1:
        distinct_streams(appends)
    position: int | None = None
    for append in appends:
        expected = append.expected_version
        if expected is not None:
            if position is None:  # the first check also reads the last position: one query
                actual, position = conn.execute(_VERSION_AND_POSITION, (append.stream,)).fetchone()
            else:
                actual = _stream_version(conn, append.stream)
            if actual != expected:
                raise ConcurrencyError(append.stream, expected, actual)
        if not continues(append):  # then the version check leaves none of them stored
            _check_unstored(conn, append)
    if position is None:
        position = _last_position(conn)
    values, position = _rows(appends, position)
    step = INSERT_ROWS * len(_ROW_COLUMNS)
    try:
        for start in range(0, len(values), step):
            chunk = values[start : start + step]
            conn.execute(_insert(len(chunk) // len(_ROW_COLUMNS)), chunk)
    except sqlite3.IntegrityError as error:  # the checks above leave none, but to be sure
        raise EventSourcingError(f"cannot append: {error}") from error
    return position


def _check_unstored(conn: sqlite3.Connection, append: StreamAppend) -> None:
    """Refuse events of versions the stream holds, or that the append gives twice: a query per
    run of consecutive versions, as the rows will hold them."""
    seen: set[int] = set()
    runs: list[list[int]] = []  # each run's first and last version
    for event in append.events:
        version = event.version
        if version in seen:
            raise _stored(append.stream, version, "given twice")
        seen.add(version)
        if runs and version == runs[-1][1] + 1:
            runs[-1][1] = version
        else:
            runs.append([version, version])
    for first, last in runs:
        row = conn.execute(_FIRST_HELD, (first, append.stream, first, last, first)).fetchone()
        if row is not None:
            raise _stored(append.stream, row[0], "stored already")


def _stored(stream: str, version: int, why: str) -> EventSourcingError:
    return EventSourcingError(f"cannot append: version {version} of stream {stream!r} is {why}")


def _insert_new_stream(conn: sqlite3.Connection, append: StreamAppend, last: int) -> int | None:
    """A new stream's first save as one INSERT, its own transaction, numbering its events on
    from ``last``; the last position, or None if its events take more than a row. No query
    checks it: the primary key refuses it if another writer appended since
    (``sqlite3.IntegrityError``), and the view new_streams if the stream holds events. A
    10-event save took ~15% less time without the BEGIN, the query and the COMMIT statement.
    ``last`` is the last position of this store's last committed append, so it can only be
    behind (a hand deletion of the last events would leave a gap, which reads pass over)."""
    values, position = _rows((append,), last)
    if len(values) != len(_ROW_COLUMNS):
        return None
    try:
        conn.execute(_INSERT_NEW_STREAM, values)
    except sqlite3.OperationalError as error:  # the busy timeout, as BEGIN IMMEDIATE's
        raise (_locked(error) or error) from None
    return position


def _rows(appends: Sequence[StreamAppend], position: int) -> tuple[list[object], int]:
    """The batch rows' columns one after the other, for the appends' events numbered on from
    ``position``; the last position."""
    values: list[object] = []
    for append in appends:
        for run in runs(append.events, BATCH_EVENTS, BATCH_BYTES):
            records = joined_records(run, position + 1)
            values += (position + 1, append.stream, run[0].version, len(run), records)
            position += len(run)
    return values, position


def _unpark(conn: sqlite3.Connection, projection: str, position: int) -> bool:
    sql = "DELETE FROM parked WHERE projection = ? AND position = ?"
    return conn.execute(sql, (projection, position)).rowcount > 0


def _read_stream(
    conn: sqlite3.Connection, stream: str, from_version: int, to_version: int | None
) -> list[StoredEvent]:
    check_versions(from_version, to_version)
    upto = to_version if to_version is not None else MAX_BOUND
    # The rows holding a version from from_version to upto: one starts at most BATCH_EVENTS - 1
    # versions before from_version.
    where = "FROM batches WHERE stream = ? AND version > ? AND version <= ? AND version + count > ?"
    params = (stream, from_version - BATCH_EVENTS, upto, from_version)
    joined = _joined(conn, "NULL", where, params)
    found = None if joined is None else decoded(joined[0], joined[1])
    if found is None:
        found = rows_decoded(conn.execute(f"SELECT {_PAGE_COLUMNS} {where}", params).fetchall())
    return versions(found, from_version, upto)


def _read_all(conn: sqlite3.Connection, after: int, limit: int) -> list[StoredEvent]:
    """The page of positions after ``after``. An append numbers its events on from the last
    position, so positions run without gaps and the page is a range of them, which SQLite
    joins in one scan: with ORDER BY and LIMIT instead, the same page took 3-4 times as long.
    A range that comes out short while later events exist means gaps (rows deleted by hand):
    that page is read with the LIMIT."""
    joined = _joined(
        conn,
        f"({_LAST_POSITION})",
        # The rows holding a position after ``after`` up to after + limit: one starts at most
        # BATCH_EVENTS - 1 positions before after + 1.
        "FROM batches WHERE position > ? AND position <= ? AND position + count > ?",
        (after - BATCH_EVENTS + 1, min(after + limit, MAX_BOUND), after + 1),
    )
    found = None
    if joined is not None:
        count, records, last = joined
        events = decoded(count, records)
        if events is not None:
            found = in_range(events, after, limit, last)
    if found is None:
        rows = conn.execute(
            f"SELECT {_PAGE_COLUMNS} FROM batches WHERE position > ? AND position + count > ? "
            "ORDER BY position LIMIT ?",  # each row holds an event after ``after``
            (after - BATCH_EVENTS + 1, after + 1, limit),
        ).fetchall()
        found = first_after(rows_decoded(rows), after, limit)
    return found


def _joined(
    conn: sqlite3.Connection, extra: str, where: str, params: tuple[Any, ...]
) -> tuple[int, bytes | None, int | None] | None:
    """The count of the events in the rows ``where`` selects, their records joined in one blob
    by SQLite, and the ``extra`` column (read_all's: the store's last position); None past
    SQLite's length limit (1 GB)."""
    try:
        row: tuple[int, bytes | None, int | None] = conn.execute(
            "SELECT coalesce(sum(count), 0), CAST(group_concat(records, '') AS BLOB), "
            f"{extra} {where}",
            params,
        ).fetchone()
    except sqlite3.DataError:  # string or blob too big
        return None
    return row


_PAGE_COLUMNS = "position, count, records"
_LAST_POSITION = "SELECT position + count - 1 FROM batches ORDER BY position DESC LIMIT 1"
_STREAM_VERSION = (
    "SELECT version + count - 1 FROM batches WHERE stream = ? ORDER BY version DESC LIMIT 1"
)
_VERSION_AND_POSITION = f"SELECT coalesce(({_STREAM_VERSION}), 0), coalesce(({_LAST_POSITION}), 0)"
# The first version from (1) to (4) that stream (2) holds: rows that start at most BATCH_EVENTS -
# 1 versions before (3), not after (4), and end after (5).
_FIRST_HELD = (
    "SELECT max(version, ?) FROM batches WHERE stream = ? AND version > ? - "
    f"{BATCH_EVENTS} AND version <= ? AND version + count > ? ORDER BY version LIMIT 1"
)


def _last_position(conn: sqlite3.Connection) -> int:
    row = conn.execute(_LAST_POSITION).fetchone()
    return 0 if row is None else int(row[0])


def _stream_version(conn: sqlite3.Connection, stream: str) -> int:
    row = conn.execute(_STREAM_VERSION, (stream,)).fetchone()
    return 0 if row is None else int(row[0])


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _checkpoint(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT position FROM checkpoints WHERE name = ?", (name,)).fetchone()
    return int(row[0]) if row is not None else 0


def _get_document(conn: sqlite3.Connection, collection: str, key: str) -> Document | None:
    row = conn.execute(
        "SELECT document FROM documents WHERE collection = ? AND key = ?", (collection, key)
    ).fetchone()
    if row is None:
        return None
    document: Document = json.loads(row[0])
    return document


class _write_transaction(write_transaction):  # noqa: N801 - used as a function
    """``write_transaction``, whose wait for the write lock is an outage once it outlasts the
    busy timeout (another process's transaction held it that long): waited out, not fatal."""

    __slots__ = ()

    def __enter__(self) -> sqlite3.Connection:
        try:
            return super().__enter__()
        except sqlite3.OperationalError as error:
            raise (_locked(error) or error) from None


def _locked(error: sqlite3.OperationalError) -> StoreUnavailableError | None:
    """The outage another process's writer made, holding the file's write lock past the busy
    timeout (a minute): waited out, not fatal. None for another error."""
    if "locked" not in str(error):
        return None
    return StoreUnavailableError(
        f"the SQLite event store stayed locked by another writer for a minute (a transaction "
        f"held open that long): {error}"
    )


def _cannot_open(path: Path, error: Exception) -> EventSourcingError:
    # Not an outage to wait out: a file that is no database, a directory, no access.
    return EventSourcingError(
        f"cannot open the event store {str(path)!r}: {error}; check the events URL"
    )
