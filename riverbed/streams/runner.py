"""Runs an app's pipelines on the log, at least once: poll a batch, decode it (undecodable records
go to the dead-letter topic), run every pipeline over it, write the outputs, flush, then commit.

A crash before the commit replays the batch, so outputs may repeat but are never lost. The app's
consumer group is named after the app, so several processes share the partitions. An exception
from a pipeline's function stops the runner without committing, so the batch runs again on
restart (Kafka Streams' default); handlers are where per-record retries and dead letters apply.
Exactly-once (outputs, state and offsets in one transaction) is the next step of the stream layer.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from riverbed.log.api import Consumer, Producer, Record
from riverbed.serde.codecs import DeserializationError
from riverbed.streams.dsl import Pair, Stream
from riverbed.streams.handlers import Handler
from riverbed.streams.topics import SCHEMA_VERSION_HEADER, Topic

if TYPE_CHECKING:
    from riverbed.streams.metrics import RunnerMetrics

BATCH_RECORDS = 5000
Decoded = tuple[Record, Any, Any]
REPORT_INTERVAL_S = 1.0


class Runner:
    """One process's share of an app's pipelines."""

    def __init__(
        self,
        streams: list[Stream[Any, Any]],
        handlers: list[tuple[Topic[Any, Any], Handler]],
        consumer: Consumer,
        producer: Producer,
        metrics: RunnerMetrics | None = None,
    ) -> None:
        self._by_topic: dict[str, list[Stream[Any, Any]]] = defaultdict(list)
        for stream in streams:
            self._by_topic[stream.source.name].append(stream)
        self._handlers: dict[str, list[tuple[Topic[Any, Any], Handler]]] = defaultdict(list)
        for topic, handler in handlers:
            self._handlers[topic.name].append((topic, handler))
        self._consumer = consumer
        self._producer = producer
        self.metrics = metrics
        self.processed = 0
        self.dead_lettered = 0

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
        """Process one batch (if one arrives within ``poll_timeout``); returns its size."""
        records = self._consumer.poll(max_records=BATCH_RECORDS, timeout=poll_timeout)
        if not records:
            return 0
        started = time.monotonic()
        by_topic: dict[str, list[Record]] = defaultdict(list)
        for record in records:
            by_topic[record.topic].append(record)
        for topic_name, batch in by_topic.items():
            for stream in self._by_topic[topic_name]:
                self._process(stream, batch)
            for topic, handler in self._handlers[topic_name]:
                self._handle(handler, topic, batch)
        # The order that makes at-least-once: outputs acknowledged, then input offsets committed.
        self._producer.flush()
        self._consumer.commit()
        self.processed += len(records)
        if self.metrics is not None:
            for topic_name, batch in by_topic.items():
                self.metrics.records_in.labels(topic_name).inc(len(batch))
            self.metrics.batch_seconds.observe(time.monotonic() - started)
        return len(records)

    def _process(self, stream: Stream[Any, Any], batch: list[Record]) -> None:
        pairs = [(key, value) for _, key, value in self._decode(stream.source, batch)]
        results = stream.process(pairs)
        if not results:
            return
        for output in stream.outputs:
            if output.topic is not None:
                self._write(output.topic, results)
            if output.sink is not None:
                for key, value in results:
                    output.sink(key, value)

    def _handle(self, handler: Handler, topic: Topic[Any, Any], batch: list[Record]) -> None:
        # Record by record, in order: a failing record is retried before the next one runs.
        for record, key, value in self._decode(topic, batch):
            error = handler.call(record, key, value)
            if error is not None:
                topic.dead_letter(self._producer, record, error, handler.attempts)
                self._count_dead_letter(topic)

    def _decode(self, topic: Topic[Any, Any], batch: list[Record]) -> list[Decoded]:
        """The batch's records with their keys and values; undecodable ones are dead-lettered."""
        # The whole batch at once; if a record in it is bad, one by one to park just that one.
        with contextlib.suppress(DeserializationError):
            keys = [None if r.key is None else topic.key_codec.decode(r.key) for r in batch]
            values = topic.value_codec.decode_many([_value_of(r) for r in batch])
            return list(zip(batch, keys, values, strict=True))
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

    def _write(self, topic: Topic[Any, Any], results: list[Pair]) -> None:
        encode_key, encode_value = topic.key_codec.encode, topic.value_codec.encode
        headers = {}
        if topic.schema_version is not None:
            headers[SCHEMA_VERSION_HEADER] = str(topic.schema_version).encode()
        self._producer.send_many(
            topic.name,
            [(None if k is None else encode_key(k), encode_value(v)) for k, v in results],
            headers=headers,
        )
        if self.metrics is not None:
            self.metrics.records_out.labels(topic.name).inc(len(results))


def _value_of(record: Record) -> bytes:
    if record.value is None:
        raise DeserializationError("a tombstone (value None) has no value to decode")
    return record.value
