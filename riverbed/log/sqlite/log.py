"""``SqliteLog``: the embedded log's topics, offsets and groups (the admin side of the contract)."""

from __future__ import annotations

import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import msgspec

from riverbed.errors import InvalidUrlError, RiverbedError
from riverbed.log.api import (
    DEFAULT_DELETE_RETENTION_MS,
    DEFAULT_MAX_RECORD_BYTES,
    DEFAULT_SESSION_TIMEOUT_MS,
    Closing,
    Consumer,
    GroupDescription,
    GroupMember,
    GroupPartitionOffset,
    PartitionInfo,
    RebalanceCallback,
    TopicDescription,
    TopicInfo,
    TopicPartition,
    check_time,
    consumer_topics,
    lag_of,
    validate_topic,
)
from riverbed.log.errors import (
    ClosedError,
    NoLogError,
    TopicExistsError,
    UnknownGroupError,
    UnknownTopicError,
)
from riverbed.log.sqlite import groups, maintenance
from riverbed.log.sqlite.consumer import SqliteConsumer
from riverbed.log.sqlite.producer import SqliteProducer
from riverbed.log.sqlite.store import Database, now_ms, read_transaction, write_transaction
from riverbed.log.sqlite.transactions import SqliteTransactionalProducer
from riverbed.urls import BackendUrl

T = TypeVar("T")


class TopicMeta(msgspec.Struct, frozen=True):
    """A topic's settings plus its storage id (a re-created topic gets a new id)."""

    topic_id: int
    info: TopicInfo


_TOPIC_COLUMNS = (
    "topic_id, name, partitions, compact, retention_ms, retention_bytes, "
    "max_record_bytes, delete_retention_ms"
)


def _topic_meta(row: tuple[int, str, int, int, int | None, int | None, int, int]) -> TopicMeta:
    topic_id, name, partitions, compact, retention_ms, retention_bytes, max_bytes, delete_ms = row
    info = TopicInfo(
        name=name,
        partitions=partitions,
        compact=bool(compact),
        retention_ms=retention_ms,
        retention_bytes=retention_bytes,
        max_record_bytes=max_bytes,
        delete_retention_ms=delete_ms,
    )
    return TopicMeta(topic_id, info)


