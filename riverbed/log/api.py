"""The log contract: record types and the protocols every log backend implements.

Everything above layer 0, the CLI and users program against these names only; ``sqlite.py`` and
``kafka.py`` implement them with the same semantics, checked by ``tests/log/test_conformance.py``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain
from types import TracebackType
from typing import Protocol, Self

import msgspec

from riverbed.errors import RiverbedError
from riverbed.log.errors import (
    DeliveryError,
    InvalidRecordError,
    InvalidTopicError,
    RecordTooLargeError,
    UnknownPartitionError,
)

DEFAULT_MAX_RECORD_BYTES = 1024 * 1024
DEFAULT_DELETE_RETENTION_MS = 24 * 60 * 60 * 1000
DEFAULT_SESSION_TIMEOUT_MS = 10_000
# Per-record bytes counted towards a producer's batch_size besides key, value and headers (offsets,
# lengths), so that even empty records fill batches.
RECORD_OVERHEAD = 16
# Kafka's max.poll.interval.ms: a member whose loop has not polled for this long leaves its group.
# Heartbeats run in the background, so slow processing shorter than this keeps the membership.
MAX_POLL_INTERVAL_MS = 300_000

Headers = dict[str, bytes]
KeyValueHeaders = tuple[bytes | None, bytes | None, Mapping[str, bytes] | None]
TopicPartition = tuple[str, int]
RebalanceCallback = Callable[[set[TopicPartition]], None]


class Record(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One record read from the log. ``value`` None is a tombstone on a compacted topic."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: Headers = {}


class RecordMetadata(msgspec.Struct, frozen=True):
    """Where an acknowledged record was written."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int


class TopicInfo(msgspec.Struct, frozen=True):
    name: str
    partitions: int
    compact: bool = False
    retention_ms: int | None = None
    retention_bytes: int | None = None
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    delete_retention_ms: int = DEFAULT_DELETE_RETENTION_MS


class PartitionInfo(msgspec.Struct, frozen=True):
    partition: int
    beginning_offset: int
    end_offset: int
    size_bytes: int


class TopicDescription(msgspec.Struct, frozen=True):
    info: TopicInfo
    partitions: list[PartitionInfo]


class GroupMember(msgspec.Struct, frozen=True):
    member_id: str
    assignment: list[TopicPartition]


class GroupPartitionOffset(msgspec.Struct, frozen=True):
    topic: str
    partition: int
    committed: int | None
    end_offset: int
    lag: int


class GroupDescription(msgspec.Struct, frozen=True):
    group: str
    state: str
    generation: int
    members: list[GroupMember]
    offsets: list[GroupPartitionOffset]


_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def validate_topic(info: TopicInfo) -> None:
    """Kafka's rules for topic names and settings: a topic valid here is valid on every backend."""
    name = info.name
    if not _TOPIC_NAME.match(name) or name in (".", ".."):
        raise InvalidTopicError(
            f"invalid topic name {name!r}: use 1 to 249 characters from "
            "letters, digits, '.', '_' and '-'"
        )
    partitions = info.partitions
    if type(partitions) is not int or not 1 <= partitions <= MAX_PARTITIONS:
        raise InvalidTopicError(
            f"topic '{name}' takes 1 to {MAX_PARTITIONS:,} partitions, got {partitions!r}"
        )
    for setting, most in _SETTING_LIMITS.items():
        value = getattr(info, setting)
        if value is not None and (type(value) is not int or not 0 <= value <= most):
            raise InvalidTopicError(
                f"topic '{name}': {setting} is a whole number from 0 to {most:,}, got {value!r}"
            )


# More partitions than a topic of any Kafka cluster has in practice: a typo, and on SQLite a row
# (and a file page) each.
MAX_PARTITIONS = 100_000
# What Kafka's topic configs hold: longs, but max.message.bytes an int (with the batch overhead
# the Kafka backend adds to max_record_bytes).
_SETTING_LIMITS = {
    "retention_ms": 2**63 - 1,
    "retention_bytes": 2**63 - 1,
    "max_record_bytes": 2**31 - 1 - 1024,
    "delete_retention_ms": 2**63 - 1,
}


def consumer_topics(group: str | None, topics: Iterable[str]) -> list[str]:
    """A consumer's topics, sorted; its arguments checked the same way on every backend."""
    if isinstance(topics, str | bytes):  # its characters would be the topics
        raise RiverbedError(f"topics is a list of names: pass topics=[{topics!r}]")
    names = sorted(set(topics))
    if not names:
        raise RiverbedError("a consumer needs topics: pass topics=['name', ...]")
    if group is not None and not group:
        raise RiverbedError("group must be a non-empty name, or None for no group")
    return names


