"""Runs an app's pipelines and handlers on the log, one polled batch at a time.

The order of a batch, written down once:

1. poll a batch (and what else is already fetched, for up to ``COMMIT_INTERVAL_S``); with
   exactly-once, begin a transaction;
2. bring tables up to date; decode each source partition's records (undecodable ones go to the
   topic's dead-letter topic) and push them through the pipeline graph, which sends outputs and
   internal-topic records on the producer and changes state in memory;
3. commit: outputs, state changes and input offsets together (exactly-once: one transaction; at
   least once: outputs flushed, then state, then offsets, so a crash replays the batch).

If anything in 2-3 fails, the transaction is aborted, in-memory state is dropped (it reloads from
the committed state) and the consumer goes back to the committed offsets. A fenced commit (the
group rebalanced) is expected: the batch is processed again by whoever owns the partitions now.
An exception from a pipeline's function stops the runner without committing, so the batch runs
again on restart (Kafka Streams' default); handlers are where per-record retries apply.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from itertools import groupby
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from riverbed.collection import collection_deferred
from riverbed.log.api import Consumer, Log, Producer, Record, TopicPartition
from riverbed.log.errors import CommitFailedError
from riverbed.serde.codecs import DeserializationError
from riverbed.streams.handlers import ATTEMPTS_HEADER, DUE_HEADER, Handler, retry_topic
from riverbed.streams.joins import JoinSideNode
from riverbed.streams.nodes import Batch, Context, Node, RepartitionNode, ToNode
from riverbed.streams.state.backend import Changes, StateBackend
from riverbed.streams.topics import ERROR_HEADER, Topic
from riverbed.streams.topology import InternalSource, TopicSource, Topology

if TYPE_CHECKING:
    from riverbed.log.api import TransactionalProducer
    from riverbed.streams.metrics import RunnerMetrics

log = logging.getLogger("riverbed.streams")
BATCH_RECORDS = 5000
Decoded = tuple[Record, Any, Any]
REPORT_INTERVAL_S = 1.0
TABLE_BOOTSTRAP_IDLE_S = 1.0
RETRY_WAIT_S = 0.05
COMMIT_INTERVAL_S = 0.1
COMMIT_RECORDS = 50_000

_partition_of: Callable[[Record], int] = attrgetter("partition")
_topic_of: Callable[[Record], str] = attrgetter("topic")
_timestamp_of: Callable[[Record], int] = attrgetter("timestamp_ms")


class Runner:
    """One process's share of an app's pipelines and handlers."""

    def __init__(
        self,
        topology: Topology,
        handlers: list[tuple[Topic[Any, Any], Handler]],
        log: Log,
        consumer: Consumer,
        producer: Producer,
        state: StateBackend,
        exactly_once: bool,
        metrics: RunnerMetrics | None = None,
        flush_sent: Callable[[], None] | None = None,
    ) -> None:
        """``flush_sent``: writes what handlers sent through the app's own producer."""
        self._topology = topology
        self._flush_sent = flush_sent
        self._sources = topology.running_sources()
        self._handlers: dict[str, list[tuple[Topic[Any, Any], Handler]]] = defaultdict(list)
        # Retry topic -> the topic, its handler, and which of the handler's delays it is.
        self._retries: dict[str, tuple[Topic[Any, Any], Handler, int]] = {}
        for topic, handler in handlers:
            self._handlers[topic.name].append((topic, handler))
            for level in range(1, len(handler.retry_delays) + 1):
                self._retries[retry_topic(topic.name, level)] = (topic, handler, level)
        # Retry-topic partitions whose next record is not due yet: where to resume, and when.
        self._held: dict[TopicPartition, tuple[int, int]] = {}
        self._log = log
        self._consumer = consumer
        self._producer = producer
        self._state = state
        self._exactly_once = exactly_once
        self.metrics = metrics
        self.processed = 0
        self.dead_lettered = 0
        self.aborted = 0
        self.late = 0  # records that arrived after their windows closed
        self._writers = _writers(topology)
        self._table_consumers = {
            name: log.consumer(topics=[name], from_beginning=True) for name in topology.tables
        }
        self._bootstrap_tables()

    # Tables

    def _bootstrap_tables(self) -> None:
        """Read every table to its end before the first batch, as a GlobalKTable does."""
        for name, consumer in self._table_consumers.items():
            ends = self._log.end_offsets(name)
            reached: dict[int, int] = {}
            idle_since = time.monotonic()
            while any(reached.get(p, 0) < end for p, end in ends.items() if end > 0):
                records = consumer.poll(max_records=BATCH_RECORDS, timeout=0.1)
                if records:
                    idle_since = time.monotonic()
                    self._apply_table(name, records)
                    for record in records:
                        reached[record.partition] = record.offset + 1
                elif time.monotonic() - idle_since > TABLE_BOOTSTRAP_IDLE_S:
                    break  # only transaction markers are left past what was read

    def _refresh_tables(self) -> None:
        for name, consumer in self._table_consumers.items():
            while records := consumer.poll(max_records=BATCH_RECORDS, timeout=0):
                self._apply_table(name, records)

    def _apply_table(self, name: str, records: list[Record]) -> None:
        table = self._topology.tables[name]
        decode_key = table.topic.key_codec.decode
        decode_value = table.topic.value_codec.decode
        pairs = []
        for record in records:
            try:
                key = None if record.key is None else decode_key(record.key)
                value = None if record.value is None else decode_value(record.value)
            except DeserializationError as error:
                # Every worker reads the whole table, so none dead-letters it (each would): the
                # table keeps the key's last good value, and says so.
                log.warning(
                    "table %s skips record %s[%d]@%d, which does not decode (%s); it keeps the "
                    "key's last good value", name, record.topic, record.partition, record.offset,
                    error,
                )  # fmt: skip
                continue
            pairs.append((key, value))
        table.apply(pairs)

    # The loop

    def run(
        self,
        stop: threading.Event,
        report: Callable[[Runner], None] | None = None,
        poll_timeout: float = 0.5,
    ) -> None:
        """Process batches until ``stop`` is set; the batch in hand is finished and committed.

        ``report(runner)`` is called about once a second (a worker's status line).
        """
        reported_at = time.monotonic()
        while not stop.is_set():
            self.run_once(poll_timeout)
            if report is not None and time.monotonic() - reported_at >= REPORT_INTERVAL_S:
                reported_at = time.monotonic()
                report(self)

    def run_once(self, poll_timeout: float = 0.5) -> int:
        """Process what arrives within ``poll_timeout`` and commit it; returns how many records.

        Records already fetched are taken into the same commit for up to ``COMMIT_INTERVAL_S``
        (Kafka Streams' commit.interval.ms under exactly-once): a commit costs round trips and
        state writes, which a bigger batch shares out.
        """
        with collection_deferred():
            return self._run_batch(poll_timeout)

    def _run_batch(self, poll_timeout: float) -> int:
        records = self._consumer.poll(max_records=BATCH_RECORDS, timeout=poll_timeout)
        if not records:
            self._refresh_tables()
            return 0
        started = time.monotonic()
        if self._exactly_once:
            self._transactional().begin_transaction()
        try:
            self._refresh_tables()
            ctx = Context(self._producer, self._state.load)
            taken = self._process(records, ctx)
            while (
                sum(taken.values()) < COMMIT_RECORDS
                and not self._held
                and time.monotonic() - started < COMMIT_INTERVAL_S
            ):
                more = self._consumer.poll(max_records=BATCH_RECORDS, timeout=0)
                if not more:
                    break
                for tp, count in self._process(more, ctx).items():
                    taken[tp] = taken.get(tp, 0) + count
            # The consumer's position, not last offset + 1: on Kafka it steps over transaction
            # markers, so that the group's lag can reach 0.
            offsets = {tp: self._consumer.position(*tp) for tp in taken}
            offsets.update({tp: offset for tp, (offset, _) in self._held.items()})
            if self._handlers and self._flush_sent is not None:
                # Before their inputs' offsets: a crash sends them again instead of losing them.
                self._flush_sent()
            self._state.commit(
                self._producer, self._consumer, offsets, _changes(ctx), self._exactly_once
            )
        except CommitFailedError:
            self._recover()
            return 0
        except BaseException:
            self._recover()
            raise
        processed = sum(taken.values())
        self.processed += processed
        self.late += ctx.late
        if self.metrics is not None:
            self._count(taken, started)
            self.metrics.late.inc(ctx.late)
        self._wait_for_due_retries()
        return processed

    def _wait_for_due_retries(self) -> None:
        """Rewind held retry partitions to their first record not yet due. The next poll fetches
        it again; a short pause keeps that from spinning while only such records are left."""
        if not self._held:
            return
        first_due = min(due for _, due in self._held.values())
        for (topic, partition), (offset, _) in self._held.items():
            self._consumer.seek(topic, partition, offset)
        self._held.clear()
        time.sleep(min(max(first_due - time.time() * 1000, 0) / 1000, RETRY_WAIT_S))

    def _transactional(self) -> TransactionalProducer:
        return self._producer  # type: ignore[return-value]

    def _process(self, records: list[Record], ctx: Context) -> dict[TopicPartition, int]:
        """Push the records through; returns how many each partition had (on an internal topic:
        how many items its records carried)."""
        by_partition: dict[TopicPartition, list[Record]] = defaultdict(list)
        # A poll returns each partition's records in runs: one extend per run. Runs are found by
        # partition number, then by topic within them: no (topic, partition) tuple per record.
        for partition, run in groupby(records, _partition_of):
            for topic_name, same in groupby(run, _topic_of):
                by_partition[topic_name, partition].extend(same)
        taken: dict[TopicPartition, int] = {}
        for (topic_name, partition), batch in by_partition.items():
            taken[topic_name, partition] = len(batch)
            ctx.partition = partition
            source = self._sources.get(topic_name)
            if isinstance(source, TopicSource):
                source.push(self._columns(source.topic, batch), ctx)
            elif isinstance(source, InternalSource):
                columns = source.batch(batch)
                taken[topic_name, partition] = len(columns)
                source.push(columns, ctx)
            for topic, handler in self._handlers[topic_name]:
                self._handle(handler, topic, batch, 0)
            retry = self._retries.get(topic_name)
            if retry is not None:
                self._handle_due(*retry, (topic_name, partition), batch)
        return taken

    def _recover(self) -> None:
        """After a failed batch: abort, forget in-memory state, rewind to committed offsets."""
        self.aborted += 1
        self._held.clear()
        if self._exactly_once:
            with contextlib.suppress(Exception):  # already aborted by a failed commit
                self._transactional().abort_transaction()
        for node in self._topology.stateful.values():
            node.reset()
        with contextlib.suppress(Exception):  # fenced: the next poll reassigns anyway
            for (topic, partition), offset in self._consumer.committed().items():
                if offset is None:
                    self._consumer.seek_to_beginning([(topic, partition)])
                else:
                    self._consumer.seek(topic, partition, offset)

    def revoked(self, partitions: set[TopicPartition]) -> None:
        """Partitions moved to another worker: drop their state here, hand it over there."""
        numbers = {partition for _, partition in partitions}
        for node in self._topology.stateful.values():
            node.reset(numbers)
        self._state.release(numbers)

    # Handlers and decoding

    def _handle(
        self, handler: Handler, topic: Topic[Any, Any], batch: list[Record], level: int
    ) -> None:
        # Record by record, in order: a failing record is retried before the next one runs.
        for record, key, value in self._decode(topic, batch):
            error = handler.call(record, key, value)
            if error is not None:
                self._give_up_on(handler, topic, record, error, level)

    def _handle_due(
        self,
        topic: Topic[Any, Any],
        handler: Handler,
        level: int,
        tp: TopicPartition,
        batch: list[Record],
    ) -> None:
        """Handle a retry topic's records whose delay is over; hold the partition at the first
        one that is not (the topic's records are in due order, all having the same delay)."""
        now_ms = time.time() * 1000
        for index, record in enumerate(batch):
            due = int(record.headers.get(DUE_HEADER, b"0"))
            if due > now_ms:
                self._held[tp] = (record.offset, due)
                batch = batch[:index]
                break
        self._handle(handler, topic, batch, level)

    def _give_up_on(
        self,
        handler: Handler,
        topic: Topic[Any, Any],
        record: Record,
        error: BaseException,
        level: int,
    ) -> None:
        """After the in-place retries: the next retry topic, or the dead-letter topic."""
        attempts = int(record.headers.get(ATTEMPTS_HEADER, b"0")) + handler.attempts
        if level < len(handler.retry_delays):
            due_ms = int(time.time() * 1000 + handler.retry_delays[level] * 1000)
            headers = {
                **record.headers,
                ERROR_HEADER: f"{type(error).__name__}: {error}".encode(),
                ATTEMPTS_HEADER: str(attempts).encode(),
                DUE_HEADER: str(due_ms).encode(),
            }
            self._producer.send(
                retry_topic(topic.name, level + 1), record.value, key=record.key, headers=headers
            )
            return
        topic.dead_letter(self._producer, record, error, attempts)
        self._count_dead_letter(topic)

    def _columns(self, topic: Topic[Any, Any], batch: list[Record]) -> Batch:
        """The records as a pipeline batch; undecodable records are dead-lettered."""
        whole = _decode_whole(topic, batch)
        if whole is not None:
            keys, values = whole
            return Batch(keys, values, list(map(_timestamp_of, batch)))
        return Batch.of(
            (key, value, r.timestamp_ms) for r, key, value in self._decode_each(topic, batch)
        )

    def _decode(self, topic: Topic[Any, Any], batch: list[Record]) -> list[Decoded]:
        """The batch's records with their keys and values; undecodable ones are dead-lettered."""
        whole = _decode_whole(topic, batch)
        if whole is not None:
            return list(zip(batch, *whole, strict=True))
        return self._decode_each(topic, batch)

    def _decode_each(self, topic: Topic[Any, Any], batch: list[Record]) -> list[Decoded]:
        """One record at a time, to park just the bad ones in the dead-letter topic."""
        decoded: list[Decoded] = []
        for record in batch:
            try:
                typed = topic.decode(record)
            except DeserializationError as error:
                topic.dead_letter(self._producer, record, error)
                self._count_dead_letter(topic)
                continue
            decoded.append((record, typed.key, typed.value))
        return decoded

    def _count_dead_letter(self, topic: Topic[Any, Any]) -> None:
        self.dead_lettered += 1
        if self.metrics is not None:
            self.metrics.dead_lettered.labels(topic.name).inc()

    def _count(self, taken: dict[TopicPartition, int], started: float) -> None:
        assert self.metrics is not None
        for (topic_name, _), count in taken.items():
            self.metrics.records_in.labels(topic_name).inc(count)
        for node in self._writers:
            if node.written:
                self.metrics.records_out.labels(node.topic.name).inc(node.written)
                node.written = 0
        self.metrics.batch_seconds.observe(time.monotonic() - started)

    def close(self) -> None:
        for consumer in self._table_consumers.values():
            consumer.close()
        for _, handlers in self._handlers.items():
            for _, handler in handlers:
                handler.close()