def load_topic(conn: sqlite3.Connection, name: str) -> TopicMeta:
    row = conn.execute(f"SELECT {_TOPIC_COLUMNS} FROM topics WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise UnknownTopicError(name)
    return _topic_meta(row)


def load_topics(conn: sqlite3.Connection) -> list[TopicMeta]:
    rows = conn.execute(f"SELECT {_TOPIC_COLUMNS} FROM topics ORDER BY name").fetchall()
    return [_topic_meta(row) for row in rows]


class SqliteLog(Closing):
    """The log in one SQLite file (``sqlite:///path?fsync=normal|always``)."""

    def __init__(self, path: str | Path, fsync: str = "normal", url: str | None = None) -> None:
        self._path = Path(path)
        self._url = url or f"sqlite:///{path}?fsync={fsync}"
        self.db = Database(self._path, fsync)
        self._conn = self.db.connect()
        self._lock = threading.RLock()
        self._closed = False
        self._children: weakref.WeakSet[SqliteProducer | SqliteConsumer] = weakref.WeakSet()

    @classmethod
    def from_url(cls, url: BackendUrl, create: bool = True) -> SqliteLog:
        """The log of ``url``; its file is made if missing, or, unless ``create``, refused."""
        options = url.pop_options({"fsync": "normal"})
        fsync = options["fsync"]
        if fsync not in ("normal", "always"):
            raise InvalidUrlError(
                f"invalid fsync={fsync!r} in {url.raw!r}: use fsync=normal (survives a process "
                "crash) or fsync=always (survives power loss)"
            )
        if not create and not Path(url.location).exists():
            raise NoLogError(
                f"no log at {url.location!r}: the file does not exist; check the URL, or "
                "create a topic there first ('riverbed topics create')"
            )
        return cls(url.location, fsync=fsync, url=url.raw)

    @property
    def url(self) -> str:
        return self._url

    @property
    def path(self) -> Path:
        return self._path

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        if self._closed:
            raise ClosedError("the log is closed; open it again with riverbed.connect()")
        with self._lock:
            try:
                yield self._conn
            except sqlite3.DatabaseError as error:
                if isinstance(error, sqlite3.OperationalError) and "locked" in str(error):
                    raise
                raise self.db.corrupt(error) from error

    def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        with self._connection() as conn, read_transaction(conn):
            return query(conn)

    # Topics

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        compact: bool = False,
        retention_ms: int | None = None,
        retention_bytes: int | None = None,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        delete_retention_ms: int = DEFAULT_DELETE_RETENTION_MS,
    ) -> TopicInfo:
        validate_topic(
            TopicInfo(
                name,
                partitions,
                compact,
                retention_ms,
                retention_bytes,
                max_record_bytes,
                delete_retention_ms,
            )
        )
        with self._connection() as conn, write_transaction(conn):
            try:
                cursor = conn.execute(
                    "INSERT INTO topics (name, partitions, compact, retention_ms, retention_bytes, "
                    "max_record_bytes, delete_retention_ms, created_ms) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        name,
                        partitions,
                        int(compact),
                        retention_ms,
                        retention_bytes,
                        max_record_bytes,
                        delete_retention_ms,
                        now_ms(),
                    ),
                )
            except sqlite3.IntegrityError:
                raise TopicExistsError(name) from None
            conn.executemany(
                "INSERT INTO partitions (topic_id, partition) VALUES (?, ?)",
                [(cursor.lastrowid, p) for p in range(partitions)],
            )
        return self.topic(name)

    def list_topics(self) -> list[TopicInfo]:
        return [meta.info for meta in self._read(load_topics)]

    def topic(self, name: str) -> TopicInfo:
        return self.topic_meta(name).info

    def topic_meta(self, name: str) -> TopicMeta:
        return self._read(lambda conn: load_topic(conn, name))

    def describe_topic(self, name: str) -> TopicDescription:
        def query(conn: sqlite3.Connection) -> TopicDescription:
            meta = load_topic(conn, name)
            rows = conn.execute(
                "SELECT partition, log_start_offset, next_offset, size_bytes FROM partitions "
                "WHERE topic_id = ? ORDER BY partition",
                (meta.topic_id,),
            ).fetchall()
            return TopicDescription(meta.info, [PartitionInfo(*row) for row in rows])

        return self._read(query)

    def delete_topic(self, name: str) -> None:
        with self._connection() as conn, write_transaction(conn):
            meta = load_topic(conn, name)
            for table in ("batches", "partitions", "topics"):
                conn.execute(f"DELETE FROM {table} WHERE topic_id = ?", (meta.topic_id,))
            conn.execute("DELETE FROM group_offsets WHERE topic = ?", (name,))

    def _offsets(self, topic: str, column: str) -> dict[int, int]:
        def query(conn: sqlite3.Connection) -> dict[int, int]:
            meta = load_topic(conn, topic)
            rows = conn.execute(
                f"SELECT partition, {column} FROM partitions WHERE topic_id = ?", (meta.topic_id,)
            ).fetchall()
            return dict(rows)

        return self._read(query)

    def beginning_offsets(self, topic: str) -> dict[int, int]:
        return self._offsets(topic, "log_start_offset")

    def end_offsets(self, topic: str) -> dict[int, int]:
        return self._offsets(topic, "next_offset")

    def offsets_for_times(self, topic: str, timestamp_ms: int) -> dict[int, int | None]:
        check_time(timestamp_ms)

        def query(conn: sqlite3.Connection) -> dict[int, int | None]:
            meta = load_topic(conn, topic)
            return {
                p: maintenance.offset_for_time(conn, meta.topic_id, topic, p, timestamp_ms)
                for p in range(meta.info.partitions)
            }

        return self._read(query)

    def run_maintenance(self, topics: Iterable[str] | None = None) -> None:
        """Apply retention and compaction now; producers also do it about once a second."""
        with self._connection() as conn:
            names = list(topics) if topics is not None else [m.info.name for m in load_topics(conn)]
            for name in names:
                maintenance.maintain_topic(conn, name)

    # Clients

    def producer(self, linger_ms: float = 5.0, batch_size: int = 1_000_000) -> SqliteProducer:
        producer = SqliteProducer(self, linger_ms=linger_ms, batch_size=batch_size)
        self._children.add(producer)
        return producer

    def transactional_producer(
        self, consumer: Consumer, linger_ms: float = 5.0, batch_size: int = 1_000_000
    ) -> SqliteTransactionalProducer:
        if not isinstance(consumer, SqliteConsumer):
            raise RiverbedError(
                "a transactional producer needs a consumer of the same log; "
                "create it with log.consumer(group=...)"
            )
        producer = SqliteTransactionalProducer(
            self, consumer, linger_ms=linger_ms, batch_size=batch_size
        )
        self._children.add(producer)
        return producer

    def consumer(
        self,
        group: str | None = None,
        topics: Iterable[str] = (),
        from_beginning: bool = False,
        session_timeout_ms: int = DEFAULT_SESSION_TIMEOUT_MS,
        on_assign: RebalanceCallback | None = None,
        on_revoke: RebalanceCallback | None = None,
    ) -> SqliteConsumer:
        consumer = SqliteConsumer(
            self,
            group=group,
            topics=consumer_topics(group, topics),
            from_beginning=from_beginning,
            session_timeout_ms=session_timeout_ms,
            on_assign=on_assign,
            on_revoke=on_revoke,
        )
        self._children.add(consumer)
        return consumer

    # Groups

    def list_groups(self) -> list[str]:
        return self._read(groups.list_groups)

    def describe_group(self, group: str) -> GroupDescription:
        def query(conn: sqlite3.Connection) -> GroupDescription:
            gen, assignment = groups.current_assignment(conn, group)
            committed = groups.committed_offsets(conn, group)
            if not assignment and not committed:
                raise UnknownGroupError(group)
            partitions: set[TopicPartition] = set(committed)
            for owned in assignment.values():
                partitions |= owned
            offsets = []
            for topic, partition in sorted(partitions):
                row = conn.execute(
                    "SELECT p.log_start_offset, p.next_offset FROM partitions p "
                    "JOIN topics t USING (topic_id) WHERE t.name = ? AND p.partition = ?",
                    (topic, partition),
                ).fetchone()
                if row is None:
                    continue
                done = committed.get((topic, partition))
                offsets.append(
                    GroupPartitionOffset(topic, partition, done, row[1], lag_of(done, *row))
                )
            members = [
                GroupMember(member_id, sorted(owned))
                for member_id, owned in sorted(assignment.items())
            ]
            return GroupDescription(group, "Stable" if members else "Empty", gen, members, offsets)

        return self._read(query)

    def group_lag(self, group: str) -> dict[TopicPartition, int]:
        return {(o.topic, o.partition): o.lag for o in self.describe_group(group).offsets}

    # Lifecycle

    def close(self) -> None:
        if self._closed:
            return
        for child in list(self._children):
            child.close()
        with self._lock:
            self._closed = True
            self._conn.close()