def lag_of(committed: int | None, beginning: int, end: int) -> int:
    """Records a group still has to read: from its committed offset, or the whole partition."""
    start = beginning if committed is None else max(committed, beginning)
    return max(end - start, 0)


class Closing:
    """``with x:`` closes ``x`` on the way out: producers, consumers and logs."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SendFuture:
    """The pending result of ``Producer.send``: the record's metadata once it is written.

    ``result()`` forces delivery (flushing the producer if needed) and raises the backend's error if
    the record was not written. Lighter than ``concurrent.futures.Future``: ``send`` is a hot path,
    and most futures are never looked at. Backends subclass it with ``_outcome`` and ``_force``.
    """

    __slots__ = ("_callbacks",)
    _callbacks: list[Callable[[SendFuture], None]] | None

    def _outcome(self) -> RecordMetadata | BaseException | None:
        """The metadata, the error, or None while the record is pending."""
        raise NotImplementedError

    def _force(self, timeout: float | None) -> None:
        """Push the record to the log, waiting up to ``timeout``."""
        raise NotImplementedError

    def done(self) -> bool:
        return self._outcome() is not None

    def result(self, timeout: float | None = None) -> RecordMetadata:
        outcome = self._outcome()
        if outcome is None:
            self._force(timeout)
            outcome = self._outcome()
        if outcome is None:
            raise TimeoutError(f"record not acknowledged within {timeout} s")
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            self.result(timeout)
        except TimeoutError:
            raise
        except BaseException as error:
            return error
        return None

    def add_done_callback(self, callback: Callable[[SendFuture], None]) -> None:
        """Run ``callback(future)`` when the outcome is known: now, or on the delivering thread."""
        raise NotImplementedError

    def run_callbacks(self) -> None:
        callbacks, self._callbacks = self._callbacks, None
        for callback in callbacks or ():
            callback(self)


class BatchDelivery:
    """The outcome of one batch of records, shared by their futures and resolved once for all.

    A backend that writes whole batches resolves this one object instead of every record's future.
    """

    __slots__ = ("base_offset", "error", "lock", "partition", "topic", "waiting")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self.base_offset: int | None = None
        self.error: BaseException | None = None
        # Guards ``waiting`` between a caller adding a callback and the writer resolving.
        self.lock = threading.Lock()
        self.waiting: list[SendFuture] = []

    def resolve(self, base_offset: int) -> None:
        with self.lock:
            self.base_offset = base_offset
            waiting, self.waiting = self.waiting, []
        for future in waiting:
            future.run_callbacks()

    def fail(self, error: BaseException) -> None:
        with self.lock:
            self.error = error
            waiting, self.waiting = self.waiting, []
        for future in waiting:
            future.run_callbacks()


class BatchFuture(SendFuture):
    """A record's future in a ``BatchDelivery``: its offset is the batch's base plus ``delta``."""

    __slots__ = ("_batch", "_delta", "_flush", "_timestamp_ms")

    def __init__(
        self,
        flush: Callable[[float | None], None],
        batch: BatchDelivery,
        delta: int,
        timestamp_ms: int,
    ) -> None:
        self._callbacks = None
        self._flush = flush
        self._batch = batch
        self._delta = delta
        self._timestamp_ms = timestamp_ms

    def _outcome(self) -> RecordMetadata | BaseException | None:
        batch = self._batch
        if batch.error is not None:
            return batch.error
        if batch.base_offset is None:
            return None
        return RecordMetadata(
            batch.topic, batch.partition, batch.base_offset + self._delta, self._timestamp_ms
        )

    def _force(self, timeout: float | None) -> None:
        self._flush(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        # Told from the batch, with no metadata made for the record: the outbox relay asks
        # this of every record it publishes.
        batch = self._batch
        if batch.base_offset is None and batch.error is None:
            return super().exception(timeout)
        return batch.error

    def add_done_callback(self, callback: Callable[[SendFuture], None]) -> None:
        batch = self._batch
        with batch.lock:
            if batch.base_offset is None and batch.error is None:
                if self._callbacks is None:
                    self._callbacks = []
                    batch.waiting.append(self)
                self._callbacks.append(callback)
                return
        callback(self)


class DeliveryErrors:
    """Collects errors of records sent without a future (``send_many``) for ``flush`` to raise."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._errors: list[str] = []
        self._failed = 0

    def add(self, reason: str, count: int = 1) -> None:
        with self._lock:
            self._failed += count
            if len(self._errors) < 5:
                self._errors.append(reason)

    def raise_if_any(self) -> None:
        with self._lock:
            if not self._failed:
                return
            failed, reasons = self._failed, "; ".join(self._errors)
            self._failed, self._errors = 0, []
        raise DeliveryError(f"{failed} record(s) were not written: {reasons}")


