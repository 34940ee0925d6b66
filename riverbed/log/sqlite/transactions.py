"""Exactly-once on the embedded log: a producer whose records wait for ``commit_transaction``.

Commit appends the transaction's batches, stores the bound consumer's offsets (fenced by its
group generation) and runs the caller's own writes (stream state) in one SQLite write
transaction, so all of them are durable together or not at all. Before the commit nothing of the
transaction is in the file, so every consumer reads committed records only.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from riverbed.errors import RiverbedError
from riverbed.log.api import KeyValueHeaders, SendFuture, TopicPartition
from riverbed.log.errors import DeliveryError, TransactionAbortedError, TransactionStateError
from riverbed.log.sqlite import groups
from riverbed.log.sqlite.producer import Pair, SqliteProducer, _PartitionBuffer
from riverbed.log.sqlite.store import write_transaction

if TYPE_CHECKING:
    from riverbed.log.sqlite.consumer import SqliteConsumer
    from riverbed.log.sqlite.log import SqliteLog

StateWriter = Callable[[sqlite3.Connection], None]


class SqliteTransactionalProducer(SqliteProducer):
    autoflush = False

    def __init__(
        self, log: SqliteLog, consumer: SqliteConsumer, linger_ms: float, batch_size: int
    ) -> None:
        if consumer.group is None:
            raise RiverbedError(
                "a transactional producer commits its consumer's group offsets, and this "
                "consumer has no group; create it with log.consumer(group='name', ...)"
            )
        super().__init__(log, linger_ms=linger_ms, batch_size=batch_size)
        self._consumer = consumer
        self._group = consumer.group
        self._in_transaction = False
        self._flush_method = self._force_future

    def _force_future(self, timeout: float | None) -> None:
        """What ``future.result()`` does to a pending record: nothing can, inside a transaction."""
        if self._in_transaction:
            raise TransactionStateError(
                "the record's transaction is still open; its outcome is known once "
                "commit_transaction() or abort_transaction() returns"
            )
        self.flush(timeout)

    def _write_buffered(self) -> None:
        """Records of a transaction are written by its commit only."""

    def _check_in_transaction(self, action: str) -> None:
        if not self._in_transaction:
            raise TransactionStateError(
                f"cannot {action} outside a transaction; call begin_transaction() first"
            )

    def begin_transaction(self) -> None:
        if self._in_transaction:
            raise TransactionStateError(
                "a transaction is already open; commit_transaction() or abort_transaction() it"
            )
        self._in_transaction = True

    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Mapping[str, bytes] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> SendFuture:
        self._check_in_transaction("send")
        return super().send(topic, value, key, headers, partition, timestamp_ms)

    def send_many(
        self,
        topic: str,
        items: Iterable[Pair],
        partition: int | None = None,
        headers: Mapping[str, bytes] | None = None,
        timestamps: Sequence[int] | None = None,
    ) -> int:
        self._check_in_transaction("send")
        return super().send_many(topic, items, partition, headers, timestamps)

    def send_batch(self, topic: str, records: Iterable[KeyValueHeaders]) -> list[SendFuture]:
        self._check_in_transaction("send")
        return super().send_batch(topic, records)

    def commit_transaction(
        self, offsets: Mapping[TopicPartition, int], write_state: StateWriter | None = None
    ) -> None:
        """Append the transaction's records, store the offsets and run ``write_state(conn)``
        in one write transaction."""
        self._check_in_transaction("commit")
        self._in_transaction = False
        with self._write_lock:
            buffers = self._take_buffers()
            written: list[tuple[int, _PartitionBuffer]] = []
            try:
                with write_transaction(self._conn) as conn:
                    for (topic, partition), buffer in buffers.items():
                        base = self._append_batch(conn, topic, partition, buffer)
                        written.append((base, buffer))
                    if offsets:
                        groups.store_offsets(
                            conn,
                            self._group,
                            self._consumer.member_id,
                            offsets,
                            self._consumer.generation,
                        )
                    if write_state is not None:
                        write_state(conn)
            except BaseException as error:
                _abort(buffers.values(), error)
                if isinstance(error, sqlite3.Error):
                    raise DeliveryError(
                        f"could not commit a transaction to {self._log.path}: {error}"
                    ) from error
                raise
        self._settle(written, [])

    def abort_transaction(self) -> None:
        self._check_in_transaction("abort")
        self._in_transaction = False
        with self._write_lock:
            _abort(self._take_buffers().values(), None)

    def _take_buffers(self) -> dict[tuple[str, int], _PartitionBuffer]:
        with self._lock:
            buffers, self._buffers = self._buffers, {}
            self._buffered_bytes = 0
        return buffers

    def close(self) -> None:
        if self._in_transaction:
            self.abort_transaction()
        super().close()


def _abort(buffers: Iterable[_PartitionBuffer], cause: BaseException | None) -> None:
    reason = "the transaction was aborted" + (f": {cause}" if cause is not None else "")
    for buffer in buffers:
        buffer.delivery.fail(TransactionAbortedError(reason))
