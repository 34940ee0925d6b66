"""The embedded log's storage: one SQLite file in WAL mode, one row per record batch.

A batch row holds the msgpack-encoded list of its records, each with its absolute offset, so a
fetch decodes a payload straight into ``Record`` structs at C speed; the row's CRC32 guards the
payload against corruption, which is reported, never returned as records.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import msgspec

from riverbed.log.api import Record
from riverbed.log.errors import CorruptLogError
from riverbed.log.sqlite import kinds

SCHEMA_VERSION = 1

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS topics (
    topic_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    partitions INTEGER NOT NULL,
    compact INTEGER NOT NULL,
    retention_ms INTEGER,
    retention_bytes INTEGER,
    max_record_bytes INTEGER NOT NULL,
    delete_retention_ms INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
)
    """,
    """
CREATE TABLE IF NOT EXISTS partitions (
    topic_id INTEGER NOT NULL,
    partition INTEGER NOT NULL,
    log_start_offset INTEGER NOT NULL DEFAULT 0,
    next_offset INTEGER NOT NULL DEFAULT 0,
    size_bytes INTEGER NOT NULL DEFAULT 0,
    record_count INTEGER NOT NULL DEFAULT 0,
    cleaned_offset INTEGER NOT NULL DEFAULT 0,
    tombstones_due_ms INTEGER,
    PRIMARY KEY (topic_id, partition)
) WITHOUT ROWID
    """,
    """
-- A rowid table keeps large payloads compact on disk and fast to scan, and the index makes a
-- fetch from position P one range scan from the first batch whose last offset is >= P.
CREATE TABLE IF NOT EXISTS batches (
    batch_id INTEGER PRIMARY KEY,
    topic_id INTEGER NOT NULL,
    partition INTEGER NOT NULL,
    last_offset INTEGER NOT NULL,
    base_offset INTEGER NOT NULL,
    record_count INTEGER NOT NULL,
    max_timestamp_ms INTEGER NOT NULL,
    payload BLOB NOT NULL,
    crc INTEGER NOT NULL
)
    """,
    """
CREATE UNIQUE INDEX IF NOT EXISTS batches_by_offset ON batches (topic_id, partition, last_offset)
    """,
    """
CREATE TABLE IF NOT EXISTS groups (
    group_id TEXT PRIMARY KEY,
    generation INTEGER NOT NULL
)
    """,
    """
CREATE TABLE IF NOT EXISTS group_members (
    group_id TEXT NOT NULL,
    member_id TEXT NOT NULL,
    topics TEXT NOT NULL,
    session_timeout_ms INTEGER NOT NULL,
    heartbeat_ms INTEGER NOT NULL,
    PRIMARY KEY (group_id, member_id)
)
    """,
    """
CREATE TABLE IF NOT EXISTS group_offsets (
    group_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    committed_offset INTEGER NOT NULL,
    commit_ms INTEGER NOT NULL,
    PRIMARY KEY (group_id, topic, partition)
) WITHOUT ROWID
    """,
)

FSYNC_MODES = {"normal": "NORMAL", "always": "FULL"}
WAL_SWITCH_TIMEOUT_S = 60.0  # as the busy timeout
WAL_SWITCH_RETRY_S = 0.005

_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(list[Record])


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def encode_batch(records: Sequence[object]) -> tuple[bytes, int]:
    """Payload and CRC32 of a batch of ``Record`` structs or ``Record``-shaped tuples."""
    payload = _encoder.encode(records)
    return payload, zlib.crc32(payload)


def decode_batch(payload: bytes, crc: int, where: str) -> list[Record]:
    if zlib.crc32(payload) != crc:
        raise CorruptLogError(
            f"record batch {where} failed its CRC check: the log file is corrupt; "
            "restore it from a backup or replay the topic from its source"
        )
    try:
        return _batch_decoder.decode(payload)
    except msgspec.DecodeError as error:
        raise CorruptLogError(f"record batch {where} cannot be decoded: {error}") from error


class Database:
    """Opens connections to one log file with the log's pragmas; one connection per thread."""

    def __init__(self, path: Path, fsync: str) -> None:
        self.path = path
        self._synchronous = FSYNC_MODES[fsync]
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            kinds.check_file(path, "log")  # before a connection switches it to WAL
        except sqlite3.DatabaseError as error:
            raise self.corrupt(error) from error
        with self.connect() as conn:
            self._create_schema(conn)

    def connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path, timeout=60.0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA busy_timeout=60000")
            # Only takes effect when the file is created: 16 KiB pages write and scan batch payloads
            # about twice as fast as the 4 KiB default.
            conn.execute("PRAGMA page_size=16384")
            use_wal(conn)
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA cache_size=-65536")
        except sqlite3.DatabaseError as error:
            raise self.corrupt(error) from error
        return conn

    def corrupt(self, error: sqlite3.DatabaseError) -> CorruptLogError:
        return CorruptLogError(
            f"log file {str(self.path)!r} is damaged or not a riverbed log ({error}); "
            "restore it from a backup, or point --url at another file"
        )

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        try:
            with write_transaction(conn):
                kinds.claim(conn, "log", self.path)
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise CorruptLogError(
                        f"log file {str(self.path)!r} has schema version {version}, newer than "
                        f"this riverbed's {SCHEMA_VERSION}; upgrade riverbed"
                    )
                for statement in SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as error:
            raise self.corrupt(error) from error


def use_wal(conn: sqlite3.Connection) -> None:
    """Put the connection's file in WAL mode, where it then stays. The switch takes an
    exclusive lock without waiting on the busy handler: processes that open a new file at once
    (``riverbed worker --processes``) would fail on it, so a busy switch is tried again."""
    deadline = time.monotonic() + WAL_SWITCH_TIMEOUT_S
    while conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        try:
            if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
                return  # a database that cannot be in WAL mode (":memory:") keeps its own
        except sqlite3.OperationalError as error:
            if error.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(WAL_SWITCH_RETRY_S)


class write_transaction:  # noqa: N801 - used as a function: ``with write_transaction(conn)``
    """``BEGIN IMMEDIATE``: take the write lock up front, so reads inside see what they update;
    committed on leaving, rolled back on an exception. A class, not a generator: it opens every
    event-store save and log append, and a generator's context manager cost a save 3%."""

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn

    def __exit__(self, error_type: type[BaseException] | None, *_: object) -> None:
        if error_type is not None and not self._conn.in_transaction:
            return  # a statement inside ended it (INSERT OR ROLLBACK): nothing to roll back
        self._conn.execute("COMMIT" if error_type is None else "ROLLBACK")


@contextmanager
def read_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A consistent snapshot across several SELECTs."""
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        conn.execute("COMMIT")


class AppendNotifier:
    """Wakes consumers of the same file in this process as soon as a producer commits.

    Consumers in other processes notice appends through ``PRAGMA data_version`` polling.
    """

    _by_path: ClassVar[dict[Path, threading.Condition]] = {}
    _lock = threading.Lock()

    @classmethod
    def for_path(cls, path: Path) -> threading.Condition:
        key = path.resolve()
        with cls._lock:
            condition = cls._by_path.get(key)
            if condition is None:
                condition = cls._by_path[key] = threading.Condition()
            return condition