class Closeable(Protocol):
    """Closed by ``close()`` or by leaving a ``with`` block."""

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class Producer(Closeable, Protocol):
    """Batches records and writes them to the log; ``close`` (or leaving ``with``) flushes."""

    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Mapping[str, bytes] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> SendFuture: ...

    def send_many(
        self,
        topic: str,
        items: Iterable[tuple[bytes | None, bytes | None]],
        partition: int | None = None,
        headers: Mapping[str, bytes] | None = None,
        timestamps: Sequence[int] | None = None,
    ) -> int:
        """The fast path: ``(key, value)`` pairs, each sent with ``headers`` (and stamped with
        its entry of ``timestamps``, epoch ms, or with the time now); returns how many were
        queued. Errors are raised by the next ``flush``.
        """
        ...

    def send_batch(self, topic: str, records: Iterable[KeyValueHeaders]) -> list[SendFuture]:
        """``(key, value, headers)`` records, each with headers of its own, sent in order (as by
        ``send`` without partition or timestamp); one future per record. All are checked first:
        if the log refuses one at once (too large; no key for a compacted topic), this raises
        and queues none.
        """
        ...

    def flush(self, timeout: float | None = None) -> None: ...


class Consumer(Closeable, Protocol):
    """Reads records; in a group, partitions are shared among the group's live members."""

    @property
    def group(self) -> str | None: ...

    def poll(self, max_records: int = 1000, timeout: float = 1.0) -> list[Record]: ...

    def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        """Commit ``offsets`` (next offset to read), by default the positions of all polled records.

        Raises ``CommitFailedError`` if this member was fenced by a rebalance.
        """
        ...

    def committed(self) -> dict[TopicPartition, int | None]: ...

    def position(self, topic: str, partition: int) -> int: ...

    def seek(self, topic: str, partition: int, offset: int) -> None: ...

    def seek_to_beginning(self, partitions: Iterable[TopicPartition] | None = None) -> None: ...

    def seek_to_end(self, partitions: Iterable[TopicPartition] | None = None) -> None: ...

    def assignment(self) -> set[TopicPartition]: ...


class TransactionalProducer(Producer, Protocol):
    """A producer bound to a group consumer, for exactly-once read-process-write.

    Records sent between ``begin_transaction`` and ``commit_transaction`` become visible to
    consumers together with the consumer's offsets, or not at all: a crash or an abort in between
    leaves neither. A fenced member (its partitions moved in a rebalance) cannot commit, so a
    zombie never writes a batch twice. Consumers never see records of open or aborted
    transactions (Kafka's ``read_committed``; the embedded log writes nothing before commit).
    """

    def begin_transaction(self) -> None: ...

    def commit_transaction(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Publish the transaction's records and commit ``offsets`` (next offset to read) for the
        bound consumer's group, atomically. Raises ``CommitFailedError`` if the member was
        fenced; the transaction is then aborted and nothing of it is visible.

        After an abort or a failed commit the consumer's positions are where the polls left
        them, past the records of the transaction: seek back to the committed offsets (or start
        a new consumer) to process them again, as the stream runner does."""
        ...

    def abort_transaction(self) -> None:
        """Drop the transaction's records; its futures fail with ``TransactionAbortedError``."""
        ...


class Log(Closeable, Protocol):
    """A partitioned, replayable log: topics, producers, consumers and groups."""

    @property
    def url(self) -> str: ...

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        compact: bool = False,
        retention_ms: int | None = None,
        retention_bytes: int | None = None,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        delete_retention_ms: int = DEFAULT_DELETE_RETENTION_MS,
    ) -> TopicInfo: ...

    def list_topics(self) -> list[TopicInfo]: ...

    def topic(self, name: str) -> TopicInfo: ...

    def describe_topic(self, name: str) -> TopicDescription: ...

    def delete_topic(self, name: str) -> None: ...

    def beginning_offsets(self, topic: str) -> dict[int, int]: ...

    def end_offsets(self, topic: str) -> dict[int, int]: ...

    def offsets_for_times(self, topic: str, timestamp_ms: int) -> dict[int, int | None]:
        """Per partition, the first offset whose timestamp is >= ``timestamp_ms`` (None: none)."""
        ...

    def producer(self, linger_ms: float = 5.0, batch_size: int = 16_384) -> Producer: ...

    def consumer(
        self,
        group: str | None = None,
        topics: Iterable[str] = (),
        from_beginning: bool = False,
        session_timeout_ms: int = DEFAULT_SESSION_TIMEOUT_MS,
        on_assign: RebalanceCallback | None = None,
        on_revoke: RebalanceCallback | None = None,
    ) -> Consumer: ...

    def transactional_producer(self, consumer: Consumer) -> TransactionalProducer:
        """A producer whose transactions commit ``consumer``'s offsets (it must be in a group)."""
        ...

    def list_groups(self) -> list[str]: ...

    def describe_group(self, group: str) -> GroupDescription: ...

    def group_lag(self, group: str) -> dict[TopicPartition, int]: ...


