"""State on the embedded log: a table in the log's database, written by the batch's commit.

With exactly-once, the state rows are written inside the transactional producer's commit, so
outputs, state and input offsets are one SQLite transaction. At least once, the outputs are
flushed first, then the state rows and the input offsets are one transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping

from riverbed.log.api import Consumer, Producer, TopicPartition
from riverbed.log.sqlite import groups
from riverbed.log.sqlite.consumer import SqliteConsumer
from riverbed.log.sqlite.log import SqliteLog
from riverbed.log.sqlite.store import write_transaction
from riverbed.log.sqlite.transactions import SqliteTransactionalProducer
from riverbed.streams.state.backend import Changes

SCHEMA = """
CREATE TABLE IF NOT EXISTS stream_state (
    app TEXT NOT NULL,
    store TEXT NOT NULL,
    partition INTEGER NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (app, store, partition, key)
) WITHOUT ROWID
"""


class SqliteState:
    def __init__(self, log: SqliteLog, app: str) -> None:
        self._app = app
        self._conn = log.db.connect()
        with write_transaction(self._conn):
            self._conn.execute(SCHEMA)

    def load(self, store: str, partition: int) -> dict[bytes, bytes]:
        rows = self._conn.execute(
            "SELECT key, value FROM stream_state WHERE app = ? AND store = ? AND partition = ?",
            (self._app, store, partition),
        )
        return dict(rows)

    def commit(
        self,
        producer: Producer,
        consumer: Consumer,
        offsets: Mapping[TopicPartition, int],
        changes: Changes,
        exactly_once: bool,
    ) -> None:
        if exactly_once:
            assert isinstance(producer, SqliteTransactionalProducer)
            producer.commit_transaction(offsets, lambda conn: self._write(conn, changes))
            return
        # Outputs first, then state and offsets together: a crash in between replays the batch
        # onto the state it started from.
        producer.flush()
        assert isinstance(consumer, SqliteConsumer) and consumer.group is not None
        with write_transaction(self._conn) as conn:
            self._write(conn, changes)
            groups.store_offsets(conn, consumer.group, consumer.member_id, offsets)

    def _write(self, conn: sqlite3.Connection, changes: Changes) -> None:
        # Keys and values go in as bytearray: Python's sqlite3 binds a bytes parameter only
        # after a failed lookup for an adapter (bytes is not one of its exact fast-path types),
        # which costs more than the copy and doubles the cost of writing a row.
        app = self._app
        for (store, partition), entries in changes.items():
            conn.executemany(
                "INSERT OR REPLACE INTO stream_state (app, store, partition, key, value) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (app, store, partition, bytearray(k), bytearray(v))
                    for k, v in entries.items()
                    if v is not None
                ],
            )
            conn.executemany(
                "DELETE FROM stream_state WHERE app = ? AND store = ? AND partition = ? "
                "AND key = ?",
                [(app, store, partition, bytearray(k)) for k, v in entries.items() if v is None],
            )

    def release(self, partitions: set[int]) -> None:
        """Nothing to hand over: the next owner reads the same tables."""

    def close(self) -> None:
        self._conn.close()
