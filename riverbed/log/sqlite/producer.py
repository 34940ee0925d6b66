"""The embedded log's producer: buffers records per partition and appends them as batch rows.

All partitions' pending records go to the file in one write transaction, so a producer killed
mid-stream leaves either whole batches or nothing, and a future resolves only after its batch is
committed. A background thread flushes after ``linger_ms``, runs retention and compaction for the
topics this producer writes to about once a second, and checkpoints the write-ahead log.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from riverbed.log.api import (
    RECORD_OVERHEAD,
    BatchDelivery,
    BatchFuture,
    Closing,
    DeliveryErrors,
    KeyValueHeaders,
    SendFuture,
    check_batch,
    check_partition,
    check_record,
    check_timestamp,
    check_types,
    record_size,
    timed_items,
)
from riverbed.log.errors import ClosedError, DeliveryError, UnknownTopicError
from riverbed.log.partitioner import StickyPartitioner, partition_for_key
from riverbed.log.sqlite import maintenance
from riverbed.log.sqlite.store import AppendNotifier, encode_batch, write_transaction

if TYPE_CHECKING:
    from riverbed.log.sqlite.log import SqliteLog, TopicMeta

MAINTENANCE_INTERVAL_S = 1.0
# SQLite's own checkpoint (wal_autocheckpoint) runs inside whichever commit finds the WAL past
# 1,000 pages, and that commit's caller waits the tens of milliseconds it takes to copy them into
# the database file. A producer turns it off on its connection and has its thread checkpoint,
# on a connection of its own, each time its appends have added this much; well below 1,000 of
# our 16 KiB pages, so that the other connections' automatic checkpoints find little to copy.
CHECKPOINT_BYTES = 4 * 1024 * 1024

# Records sent together share a timestamp and headers: a run keeps them as the (key, value)
# pairs the caller passed, so queueing a record allocates nothing, and one comprehension per run
# builds the stored records at flush time.
Pair = tuple[bytes | None, bytes | None]


class _Run:
    """``timestamps``: each record's own (``send_many(..., timestamps=)``), ``timestamp_ms``
    then being the largest."""

    __slots__ = ("headers", "pairs", "timestamp_ms", "timestamps")

    def __init__(
        self,
        timestamp_ms: int,
        headers: dict[str, bytes] | None,
        pairs: list[Pair] | None = None,
        timestamps: list[int] | None = None,
    ) -> None:
        self.timestamp_ms = timestamp_ms
        self.headers = headers
        self.pairs: list[Pair] = [] if pairs is None else pairs
        self.timestamps = timestamps


class _HeadedRun:
    """Records sent together (``send_batch``) that share a timestamp, each with headers of its
    own. Their keys, values and headers are kept in lists side by side: a tuple per record
    would be one more object for the garbage collector to track, per record, while buffered."""

    __slots__ = ("headers", "keys", "timestamp_ms", "values")

    def __init__(self, timestamp_ms: int) -> None:
        self.timestamp_ms = timestamp_ms
        self.keys: list[bytes | None] = []
        self.values: list[bytes | None] = []
        self.headers: list[dict[str, bytes]] = []


class _PartitionBuffer:
    __slots__ = ("count", "delivery", "futures", "runs")

    def __init__(self, topic: str, partition: int) -> None:
        self.runs: list[_Run | _HeadedRun] = []
        self.count = 0
        self.futures = 0
        self.delivery = BatchDelivery(topic, partition)

    def run_for(self, timestamp_ms: int, headers: dict[str, bytes] | None) -> _Run:
        if self.runs:
            last = self.runs[-1]
            if (
                isinstance(last, _Run)
                and last.timestamps is None
                and last.timestamp_ms == timestamp_ms
                and headers is None
                and last.headers is None
            ):
                return last
        run = _Run(timestamp_ms, headers)
        self.runs.append(run)
        return run


class SqliteProducer(Closing):
    # Whether buffered records are written when lingered or full (not so in a transaction).
    autoflush = True

    def __init__(self, log: SqliteLog, linger_ms: float, batch_size: int) -> None:
        self._log = log
        self._linger_s = linger_ms / 1000
        self._batch_size = batch_size
        self._conn = log.db.connect()
        self._conn.execute("PRAGMA wal_autocheckpoint=0")
        self._appended = AppendNotifier.for_path(log.path)
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._write_lock = threading.Lock()
        self._buffers: dict[tuple[str, int], _PartitionBuffer] = {}
        self._buffered_bytes = 0
        self._first_buffered_at = 0.0
        self._unchecked_bytes = 0  # appended since the last checkpoint
        self._topics: dict[str, TopicMeta] = {}
        self._sticky = StickyPartitioner(batch_size)
        self._errors = DeliveryErrors()
        self._closed = False
        self._flush_method: Callable[[float | None], None] = self.flush
        self._flusher = threading.Thread(
            target=self._flush_loop, name="riverbed-producer", daemon=True
        )
        self._flusher.start()

    def _meta(self, topic: str) -> TopicMeta:
        meta = self._topics.get(topic)
        if meta is None:
            meta = self._topics[topic] = self._log.topic_meta(topic)
        return meta

    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Mapping[str, bytes] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> SendFuture:
        if self._closed:
            raise ClosedError("the producer is closed; create a new one with log.producer()")
        meta = self._topics.get(topic) or self._meta(topic)
        info = meta.info
        # check_record's rules, inlined for the common case (it raises the errors).
        if (key.__class__ is not bytes and key is not None) or (
            value.__class__ is not bytes and value is not None
        ):
            check_types(key, value)
        size = (0 if key is None else len(key)) + (0 if value is None else len(value))
        if headers or size > info.max_record_bytes or (key is None and info.compact):
            size = check_record(info, key, value, headers)
        if partition is None:
            if key is None:
                partition = self._sticky.next(size + RECORD_OVERHEAD, info.partitions)
            else:
                partition = partition_for_key(key, info.partitions)
        else:
            check_partition(info, partition)
        if timestamp_ms is None:
            timestamp_ms = time.time_ns() // 1_000_000
        else:
            check_timestamp(timestamp_ms)
        with self._lock:
            buffer = self._buffer(topic, partition)
            future = BatchFuture(self._flush_method, buffer.delivery, buffer.count, timestamp_ms)
            runs = buffer.runs
            last = runs[-1] if runs else None
            if (
                not headers
                and isinstance(last, _Run)
                and last.timestamp_ms == timestamp_ms
                and not last.headers
            ):
                last.pairs.append((key, value))  # run_for's common case, inlined
            else:
                buffer.run_for(timestamp_ms, dict(headers) if headers else None).pairs.append(
                    (key, value)
                )
            buffer.count += 1
            buffer.futures += 1
            full = self._buffered(size + RECORD_OVERHEAD)
        if full:
            self._write_buffered()
        return future

    def send_many(
        self,
        topic: str,
        items: Iterable[Pair],
        partition: int | None = None,
        headers: Mapping[str, bytes] | None = None,
        timestamps: Sequence[int] | None = None,
    ) -> int:
        if self._closed:
            raise ClosedError("the producer is closed; create a new one with log.producer()")
        info = self._meta(topic).info
        if partition is not None:
            check_partition(info, partition)
        headers_bytes = record_size(None, None, headers)  # checks them
        stamps: dict[int, list[int]] | None = None
        if timestamps is not None:
            items = timed_items(items, timestamps)
            stamps, stamp = {}, iter(timestamps)
        shared = dict(headers) if headers else None
        partitions = info.partitions
        limit = info.max_record_bytes - headers_bytes
        timestamp_ms = time.time_ns() // 1_000_000
        # StickyPartitioner.next, inlined; its state is written back at the end.
        sticky, filled = self._sticky.partition, self._sticky.filled
        share = self._batch_size // partitions
        lists: dict[int, list[Pair]] = {}
        count = 0
        size = 0
        # The checks of check_record, inlined: this loop is the fast path. A record refused
        # raises its error, the ones before it queued (as on Kafka).
        try:
            for item in items:
                key, value = item
                if (key.__class__ is not bytes and key is not None) or (
                    value.__class__ is not bytes and value is not None
                ):
                    check_types(key, value)
                record_bytes = (len(key) if key is not None else 0) + (
                    len(value) if value is not None else 0
                )
                if record_bytes > limit or (key is None and info.compact):
                    check_record(info, key, value, shared)
                record_bytes += headers_bytes
                if partition is not None:
                    target = partition
                elif key is None:
                    filled += record_bytes + RECORD_OVERHEAD
                    if filled >= share:
                        filled = 0
                        sticky += 1
                    target = sticky % partitions
                else:
                    target = partition_for_key(key, partitions)
                pairs = lists.get(target)
                if pairs is None:
                    pairs = lists[target] = []
                pairs.append(item)
                if stamps is not None:
                    stamps.setdefault(target, []).append(next(stamp))
                size += record_bytes + RECORD_OVERHEAD
                if size >= self._batch_size:
                    count += self._enqueue(topic, timestamp_ms, shared, lists, size, stamps)
                    lists, size = {}, 0
                    stamps = None if stamps is None else {}
        finally:
            if lists:
                count += self._enqueue(topic, timestamp_ms, shared, lists, size, stamps)
            self._sticky.partition, self._sticky.filled = sticky, filled
        return count

    def send_batch(self, topic: str, records: Iterable[KeyValueHeaders]) -> list[SendFuture]:
        if self._closed:
            raise ClosedError("the producer is closed; create a new one with log.producer()")
        info = self._meta(topic).info
        records, total = check_batch(info, records)
        if not records:
            return []
        partitions = info.partitions
        timestamp_ms = time.time_ns() // 1_000_000
        # Each record's partition and its place among the batch's records for that partition.
        runs: dict[int, _HeadedRun] = {}
        targets: list[int] = []
        places: list[int] = []
        for key, value, headers in records:
            if key is None:
                size = record_size(key, value, headers) + RECORD_OVERHEAD
                target = self._sticky.next(size, partitions)
            else:
                target = partition_for_key(key, partitions)
            run = runs.get(target)
            if run is None:
                run = runs[target] = _HeadedRun(timestamp_ms)
            targets.append(target)
            places.append(len(run.keys))
            run.keys.append(key)
            run.values.append(value)
            run.headers.append(dict(headers) if headers else {})
        flush = self._flush_method
        with self._lock:
            starts: dict[int, tuple[BatchDelivery, int]] = {}
            for partition, run in runs.items():
                buffer = self._buffer(topic, partition)
                starts[partition] = (buffer.delivery, buffer.count)
                buffer.runs.append(run)
                buffer.count += len(run.keys)
                buffer.futures += len(run.keys)
            futures: list[SendFuture] = []
            for target, place in zip(targets, places, strict=True):
                delivery, start = starts[target]
                futures.append(BatchFuture(flush, delivery, start + place, timestamp_ms))
            full = self._buffered(total + RECORD_OVERHEAD * len(records))
        if full:
            self._write_buffered()
        return futures

    def _enqueue(
        self,
        topic: str,
        timestamp_ms: int,
        headers: dict[str, bytes] | None,
        lists: dict[int, list[Pair]],
        size: int,
        stamps: dict[int, list[int]] | None = None,
    ) -> int:
        """Queue each partition's pairs (stamped ``timestamp_ms``, or each with its entry of
        ``stamps``)."""
        count = 0
        with self._lock:
            for partition, pairs in lists.items():
                buffer = self._buffer(topic, partition)
                if stamps is None:
                    buffer.run_for(timestamp_ms, headers).pairs.extend(pairs)
                else:
                    own = stamps[partition]
                    buffer.runs.append(_Run(max(own), headers, pairs, own))
                buffer.count += len(pairs)
                count += len(pairs)
            full = self._buffered(size)
        if full:
            self._write_buffered()
        return count

    def _buffer(self, topic: str, partition: int) -> _PartitionBuffer:
        """The partition's buffer (the caller holds the lock)."""
        buffer = self._buffers.get((topic, partition))
        if buffer is None:
            buffer = self._buffers[topic, partition] = _PartitionBuffer(topic, partition)
        return buffer

    def _buffered(self, size: int) -> bool:
        """Count ``size`` bytes more buffered, starting the linger with the first; whether the
        buffers are full (the caller holds the lock)."""
        if self._buffered_bytes == 0:
            self._first_buffered_at = time.monotonic()
            self._wakeup.notify()
        self._buffered_bytes += size
        return self._buffered_bytes >= self._batch_size

    def flush(self, timeout: float | None = None) -> None:
        """Write everything buffered; raise ``DeliveryError`` for records that were not written."""
        self._write_buffered()
        self._errors.raise_if_any()

    def _write_buffered(self) -> None:
        # The write lock is taken before the buffers are swapped, so batches reach the file in the
        # order their records were sent even when the flusher thread and a caller race.
        with self._write_lock:
            with self._lock:
                buffers, self._buffers = self._buffers, {}
                self._buffered_bytes = 0
            if buffers:
                self._append(buffers)

    def _append(self, buffers: dict[tuple[str, int], _PartitionBuffer]) -> None:
        written: list[tuple[int, _PartitionBuffer]] = []
        failed: list[tuple[_PartitionBuffer, BaseException]] = []
        try:
            with write_transaction(self._conn) as conn:
                for (topic, partition), buffer in buffers.items():
                    try:
                        base = self._append_batch(conn, topic, partition, buffer)
                    except UnknownTopicError as unknown:
                        failed.append((buffer, unknown))
                        continue
                    written.append((base, buffer))
        except sqlite3.Error as db_error:
            failure = DeliveryError(f"could not append to {self._log.path}: {db_error}")
            failed = [(buffer, failure) for buffer in buffers.values()]
            written = []
        self._settle(written, failed)

    def _settle(
        self,
        written: list[tuple[int, _PartitionBuffer]],
        failed: list[tuple[_PartitionBuffer, BaseException]],
    ) -> None:
        """Wake local consumers and resolve the futures of committed and failed batches (and
        this producer's thread, when a checkpoint is due)."""
        with self._appended:
            self._appended.notify_all()
        if self._unchecked_bytes >= CHECKPOINT_BYTES:
            with self._wakeup:
                self._wakeup.notify()
        for base, buffer in written:
            buffer.delivery.resolve(base)
        for buffer, reason in failed:
            unacknowledged = buffer.count - buffer.futures
            if unacknowledged:
                self._errors.add(str(reason), unacknowledged)
            buffer.delivery.fail(reason)

    def _append_batch(
        self, conn: sqlite3.Connection, topic: str, partition: int, buffer: _PartitionBuffer
    ) -> int:
        meta = self._meta(topic)
        row = conn.execute(
            "SELECT next_offset FROM partitions WHERE topic_id = ? AND partition = ?",
            (meta.topic_id, partition),
        ).fetchone()
        if row is None:
            # Deleted, or deleted and created again under a new id since we cached it.
            del self._topics[topic]
            meta = self._meta(topic)
            row = conn.execute(
                "SELECT next_offset FROM partitions WHERE topic_id = ? AND partition = ?",
                (meta.topic_id, partition),
            ).fetchone()
            if row is None:
                raise UnknownTopicError(topic)
        base: int = row[0]
        records: list[tuple[object, ...]] = []
        offset = base
        for run in buffer.runs:
            if isinstance(run, _HeadedRun):
                ts, keys = run.timestamp_ms, run.keys
                offsets = range(offset, offset + len(keys))
                records += [
                    (topic, partition, o, ts, k, v, h)
                    for o, k, v, h in zip(offsets, keys, run.values, run.headers, strict=True)
                ]
                offset += len(keys)
                continue
            ts, headers, pairs = run.timestamp_ms, run.headers, run.pairs
            offsets = range(offset, offset + len(pairs))
            if run.timestamps is not None:
                records += [
                    (topic, partition, o, t, k, v) if headers is None
                    else (topic, partition, o, t, k, v, headers)
                    for o, t, (k, v) in zip(offsets, run.timestamps, pairs, strict=True)
                ]  # fmt: skip
            elif headers is None:
                records += [
                    (topic, partition, o, ts, k, v)
                    for o, (k, v) in zip(offsets, pairs, strict=True)
                ]
            else:
                records += [
                    (topic, partition, o, ts, k, v, headers)
                    for o, (k, v) in zip(offsets, pairs, strict=True)
                ]
            offset += len(pairs)
        payload, crc = encode_batch(records)
        count = buffer.count
        conn.execute(
            "INSERT INTO batches (topic_id, partition, last_offset, base_offset, record_count, "
            "max_timestamp_ms, payload, crc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                meta.topic_id,
                partition,
                base + count - 1,
                base,
                count,
                max(run.timestamp_ms for run in buffer.runs),
                payload,
                crc,
            ),
        )
        conn.execute(
            "UPDATE partitions SET next_offset = ?, size_bytes = size_bytes + ?, "
            "record_count = record_count + ? WHERE topic_id = ? AND partition = ?",
            (base + count, len(payload), count, meta.topic_id, partition),
        )
        self._unchecked_bytes += len(payload)
        return base

    def _flush_loop(self) -> None:
        next_maintenance = time.monotonic() + MAINTENANCE_INTERVAL_S
        checkpoints: sqlite3.Connection | None = None  # this thread's, opened when first needed
        try:
            while True:
                with self._wakeup:
                    while not self._closed:
                        now = time.monotonic()
                        if self._unchecked_bytes >= CHECKPOINT_BYTES:
                            break
                        if self._buffered_bytes and self.autoflush:
                            remaining = self._first_buffered_at + self._linger_s - now
                            if remaining <= 0:
                                break
                        else:
                            remaining = next_maintenance - now
                            if remaining <= 0:
                                break
                        self._wakeup.wait(remaining)
                    if self._closed:
                        return
                self._write_buffered()
                if self._unchecked_bytes >= CHECKPOINT_BYTES:
                    checkpoints = checkpoints or self._log.db.connect()
                    self._checkpoint(checkpoints)
                if time.monotonic() >= next_maintenance:
                    self._maintain()
                    next_maintenance = time.monotonic() + MAINTENANCE_INTERVAL_S
        finally:
            if checkpoints is not None:
                checkpoints.close()

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """Copy the WAL into the database file, as far as readers allow, without holding up
        writers (PASSIVE); SQLite releases the GIL meanwhile."""
        self._unchecked_bytes = 0
        with contextlib.suppress(sqlite3.OperationalError):  # busy: the next one catches up
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _maintain(self) -> None:
        """Retention and compaction for the topics this producer writes to: records age and
        tombstones expire even when nothing new arrives, so every such topic, every round."""
        with self._write_lock:
            for meta in list(self._topics.values()):
                info = meta.info
                if info.compact or info.retention_ms is not None or info.retention_bytes:
                    # Busy (another process holds the write lock): the next round retries.
                    with contextlib.suppress(sqlite3.OperationalError):
                        maintenance.maintain_topic(self._conn, info.name)

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._write_buffered()
            self._maintain()
        finally:
            with self._wakeup:
                self._closed = True
                self._wakeup.notify()
            self._flusher.join()
            with self._write_lock:
                self._conn.close()
        self._errors.raise_if_any()