def record_size(key: bytes | None, value: bytes | None, headers: Mapping[str, bytes] | None) -> int:
    """The bytes a record's limit applies to: key, value and header names and values."""
    size = (len(key) if key is not None else 0) + (len(value) if value is not None else 0)
    if headers:
        size += _headers_size(headers)
    return size


def _headers_size(headers: Mapping[str, bytes]) -> int:
    """The bytes of some headers' names and values (no Python loop per header); an
    ``InvalidRecordError`` for headers that are not a mapping, a name that is not a str or a
    value that is not bytes."""
    if not isinstance(headers, Mapping):
        raise InvalidRecordError(
            f"a record's headers are a dict of str names and bytes values, not a "
            f"{type(headers).__name__}: for (name, value) pairs, pass dict(pairs) (a name given "
            "twice keeps its last value)"
        )
    # Exactly str and bytes: msgspec writes no subclass, and a batch it cannot write is lost.
    if {*map(type, headers.values())} != _BYTES or {*map(type, headers)} != _STR:
        raise _bad_header(headers)
    return len("".join(headers).encode()) + len(b"".join(headers.values()))


_BYTES, _STR = {bytes}, {str}
_KEY_VALUE_TYPES, _DICT = {bytes, type(None)}, {dict}


def _bad_header(headers: Mapping[str, bytes]) -> InvalidRecordError:
    for name, data in headers.items():
        if type(name) is not str or type(data) is not bytes:
            return InvalidRecordError(
                f"header {name!r} is {type(name).__name__}: {type(data).__name__}; a header's "
                "name is a str and its value bytes (value.encode() for a str, bytes(value) for "
                "other bytes-like values)"
            )
    return InvalidRecordError(f"headers {headers!r} are not str names with bytes values")


def check_batch(
    info: TopicInfo, records: Iterable[KeyValueHeaders]
) -> tuple[Sequence[KeyValueHeaders], int]:
    """``send_batch``'s check, before any record is queued: the records (a list, if they came
    as an iterator) and their total size (each one's as ``record_size``), or the error of the
    first one the topic refuses."""
    if isinstance(records, str | bytes | bytearray) or not isinstance(records, Iterable):
        raise InvalidRecordError(
            f"send_batch takes an iterable of (key, value, headers) records, not "
            f"{type(records).__name__}"
        )
    if not isinstance(records, Sequence):
        records = list(records)  # gone through twice: checked, then queued
    total = _plain_total(records, info.max_record_bytes)
    if total is None or (info.compact and any(record[0] is None for record in records)):
        total = sum(_checked_size(info, index, record) for index, record in enumerate(records))
    return records, total


# Records whose sizes are added up at once: when the sum is within the limit, so is each one.
_SIZED_TOGETHER = 256


def _plain_total(records: Sequence[KeyValueHeaders], limit: int) -> int | None:
    """The records' total size, their types checked for the whole batch at once (a check per
    record was a fifth of the outbox relay's time) and their sizes added up a few hundred at a
    time; None when some record is not made of bytes (or None) keys and values and dicts of
    str: bytes headers, or is over ``limit``."""
    if not records:
        return 0
    try:
        keys, values, headers = zip(*records, strict=True)
    except (TypeError, ValueError):  # not (key, value, headers) triples
        return None
    if not {*map(type, keys), *map(type, values)} <= _KEY_VALUE_TYPES:
        return None
    present = [each for each in headers if each]
    if present and (
        {*map(type, present)} != _DICT
        or {*map(type, chain.from_iterable(present))} != _STR
        or {*map(type, chain.from_iterable(map(dict.values, present)))} != _BYTES
    ):
        return None
    total = 0
    for start in range(0, len(records), _SIZED_TOGETHER):
        end = start + _SIZED_TOGETHER
        chunk = [each for each in headers[start:end] if each]
        size = (
            len(b"".join(filter(None, keys[start:end])))
            + len(b"".join(filter(None, values[start:end])))
            + len("".join(chain.from_iterable(chunk)).encode())
            + len(b"".join(chain.from_iterable(map(dict.values, chunk))))
        )
        if size > limit and any(record_size(*record) > limit for record in records[start:end]):
            return None
        total += size
    return total


