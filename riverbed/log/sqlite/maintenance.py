"""Retention and compaction of the embedded log, and the time index lookup.

Retention deletes whole batches from the head of a partition (by the batch's newest timestamp or
by the partition's size) and advances its log start offset. Compaction rewrites a partition keeping
the last record per key; offsets never change, and a tombstone (value None) is kept for
``delete_retention_ms`` after its timestamp so that slow readers still see the delete.
"""

from __future__ import annotations

import sqlite3

from riverbed.log.api import Record
from riverbed.log.errors import UnknownTopicError
from riverbed.log.sqlite.store import decode_batch, encode_batch, now_ms, write_transaction

# Kafka's min.cleanable.dirty.ratio: compact once half the partition is new since the last pass.
MIN_CLEANABLE_DIRTY_RATIO = 0.5
COMPACTED_BATCH_RECORDS = 4096


def maintain_topic(conn: sqlite3.Connection, topic: str) -> None:
    """Apply the topic's retention, then compaction if it is compacted and dirty enough."""
    from riverbed.log.sqlite.log import load_topic

    with write_transaction(conn):
        try:
            meta = load_topic(conn, topic)
        except UnknownTopicError:
            return
        info = meta.info
        for partition in range(info.partitions):
            if info.retention_ms is not None:
                _delete_head(
                    conn,
                    meta.topic_id,
                    partition,
                    "max_timestamp_ms < ?",
                    now_ms() - info.retention_ms,
                )
            if info.retention_bytes is not None:
                _enforce_size(conn, meta.topic_id, partition, info.retention_bytes)
            if info.compact:
                _compact_if_dirty(conn, meta.topic_id, topic, partition, info.delete_retention_ms)


def _delete_head(
    conn: sqlite3.Connection, topic_id: int, partition: int, condition: str, bound: int
) -> None:
    """Delete the leading batches that match ``condition``; stop at the first that does not."""
    rows = conn.execute(
        f"SELECT last_offset, ({condition}) AS expired, length(payload) FROM batches "
        "WHERE topic_id = ? AND partition = ? ORDER BY last_offset",
        (bound, topic_id, partition),
    )
    last_deleted = None
    freed = 0
    for last_offset, expired, size in rows:
        if not expired:
            break
        last_deleted = last_offset
        freed += size
    if last_deleted is None:
        return
    records = conn.execute(
        "SELECT coalesce(sum(record_count), 0) FROM batches "
        "WHERE topic_id = ? AND partition = ? AND last_offset <= ?",
        (topic_id, partition, last_deleted),
    ).fetchone()[0]
    conn.execute(
        "DELETE FROM batches WHERE topic_id = ? AND partition = ? AND last_offset <= ?",
        (topic_id, partition, last_deleted),
    )
    conn.execute(
        "UPDATE partitions SET log_start_offset = max(log_start_offset, ?), "
        "size_bytes = size_bytes - ?, record_count = record_count - ? "
        "WHERE topic_id = ? AND partition = ?",
        (last_deleted + 1, freed, records, topic_id, partition),
    )


def _enforce_size(conn: sqlite3.Connection, topic_id: int, partition: int, limit: int) -> None:
    size = conn.execute(
        "SELECT size_bytes FROM partitions WHERE topic_id = ? AND partition = ?",
        (topic_id, partition),
    ).fetchone()[0]
    if size <= limit:
        return
    # Drop the oldest batches until what is left fits, as Kafka drops whole segments.
    excess = size - limit
    freed = 0
    last_deleted = None
    for last_offset, length in conn.execute(
        "SELECT last_offset, length(payload) FROM batches WHERE topic_id = ? AND partition = ? "
        "ORDER BY last_offset",
        (topic_id, partition),
    ):
        if freed >= excess:
            break
        freed += length
        last_deleted = last_offset
    if last_deleted is not None:
        _delete_head(conn, topic_id, partition, "last_offset <= ?", last_deleted)


def _compact_if_dirty(
    conn: sqlite3.Connection, topic_id: int, topic: str, partition: int, delete_retention_ms: int
) -> None:
    next_offset, cleaned, records, tombstones_due = conn.execute(
        "SELECT next_offset, cleaned_offset, record_count, tombstones_due_ms FROM partitions "
        "WHERE topic_id = ? AND partition = ?",
        (topic_id, partition),
    ).fetchone()
    now = now_ms()
    dirty = next_offset - cleaned
    # Also clean when a kept tombstone's time is up, however little was written since.
    due = tombstones_due is not None and tombstones_due <= now
    if not due and (dirty <= 0 or dirty < MIN_CLEANABLE_DIRTY_RATIO * records):
        return
    kept = _last_per_key(conn, topic_id, topic, partition, now - delete_retention_ms)
    tombstone_times = [r.timestamp_ms for r in kept if r.value is None]
    conn.execute("DELETE FROM batches WHERE topic_id = ? AND partition = ?", (topic_id, partition))
    size = 0
    for start in range(0, len(kept), COMPACTED_BATCH_RECORDS):
        size += _insert_batch(
            conn, topic_id, partition, kept[start : start + COMPACTED_BATCH_RECORDS]
        )
    conn.execute(
        "UPDATE partitions SET cleaned_offset = ?, size_bytes = ?, record_count = ?, "
        "tombstones_due_ms = ? WHERE topic_id = ? AND partition = ?",
        (
            next_offset,
            size,
            len(kept),
            min(tombstone_times) + delete_retention_ms if tombstone_times else None,
            topic_id,
            partition,
        ),
    )


def _last_per_key(
    conn: sqlite3.Connection, topic_id: int, topic: str, partition: int, tombstone_horizon: int
) -> list[Record]:
    latest: dict[bytes | None, Record] = {}
    for payload, crc, last_offset in conn.execute(
        "SELECT payload, crc, last_offset FROM batches WHERE topic_id = ? AND partition = ? "
        "ORDER BY last_offset",
        (topic_id, partition),
    ):
        for record in decode_batch(payload, crc, f"{topic}[{partition}]@{last_offset}"):
            # Dict order is insertion order: pop first so a rewritten key moves to its new offset.
            latest.pop(record.key, None)
            latest[record.key] = record
    return [r for r in latest.values() if r.value is not None or r.timestamp_ms > tombstone_horizon]


def _insert_batch(
    conn: sqlite3.Connection, topic_id: int, partition: int, records: list[Record]
) -> int:
    payload, crc = encode_batch(records)
    conn.execute(
        "INSERT INTO batches (topic_id, partition, last_offset, base_offset, record_count, "
        "max_timestamp_ms, payload, crc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            topic_id,
            partition,
            records[-1].offset,
            records[0].offset,
            len(records),
            max(r.timestamp_ms for r in records),
            payload,
            crc,
        ),
    )
    return len(payload)


def offset_for_time(
    conn: sqlite3.Connection, topic_id: int, topic: str, partition: int, timestamp_ms: int
) -> int | None:
    """The first offset whose timestamp is >= ``timestamp_ms``, as Kafka's ListOffsets answers."""
    for payload, crc, last_offset in conn.execute(
        "SELECT payload, crc, last_offset FROM batches WHERE topic_id = ? AND partition = ? "
        "AND max_timestamp_ms >= ? ORDER BY last_offset LIMIT 1",
        (topic_id, partition, timestamp_ms),
    ):
        for record in decode_batch(payload, crc, f"{topic}[{partition}]@{last_offset}"):
            if record.timestamp_ms >= timestamp_ms:
                return record.offset
    return None
