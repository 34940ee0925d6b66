"""State on Kafka: a local SQLite file per store partition, backed by a compacted changelog.

A batch's state changes go to the store's changelog topic in the batch's transaction; only
after it commits are they applied to the local file (merged, in bulk, when many have piled up
or the partition is released), so the file never holds state that Kafka does not. Taking a
partition (on assignment, or after a crash) restores the file by replaying the changelog from
the file's checkpoint to the end; replaying puts the latest values again, so a checkpoint that
is behind (a crash before it was written) costs time, never correctness. The checkpoint is
written when the partition is released: the offset after the worker's own last write there.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import confluent_kafka
from confluent_kafka import TopicPartition as KafkaTopicPartition

from riverbed.errors import RiverbedError
from riverbed.log.api import (
    Consumer,
    Producer,
    SendFuture,
    TopicPartition,
    TransactionalProducer,
)
from riverbed.log.kafka import KafkaLog
from riverbed.streams.state.backend import CHANGELOG_SUFFIX, Changes

RESTORE_BATCH = 10_000
PENDING_LIMIT = 200_000  # committed changes held before they are written to the local files
# A transaction left open by a dead worker holds read_committed readers back until the broker
# aborts it (the producer's transaction timeout); restoring waits at most this long for that.
RESTORE_STALL_S = 120.0


class LocalStore:
    """One store partition's local file: its entries and the changelog offset they reflect."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS state (key BLOB PRIMARY KEY, value BLOB NOT NULL) "
            "WITHOUT ROWID"
        )
        self.conn.execute("CREATE TABLE IF NOT EXISTS checkpoint (next_offset INTEGER NOT NULL)")

    @property
    def checkpoint(self) -> int:
        row = self.conn.execute("SELECT next_offset FROM checkpoint").fetchone()
        return int(row[0]) if row else 0

    def set_checkpoint(self, offset: int) -> None:
        self.conn.execute("BEGIN")
        self.conn.execute("DELETE FROM checkpoint")
        self.conn.execute("INSERT INTO checkpoint (next_offset) VALUES (?)", (offset,))
        self.conn.execute("COMMIT")

    def apply(self, entries: Mapping[bytes, bytes | None]) -> None:
        self.conn.execute("BEGIN")
        self.conn.executemany(
            "INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)",
            [(k, v) for k, v in entries.items() if v is not None],
        )
        self.conn.executemany(
            "DELETE FROM state WHERE key = ?", [(k,) for k, v in entries.items() if v is None]
        )
        self.conn.execute("COMMIT")

    def entries(self) -> dict[bytes, bytes]:
        return dict(self.conn.execute("SELECT key, value FROM state"))

    def close(self) -> None:
        self.conn.close()


class KafkaState:
    def __init__(self, log: KafkaLog, app: str, state_dir: Path) -> None:
        self._log = log
        self._dir = state_dir / app
        self._stores: dict[tuple[str, int], LocalStore] = {}
        # Committed changes not yet written to the local files, per store partition.
        self._pending: dict[tuple[str, int], dict[bytes, bytes | None]] = {}
        self._pending_count = 0
        # The changelog offset after this worker's last committed write, per store partition.
        self._written: dict[tuple[str, int], int] = {}

    def load(self, store: str, partition: int) -> dict[bytes, bytes]:
        self._apply_pending({(store, partition)})
        local = self._stores.get((store, partition))
        if local is None:
            local = LocalStore(self._dir / store / f"{partition}.db")
            self._stores[store, partition] = local
        self._restore(local, store + CHANGELOG_SUFFIX, partition)
        return local.entries()

    def _restore(self, local: LocalStore, topic: str, partition: int) -> None:
        reader = confluent_kafka.Consumer(
            {
                **self._log.client_config,
                "group.id": f"riverbed-restore-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
            }
        )
        try:
            tp = KafkaTopicPartition(topic, partition)
            low, high = reader.get_watermark_offsets(tp, timeout=10)
            start = max(local.checkpoint, low)
            if start >= high:
                return
            reader.assign([KafkaTopicPartition(topic, partition, start)])
            deadline = time.monotonic() + RESTORE_STALL_S
            while True:
                messages = reader.consume(RESTORE_BATCH, timeout=0.2)
                changed: dict[bytes, bytes | None] = {}
                for message in messages:
                    key = message.key()
                    if message.error() is None and key is not None:
                        changed[key] = message.value()
                if changed:
                    local.apply(changed)
                    deadline = time.monotonic() + RESTORE_STALL_S
                # The position steps over transaction markers, so it reaches the high watermark.
                position = reader.position([tp])[0].offset
                if position >= high:
                    break
                if time.monotonic() > deadline:
                    raise RiverbedError(
                        f"restoring state from {topic}[{partition}] stalled at offset {position} "
                        f"of {high} for {RESTORE_STALL_S:.0f} s; is the broker reachable?"
                    )
            local.set_checkpoint(high)
        finally:
            reader.close()

    def commit(
        self,
        producer: Producer,
        consumer: Consumer,
        offsets: Mapping[TopicPartition, int],
        changes: Changes,
        exactly_once: bool,
    ) -> None:
        last_sent: dict[tuple[str, int], SendFuture] = {}
        for (store, partition), entries in changes.items():
            items = list(entries.items())
            if not items:
                continue
            topic = store + CHANGELOG_SUFFIX
            producer.send_many(topic, items[:-1], partition=partition)
            last_key, last_value = items[-1]  # sent alone: its offset ends the file's changes
            last_sent[store, partition] = producer.send(
                topic, last_value, key=last_key, partition=partition
            )
        if exactly_once:
            transactional: TransactionalProducer = producer  # type: ignore[assignment]
            transactional.commit_transaction(offsets)
        else:
            producer.flush()
            consumer.commit(offsets)
        for store_partition, future in last_sent.items():
            self._written[store_partition] = future.result().offset + 1
        # The local files lag behind: the operators hold the current state in memory, and the
        # changelog has everything committed, so writes are merged here and applied in bulk.
        for key, entries in changes.items():
            pending = self._pending.get(key)
            if pending is None:
                self._pending[key] = dict(entries)
            else:
                pending.update(entries)
            self._pending_count += len(entries)
        if self._pending_count > PENDING_LIMIT:
            self._apply_pending(set(self._pending))

    def _apply_pending(self, keys: set[tuple[str, int]]) -> None:
        for key in keys:
            entries = self._pending.pop(key, None)
            if entries:
                self._stores[key].apply(entries)
        self._pending_count = sum(len(entries) for entries in self._pending.values())

    def release(self, partitions: set[int]) -> None:
        for key in [key for key in self._stores if key[1] in partitions]:
            self._apply_pending({key})
            local = self._stores.pop(key)
            try:
                # Up to this worker's last write, not the changelog's end: a worker that was
                # fenced (paused past its session) releases after another took the partition
                # over and wrote past it, and its next restore must replay those writes.
                written = self._written.pop(key, None)
                if written is not None:
                    local.set_checkpoint(written)
            finally:
                local.close()

    def close(self) -> None:
        self.release({partition for _, partition in self._stores})
