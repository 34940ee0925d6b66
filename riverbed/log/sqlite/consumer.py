"""The embedded log's consumer: fetches whole batch rows and hands out records from them.

In a group, a heartbeat thread keeps the membership alive while user code runs, and every poll
first checks the group's generation, so a rebalance is noticed at the next poll. Positions follow
Kafka: a new partition starts at the group's committed offset, else at the reset point (earliest
with ``from_beginning``, latest otherwise); a position that retention deleted, or past the end,
resets the same way.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
import uuid
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from operator import attrgetter
from typing import TYPE_CHECKING

from riverbed.errors import RiverbedError
from riverbed.log.api import (
    MAX_POLL_INTERVAL_MS,
    Closing,
    RebalanceCallback,
    Record,
    TopicPartition,
    check_offset,
    consumer_topics,
)
from riverbed.log.errors import ClosedError, UnknownPartitionError, UnknownTopicError
from riverbed.log.sqlite import groups
from riverbed.log.sqlite.store import AppendNotifier, decode_batch, read_transaction

if TYPE_CHECKING:
    from riverbed.log.sqlite.log import SqliteLog

# Without an in-process wakeup (the producer is in another process) a waiting poll looks for new
# commits this often; PRAGMA data_version makes each look a few microseconds.
CROSS_PROCESS_POLL_S = 0.002
BATCHES_PER_QUERY = 32

_offset_of = attrgetter("offset")


class SqliteConsumer(Closing):
    def __init__(
        self,
        log: SqliteLog,
        group: str | None,
        topics: list[str],
        from_beginning: bool,
        session_timeout_ms: int,
        on_assign: RebalanceCallback | None,
        on_revoke: RebalanceCallback | None,
    ) -> None:
        self._log = log
        self._group = group
        self._topics = consumer_topics(group, topics)
        self._metas = {t: log.topic_meta(t) for t in self._topics}
        self._from_beginning = from_beginning
        self._session_ms = session_timeout_ms
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._conn = log.db.connect()
        self._appended = AppendNotifier.for_path(log.path)
        self._assignment: set[TopicPartition] = set()
        self._positions: dict[TopicPartition, int] = {}
        self._buffers: dict[TopicPartition, list[Record]] = {}
        self._next_start = 0
        self._closed = False
        self._generation = -1
        self._expired = threading.Event()
        self._stop = threading.Event()
        self._last_poll = time.monotonic()
        self._member_id = f"{group}-{uuid.uuid4().hex[:12]}" if group else ""
        self._heartbeats: threading.Thread | None = None
        if group is None:
            self._assign(
                {(t, p) for t in self._topics for p in range(self._metas[t].info.partitions)}
            )
        else:
            try:
                groups.join(self._conn, group, self._member_id, self._topics, session_timeout_ms)
                self._rebalance()
            except BaseException:
                # Joined (or maybe joined) but never handed to the caller: a failed read, Ctrl-C
                # or SIGTERM. Leave now, or the group waits a session timeout for a member that
                # nobody can close.
                self.close()
                raise
            self._heartbeats = threading.Thread(
                target=self._heartbeat_loop, name="riverbed-heartbeat", daemon=True
            )
            self._heartbeats.start()

    @property
    def group(self) -> str | None:
        return self._group

    @property
    def member_id(self) -> str:
        return self._member_id

    @property
    def generation(self) -> int:
        return self._generation

    # Membership

    def _heartbeat_loop(self) -> None:
        assert self._group is not None
        interval = max(self._session_ms / 10_000, 0.05)
        conn = self._log.db.connect()
        try:
            while not self._stop.wait(interval):
                if (time.monotonic() - self._last_poll) * 1000 > MAX_POLL_INTERVAL_MS:
                    # The loop calling poll() is stuck: leave so the partitions move on, as
                    # Kafka does after max.poll.interval.ms.
                    groups.leave(conn, self._group, self._member_id)
                    self._expired.set()
                    continue
                try:
                    if not groups.heartbeat(conn, self._group, self._member_id):
                        self._expired.set()
                except sqlite3.OperationalError:
                    continue  # busy: the next beat retries well within the session timeout
        finally:
            conn.close()

    def _maybe_rebalance(self) -> None:
        assert self._group is not None
        if self._expired.is_set():
            self._expired.clear()
            # Fenced: every partition it had is lost, whatever the group gives it back, as
            # librdkafka's lost partitions are. Its owner may have moved on meanwhile, so what
            # it holds for them (a pipeline's state) is dropped, and taken afresh if it rejoins.
            self._lose(self._assignment)
            groups.join(self._conn, self._group, self._member_id, self._topics, self._session_ms)
        if groups.generation(self._conn, self._group) != self._generation:
            self._rebalance()

    def _rebalance(self) -> None:
        assert self._group is not None
        with read_transaction(self._conn) as conn:
            generation, assignment = groups.current_assignment(conn, self._group)
            committed = groups.committed_offsets(conn, self._group)
        owned = assignment.get(self._member_id, set())
        self._lose(self._assignment - owned)
        # A partition kept across generations may have been owned and advanced by another member
        # in between: never stay behind what the group committed.
        for tp in self._assignment & owned:
            done = committed.get(tp)
            if done is not None and done > self._positions.get(tp, 0):
                self.seek(*tp, done)
        self._generation = generation
        self._assign(owned - self._assignment, committed)

    def _lose(self, revoked: set[TopicPartition]) -> None:
        if not revoked:
            return
        if self._on_revoke is not None:
            self._on_revoke(set(revoked))
        for tp in revoked:
            self._positions.pop(tp, None)
            self._buffers.pop(tp, None)
        self._assignment -= revoked

    def _assign(
        self, added: set[TopicPartition], committed: Mapping[TopicPartition, int] | None = None
    ) -> None:
        self._assignment |= added
        for tp in added:
            start = committed.get(tp) if committed else None
            self._positions[tp] = self._reset_position(tp) if start is None else start
        if added and self._on_assign is not None:
            self._on_assign(set(added))

    def _partition_bounds(self, tp: TopicPartition) -> tuple[int, int]:
        row = self._conn.execute(
            "SELECT log_start_offset, next_offset FROM partitions WHERE topic_id = ? "
            "AND partition = ?",
            (self._metas[tp[0]].topic_id, tp[1]),
        ).fetchone()
        if row is None:
            meta = self._metas[tp[0]]
            deleted = (
                self._conn.execute(
                    "SELECT 1 FROM topics WHERE topic_id = ?", (meta.topic_id,)
                ).fetchone()
                is None
            )
            if deleted:  # since the consumer subscribed (it may have been created anew)
                raise UnknownTopicError(tp[0])
            raise UnknownPartitionError(tp[0], tp[1], meta.info.partitions)
        return row[0], row[1]

    def _reset_position(self, tp: TopicPartition) -> int:
        start, end = self._partition_bounds(tp)
        return start if self._from_beginning else end

    # Reading

    def poll(self, max_records: int = 1000, timeout: float = 1.0) -> list[Record]:
        if self._closed:
            raise ClosedError("the consumer is closed; create a new one with log.consumer()")
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        self._last_poll = time.monotonic()
        deadline = self._last_poll + max(timeout, 0.0)
        try:
            while True:
                version = self._conn.execute("PRAGMA data_version").fetchone()[0]
                if self._group is not None:
                    self._maybe_rebalance()
                records = self._fetch(max_records)
                if records:
                    return records
                while self._conn.execute("PRAGMA data_version").fetchone()[0] == version:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return []
                    with self._appended:
                        self._appended.wait(min(remaining, CROSS_PROCESS_POLL_S))
        except sqlite3.DatabaseError as error:
            if isinstance(error, sqlite3.OperationalError) and "locked" in str(error):
                raise
            raise self._log.db.corrupt(error) from error

    def _fetch(self, max_records: int) -> list[Record]:
        partitions = sorted(self._assignment)
        out: list[Record] = []
        if not partitions:
            return out
        start = self._next_start % len(partitions)
        for index in range(len(partitions)):
            tp = partitions[(start + index) % len(partitions)]
            taken = self._take(tp, max_records - len(out))
            if taken:
                out.extend(taken)
                if len(out) >= max_records:
                    # Serve the next partition first next time, so none starves.
                    self._next_start = start + index + 1
                    break
        return out

    def _take(self, tp: TopicPartition, wanted: int) -> list[Record]:
        buffered = self._buffers.pop(tp, None)
        if not buffered:
            buffered = self._read_batches(tp, wanted)
            if not buffered:
                return []
        taken = buffered[:wanted]
        if len(buffered) > wanted:
            self._buffers[tp] = buffered[wanted:]
        self._positions[tp] = taken[-1].offset + 1
        return taken

    def _read_batches(self, tp: TopicPartition, wanted: int) -> list[Record]:
        position = self._positions[tp]
        records = self._records_at(tp, position, wanted)
        if not records or records[0].offset > position:
            # Nothing at the position itself: retention may have deleted it, or a seek went past
            # the end (reset, as Kafka does on OffsetOutOfRange), or compaction removed it (skip
            # ahead).
            log_start, end = self._partition_bounds(tp)
            if position < log_start or position > end:
                self._buffers.pop(tp, None)
                self._positions[tp] = self._reset_position(tp)
                return self._read_batches(tp, wanted) if self._from_beginning else []
            if not records and position < end:
                # Read again: a producer may have committed between the first read and the
                # bounds, and what it wrote is seen now. Nothing still: the records up to the
                # end, which all committed before the bounds were read, were compacted away.
                records = self._records_at(tp, position, wanted)
                if not records:
                    self._positions[tp] = end
        return records

    def _records_at(self, tp: TopicPartition, position: int, wanted: int) -> list[Record]:
        """The records of the batches from ``position`` on (about ``wanted`` of them)."""
        topic, partition = tp
        records: list[Record] = []
        rows = self._conn.execute(
            "SELECT last_offset, payload, crc FROM batches WHERE topic_id = ? AND partition = ? "
            "AND last_offset >= ? ORDER BY last_offset LIMIT ?",
            (self._metas[topic].topic_id, partition, position, BATCHES_PER_QUERY),
        )
        for last_offset, payload, crc in rows:
            batch = decode_batch(payload, crc, f"{topic}[{partition}]@{last_offset}")
            if not records and batch[0].offset < position:
                batch = batch[bisect_left(batch, position, key=_offset_of) :]
            records.extend(batch)
            if len(records) >= wanted:
                break
        rows.close()
        return records

    # Offsets

    def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        if self._closed:
            raise ClosedError("the consumer is closed; create a new one with log.consumer()")
        if self._group is None:
            raise RiverbedError(
                "this consumer has no group, so it has no offsets to commit; "
                "create it with log.consumer(group='name', ...)"
            )
        to_commit = dict(offsets) if offsets is not None else dict(self._positions)
        for offset in to_commit.values():
            check_offset(offset)
        if to_commit:
            groups.commit_offsets(self._conn, self._group, self._member_id, to_commit)

    def committed(self) -> dict[TopicPartition, int | None]:
        if self._group is None:
            return dict.fromkeys(self._assignment)
        done = groups.committed_offsets(self._conn, self._group)
        return {tp: done.get(tp) for tp in sorted(self._assignment)}

    def position(self, topic: str, partition: int) -> int:
        return self._positions[self._assigned(topic, partition)]

    def _assigned(self, topic: str, partition: int) -> TopicPartition:
        tp = (topic, partition)
        if tp not in self._assignment:
            raise RiverbedError(
                f"partition {topic}[{partition}] is not assigned to this consumer; "
                f"its assignment is {sorted(self._assignment)}"
            )
        return tp

    def seek(self, topic: str, partition: int, offset: int) -> None:
        tp = self._assigned(topic, partition)
        check_offset(offset)
        self._buffers.pop(tp, None)
        self._positions[tp] = offset

    def seek_to_beginning(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        for topic, partition in list(partitions or self._assignment):
            self.seek(topic, partition, self._partition_bounds((topic, partition))[0])

    def seek_to_end(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        for topic, partition in list(partitions or self._assignment):
            self.seek(topic, partition, self._partition_bounds((topic, partition))[1])

    def assignment(self) -> set[TopicPartition]:
        return set(self._assignment)

    # Lifecycle

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._heartbeats is not None:
            self._heartbeats.join()
        if self._group is not None:
            # If leaving fails, the session timeout removes the member instead.
            with contextlib.suppress(sqlite3.Error):
                groups.leave(self._conn, self._group, self._member_id)
        self._conn.close()