def _checked_size(info: TopicInfo, index: int, record: object) -> int:
    """One record's size, or the error the topic refuses it with (``index``: its place)."""
    if not isinstance(record, tuple | list) or len(record) != 3:
        raise InvalidRecordError(
            f"record {index} of the batch is {record!r:.80}: send_batch takes (key, value, "
            "headers) records (headers None for none)"
        )
    key, value, headers = record
    if (key.__class__ is not bytes and key is not None) or (
        value.__class__ is not bytes and value is not None
    ):
        check_types(key, value)
    size = record_size(key, value, headers)
    if size > info.max_record_bytes or (info.compact and key is None):
        check_record(info, key, value, headers)  # raises the error
    return size


def check_types(key: object, value: object) -> None:
    """A key and a value are bytes or None (the hot paths call this only for what is not
    ``bytes`` or ``None`` exactly)."""
    for part, data in (("key", key), ("value", value)):
        if data is not None and type(data) is not bytes:  # msgspec writes no subclass
            raise InvalidRecordError(
                f"a record's {part} is bytes or None, not {type(data).__name__}: convert it "
                f"({part}.encode() for a str, bytes({part}) for other bytes-like values), or "
                f"declare a typed topic, app.topic(name, {part}=<its type>), whose records are "
                "encoded for you"
            )


def check_record(
    info: TopicInfo,
    key: bytes | None,
    value: bytes | None,
    headers: Mapping[str, bytes] | None,
) -> int:
    """Validate a record against its topic before it is queued; returns its size."""
    check_types(key, value)
    size = record_size(key, value, headers)
    if size > info.max_record_bytes:
        raise RecordTooLargeError(info.name, size, info.max_record_bytes)
    if key is None and info.compact:
        raise InvalidRecordError(
            f"topic '{info.name}' is compacted, so every record needs a key; pass key=..."
        )
    return size


def check_timestamp(timestamp_ms: int) -> None:
    """Record timestamps are positive epoch milliseconds (an int, which the log stores: a float
    would make its batch unreadable): Kafka's client reads 0 as "now"."""
    if type(timestamp_ms) is not int or timestamp_ms <= 0:
        raise InvalidRecordError(
            f"timestamp_ms must be positive epoch milliseconds as an int, got {timestamp_ms!r}; "
            "leave it out to use the current time (or pass int(time.time() * 1000))"
        )


def timed_items(
    items: Iterable[tuple[bytes | None, bytes | None]], timestamps: Sequence[int]
) -> list[tuple[bytes | None, bytes | None]]:
    """``send_many``'s items as a list, checked against their ``timestamps`` (one each, every
    one valid) before any is queued."""
    items = list(items)
    if len(timestamps) != len(items):
        raise InvalidRecordError(
            f"send_many got {len(timestamps)} timestamps for {len(items)} records: one each"
        )
    if timestamps and ({*map(type, timestamps)} != {int} or min(timestamps) <= 0):
        for timestamp_ms in timestamps:
            check_timestamp(timestamp_ms)
    return items


def check_time(timestamp_ms: int) -> None:
    """A time to look offsets up by: epoch milliseconds, an int >= 0 (Kafka reads -1 and -2 as
    the latest and earliest offsets)."""
    if type(timestamp_ms) is not int or timestamp_ms < 0:
        raise ValueError(f"timestamp_ms is epoch milliseconds, an int >= 0, got {timestamp_ms!r}")


def check_offset(offset: int) -> None:
    """An offset to seek to or commit: an int (not a float, which SQLite would store) >= 0."""
    if type(offset) is not int or offset < 0:
        raise ValueError(f"an offset is an int >= 0, got {offset!r}")


def check_partition(info: TopicInfo, partition: int) -> None:
    if type(partition) is not int:
        raise InvalidRecordError(
            f"partition must be an int, got {type(partition).__name__} {partition!r}"
        )
    if not 0 <= partition < info.partitions:
        raise UnknownPartitionError(info.name, partition, info.partitions)