def reachable_outputs(topology: Topology) -> list[ToNode]:
    """The nodes writing to the app's own output topics (``to``)."""
    return [node for node in _writers(topology) if isinstance(node, ToNode)]


# The nodes that write to a topic: the app's outputs, and its internal topics.
Writer = ToNode | RepartitionNode | JoinSideNode


def _writers(topology: Topology) -> list[Writer]:
    seen: set[int] = set()
    found: list[Writer] = []
    stack: list[Node] = list(topology.sources.values())
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, Writer):
            found.append(node)
        stack.extend(node.children)
        stack.extend(getattr(node, "branches", ()))
        late = getattr(node, "late", None)
        if late is not None:
            stack.append(late)
    return found


def _changes(ctx: Context) -> Changes:
    changes: Changes = {}
    for node in ctx.touched:
        changes.update(node.changes())
    return changes


def _decode_whole(
    topic: Topic[Any, Any], batch: list[Record]
) -> tuple[list[Any], list[Any]] | None:
    """Keys and values of the whole batch at once, or None if some record does not decode."""
    decode_key = topic.key_codec.decode
    try:
        keys = [None if r.key is None else decode_key(r.key) for r in batch]
        return keys, topic.value_codec.decode_many([_value_of(r, topic) for r in batch])
    except DeserializationError:
        return None


def _value_of(record: Record, topic: Topic[Any, Any]) -> bytes:
    value = topic.value_bytes(record)
    if value is None:  # a tombstone its type holds no None for: Topic.decode says so
        raise DeserializationError("a tombstone (value None) has no value to decode")
    return value
