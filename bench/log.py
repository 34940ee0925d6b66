"""The log benchmark: riverbed on SQLite and on Kafka against raw confluent-kafka and Redis streams.

Every system gets the same keyless workload in the same run on the same machine: 4 partitions
(4 streams for Redis), 100-byte values, topics created fresh for every run. For each system and
run it measures

- produce throughput through the batch path (``send_many``; raw peers: their fastest loop),
- produce throughput record by record with a per-record acknowledgement (``send``),
- consume throughput of everything the batch path wrote, from the beginning,
- end-to-end latency p50/p99 at a steady rate (a paced producer thread, a consumer thread).

It prints the medians of ``--runs`` runs as a table and appends them to ``bench/RESULTS.md``.
``bench/README.md`` explains each figure. Run it with::

    .venv/bin/python bench/log.py [--records N] [--runs R] [--only riverbed-sqlite,redis-streams]
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import platform
import statistics
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import common  # bench/common.py: python puts bench/ first on sys.path
import confluent_kafka
import redis
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.table import Table

import riverbed

PARTITIONS = 4
VALUE_BYTES = 100
VALUE = bytes(range(VALUE_BYTES))
SEND_MANY_CHUNK = 10_000  # (key, value) pairs per send_many call
CONSUME_BATCH = 10_000  # records asked for per poll / consume / XREADGROUP COUNT (per stream)
REDIS_PIPELINE = 1_000  # XADDs per pipeline on the batch path
E2E_RATE = 5_000  # records/s
E2E_SECONDS = 10.0
E2E_WARMUP_SECONDS = 1.0  # sent before the measured window, not counted
E2E_DRAIN_SECONDS = 10.0  # how long the consumer may lag behind the last send
WARMUP_RECORDS = 20_000  # per system, in an unrecorded run before the measured ones
# An e2e value: sequence number and perf_counter_ns at send, padded to VALUE_BYTES.
E2E_HEADER = struct.Struct("<qq")
E2E_PADDING = bytes(VALUE_BYTES - E2E_HEADER.size)

SYSTEMS = ("riverbed-sqlite", "riverbed-kafka", "confluent-kafka", "redis-streams")
# Not run by default: raw confluent-kafka with riverbed-kafka's producer defaults (linger_ms and
# batch_size), which separates the cost of riverbed's settings from the cost of its Python layer.
EXTRA_SYSTEMS = ("confluent-kafka-matched",)
METRICS = ("send_many", "send", "consume", "p50", "p99")

THROUGHPUT_LINGER_MS = 20
# Raw confluent-kafka: acks=all with idempotence and no compression, as riverbed's Kafka producer
# uses, with the batching that gives librdkafka its best throughput.
CONFLUENT_PRODUCER = {
    "acks": "all",
    "enable.idempotence": True,
    "compression.type": "none",
    "linger.ms": THROUGHPUT_LINGER_MS,
    "batch.size": 1_000_000,
    "batch.num.messages": 100_000,
    "queue.buffering.max.messages": 2_000_000,
    "queue.buffering.max.kbytes": 1_048_576,
}
CONFLUENT_CONSUMER = {
    "enable.auto.commit": False,
    "enable.partition.eof": False,
    "auto.offset.reset": "earliest",
    "fetch.max.bytes": 52_428_800,
    "max.partition.fetch.bytes": 10_485_760,
    "queued.min.messages": 1_000_000,
    "queued.max.messages.kbytes": 1_048_576,
}
# The e2e run uses riverbed's default linger (5 ms) for every Kafka producer.
E2E_LINGER_MS = 5

REDIS_GROUP = "bench"

TARGETS_NOTE = (
    "riverbed-sqlite: send_many >= 1,000,000 rec/s, send >= 400,000 rec/s, "
    "consume >= 2,000,000 rec/s, e2e p99 <= 10 ms; riverbed-kafka: produce and consume within "
    "10% of raw confluent-kafka"
)


# The systems


class E2eSession(Protocol):
    """One producer and one consumer on a fresh topic, for the latency run."""

    def send(self, value: bytes) -> None: ...

    def receive(self) -> list[bytes]:
        """Values that arrived, waiting up to ~100 ms for some."""
        ...

    def close(self) -> None: ...


class System(Protocol):
    name: str
    settings: str  # the client settings that differ between runs or revisions, for the notes

    def create_topic(self, topic: str) -> None: ...

    def delete_topic(self, topic: str) -> None: ...

    def count(self, topic: str) -> int:
        """Records stored in ``topic`` (to check that nothing was lost)."""
        ...

    def produce_many(self, topic: str, count: int) -> None:
        """Write ``count`` records through the batch path; return once all are acknowledged."""
        ...

    def produce_send(self, topic: str, count: int) -> None:
        """Write ``count`` records one call each with a per-record acknowledgement."""
        ...

    def consume(self, topic: str, count: int) -> None:
        """Read ``count`` records from the beginning with a new consumer."""
        ...

    def e2e_session(self, topic: str) -> E2eSession: ...

    def close(self) -> None: ...


class RiverbedSystem:
    """riverbed's public log API, on whichever backend the URL names."""

    def __init__(
        self, name: str, url: str, batch_size: int | None, linger_ms: float | None = None
    ) -> None:
        self.name = name
        self.log = riverbed.connect(url)
        self._producer_options: dict[str, Any] = {}
        if batch_size is not None:
            self._producer_options["batch_size"] = batch_size
        if linger_ms is not None:
            self._producer_options["linger_ms"] = linger_ms
        options = {**producer_defaults(self.log), **self._producer_options}
        self.settings = (
            f"producer linger_ms {options['linger_ms']:g}, batch_size {options['batch_size']:,} "
            + ("(set for this run)" if self._producer_options else "(the backend's defaults)")
            + " for send_many and send; the e2e run uses the defaults"
        )

    def create_topic(self, topic: str) -> None:
        self.log.create_topic(topic, partitions=PARTITIONS)

    def delete_topic(self, topic: str) -> None:
        self.log.delete_topic(topic)

    def count(self, topic: str) -> int:
        return sum(self.log.end_offsets(topic).values())

    def produce_many(self, topic: str, count: int) -> None:
        chunk = [(None, VALUE)] * SEND_MANY_CHUNK
        with self.log.producer(**self._producer_options) as producer:
            for start in range(0, count, SEND_MANY_CHUNK):
                producer.send_many(topic, chunk[: min(SEND_MANY_CHUNK, count - start)])
            producer.flush()

    def produce_send(self, topic: str, count: int) -> None:
        with self.log.producer(**self._producer_options) as producer:
            send = producer.send
            for _ in range(count):
                send(topic, VALUE)
            producer.flush()

    def consume(self, topic: str, count: int) -> None:
        received = 0
        with self.log.consumer(topics=[topic], from_beginning=True) as consumer:
            while received < count:
                received += len(consumer.poll(max_records=CONSUME_BATCH, timeout=1.0))

    def e2e_session(self, topic: str) -> E2eSession:
        return RiverbedE2e(self.log, topic)

    def close(self) -> None:
        self.log.close()


class RiverbedE2e:
    def __init__(self, log: riverbed.Log, topic: str) -> None:
        self._topic = topic
        self._consumer = log.consumer(topics=[topic], from_beginning=True)
        self._producer = log.producer()  # default linger: 5 ms

    def send(self, value: bytes) -> None:
        self._producer.send(self._topic, value)

    def receive(self) -> list[bytes]:
        return [r.value for r in self._consumer.poll(max_records=1000, timeout=0.1) if r.value]

    def close(self) -> None:
        try:
            self._producer.close()
        finally:
            self._consumer.close()


def producer_defaults(log: object) -> dict[str, Any]:
    """The keyword defaults of ``log.producer`` (each backend has its own)."""
    parameters = inspect.signature(log.producer).parameters  # type: ignore[attr-defined]
    return {n: p.default for n, p in parameters.items() if p.default is not p.empty}


class ConfluentSystem:
    """confluent-kafka (librdkafka) used directly, tuned for throughput."""

    def __init__(
        self,
        bootstrap: str,
        name: str = "confluent-kafka",
        producer_overrides: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self._bootstrap = bootstrap
        self._producer_overrides = producer_overrides or {}
        self.settings = ", ".join(
            f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
            for k, v in {**CONFLUENT_PRODUCER, **self._producer_overrides}.items()
            if k in ("linger.ms", "batch.size")
        )
        self._admin = AdminClient({"bootstrap.servers": bootstrap})

    def create_topic(self, topic: str) -> None:
        common.create_kafka_topic(self._admin, topic, PARTITIONS)

    def delete_topic(self, topic: str) -> None:
        self._admin.delete_topics([topic])[topic].result(30)

    def count(self, topic: str) -> int:
        consumer = self._consumer({})
        try:
            return sum(
                consumer.get_watermark_offsets(confluent_kafka.TopicPartition(topic, p), 10)[1]
                for p in range(PARTITIONS)
            )
        finally:
            consumer.close()

    def _producer(self, overrides: dict[str, Any]) -> confluent_kafka.Producer:
        return confluent_kafka.Producer(
            {
                "bootstrap.servers": self._bootstrap,
                **CONFLUENT_PRODUCER,
                **self._producer_overrides,
                **overrides,
            }
        )

    def _consumer(self, overrides: dict[str, Any]) -> confluent_kafka.Consumer:
        return confluent_kafka.Consumer(
            {
                "bootstrap.servers": self._bootstrap,
                "group.id": f"bench-{uuid.uuid4().hex}",
                **CONFLUENT_CONSUMER,
                **overrides,
            }
        )

    def produce_many(self, topic: str, count: int) -> None:
        failures: list[str] = []
        producer = self._producer({"on_delivery": _collect_failure(failures)})
        _confluent_produce(producer, topic, count, None)
        _confluent_flush(producer, failures)

    def produce_send(self, topic: str, count: int) -> None:
        failures: list[str] = []
        acknowledged = [0]

        def on_delivery(error: Any, message: Any) -> None:
            if error is None:
                acknowledged[0] += 1
            else:
                failures.append(str(error))

        producer = self._producer({})
        _confluent_produce(producer, topic, count, on_delivery)
        _confluent_flush(producer, failures)

    def consume(self, topic: str, count: int) -> None:
        consumer = self._consumer({})
        try:
            consumer.assign(
                [
                    confluent_kafka.TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING)
                    for p in range(PARTITIONS)
                ]
            )
            received = 0
            while received < count:
                messages = confluent_take(consumer, CONSUME_BATCH, timeout=1.0)
                for message in messages:
                    if message.error() is not None:
                        raise common.BenchError(f"confluent-kafka consume: {message.error()}")
                    message.value()  # what an application reads at least
                received += len(messages)
        finally:
            consumer.close()

    def e2e_session(self, topic: str) -> E2eSession:
        return ConfluentE2e(
            self._producer({"linger.ms": E2E_LINGER_MS}),
            self._consumer({}),
            topic,
        )

    def close(self) -> None:
        del self._admin  # librdkafka logs the broker's shutdown to clients still alive


def confluent_take(
    consumer: confluent_kafka.Consumer, max_messages: int, timeout: float
) -> list[Any]:
    """Up to ``max_messages`` without waiting for that many, as riverbed's Kafka consumer does.

    ``consume(n, timeout)`` waits until it has n messages or the timeout passed, which would add up
    to ``timeout`` to every latency and to the last batch. Take what is there; if nothing is, wait
    for the first message only, then take what came with it.
    """
    messages: list[Any] = consumer.consume(max_messages, 0)
    if not messages:
        messages = consumer.consume(1, timeout)
        if messages and max_messages > 1:
            messages += consumer.consume(max_messages - 1, 0)
    return messages


def _collect_failure(failures: list[str]) -> Callable[[Any, Any], None]:
    def on_delivery(error: Any, message: Any) -> None:
        if error is not None:
            failures.append(str(error))

    return on_delivery


def _confluent_produce(
    producer: confluent_kafka.Producer,
    topic: str,
    count: int,
    on_delivery: Callable[[Any, Any], None] | None,
) -> None:
    """Keyless produce() calls, serving delivery reports every 10,000 and when the queue is full."""
    produce, poll = producer.produce, producer.poll
    for i in range(count):
        while True:
            try:
                if on_delivery is None:
                    produce(topic, VALUE)
                else:
                    produce(topic, VALUE, on_delivery=on_delivery)
                break
            except BufferError:
                poll(0.01)
        if i % 10_000 == 0:
            poll(0)


def _confluent_flush(producer: confluent_kafka.Producer, failures: list[str]) -> None:
    remaining = producer.flush(60)
    if remaining or failures:
        raise common.BenchError(
            f"confluent-kafka: {remaining} record(s) unacknowledged, {len(failures)} failed: "
            f"{failures[:3]}"
        )


class ConfluentE2e:
    def __init__(
        self, producer: confluent_kafka.Producer, consumer: confluent_kafka.Consumer, topic: str
    ) -> None:
        self._producer = producer
        self._consumer = consumer
        self._topic = topic
        consumer.assign(
            [
                confluent_kafka.TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING)
                for p in range(PARTITIONS)
            ]
        )

    def send(self, value: bytes) -> None:
        self._producer.produce(self._topic, value)
        self._producer.poll(0)

    def receive(self) -> list[bytes]:
        messages = confluent_take(self._consumer, 1000, timeout=0.1)
        return [m.value() for m in messages if m.error() is None]

    def close(self) -> None:
        try:
            self._producer.flush(30)
        finally:
            self._consumer.close()


class RedisSystem:
    """Redis streams through redis-py with hiredis: one stream per partition, one group."""

    name = "redis-streams"
    settings = ""

    def __init__(self, port: int) -> None:
        self._port = port
        self._client = self._connect()

    def _connect(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self._port)

    @staticmethod
    def streams(topic: str) -> list[str]:
        return [f"{topic}-{p}" for p in range(PARTITIONS)]

    def create_topic(self, topic: str) -> None:
        for stream in self.streams(topic):
            self._client.xgroup_create(stream, REDIS_GROUP, id="0", mkstream=True)

    def delete_topic(self, topic: str) -> None:
        self._client.delete(*self.streams(topic))

    def count(self, topic: str) -> int:
        return sum(self._client.xlen(stream) for stream in self.streams(topic))

    def produce_many(self, topic: str, count: int) -> None:
        streams = self.streams(topic)
        fields: dict[Any, Any] = {"v": VALUE}
        for start in range(0, count, REDIS_PIPELINE):
            pipeline = self._client.pipeline(transaction=False)
            for i in range(start, min(start + REDIS_PIPELINE, count)):
                pipeline.xadd(streams[i % PARTITIONS], fields)
            pipeline.execute()

    def produce_send(self, topic: str, count: int) -> None:
        streams = self.streams(topic)
        fields: dict[Any, Any] = {"v": VALUE}
        xadd = self._client.xadd
        for i in range(count):
            xadd(streams[i % PARTITIONS], fields)

    def consume(self, topic: str, count: int) -> None:
        reader = RedisReader(self._client, topic, CONSUME_BATCH, block_ms=1000)
        received = 0
        while received < count:
            received += len(reader.read())

    def e2e_session(self, topic: str) -> E2eSession:
        return RedisE2e(self._connect(), self._connect(), topic)

    def close(self) -> None:
        self._client.close()


class RedisReader:
    """XREADGROUP over a topic's streams, then one pipelined XACK per stream read."""

    def __init__(self, client: redis.Redis, topic: str, count: int, block_ms: int) -> None:
        self._client = client
        self._count = count
        self._block_ms = block_ms
        self._consumer = f"c-{uuid.uuid4().hex[:8]}"
        self._streams: dict[Any, Any] = {stream: ">" for stream in RedisSystem.streams(topic)}

    def read(self) -> list[bytes]:
        response: Any = self._client.xreadgroup(
            REDIS_GROUP, self._consumer, self._streams, count=self._count, block=self._block_ms
        )
        if not response:
            return []
        values: list[bytes] = []
        pipeline = self._client.pipeline(transaction=False)
        for stream, entries in response:
            pipeline.xack(stream, REDIS_GROUP, *[entry_id for entry_id, _ in entries])
            values.extend(entry[b"v"] for _, entry in entries)
        pipeline.execute()
        return values


class RedisE2e:
    def __init__(self, producer: redis.Redis, consumer: redis.Redis, topic: str) -> None:
        self._producer = producer
        self._consumer = consumer
        self._streams = RedisSystem.streams(topic)
        self._next = 0
        self._reader = RedisReader(consumer, topic, 1000, block_ms=100)

    def send(self, value: bytes) -> None:
        self._producer.xadd(self._streams[self._next % PARTITIONS], {"v": value})
        self._next += 1

    def receive(self) -> list[bytes]:
        return self._reader.read()

    def close(self) -> None:
        self._producer.close()
        self._consumer.close()


# Measuring


@dataclass
class Figures:
    """One system's figures: per metric, the value of every run."""

    runs: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METRICS})

    def add(self, metric: str, value: float) -> None:
        self.runs.setdefault(metric, []).append(value)

    def median(self, metric: str) -> float | None:
        values = self.runs[metric]
        return statistics.median(values) if values else None


def timed(action: Callable[[], None]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def check_count(system: System, topic: str, expected: int) -> None:
    stored = system.count(topic)
    if stored != expected:
        raise common.BenchError(
            f"{system.name}: '{topic}' holds {stored} records, expected {expected}"
        )


@dataclass(frozen=True)
class E2eResult:
    latencies: list[float]  # ms, of the records after the warm-up
    missing: list[int]  # sequence numbers the consumer never received
    sent: int


def run_e2e(session: E2eSession, rate: int, seconds: float) -> E2eResult:
    """Send ``rate`` records/s paced by the clock; return the latencies in ms and what was lost.

    The consumer runs in a thread of this process; each value carries its sequence number and
    the perf_counter_ns just before ``send``. The first E2E_WARMUP_SECONDS are not counted.
    """
    total = int(rate * (seconds + E2E_WARMUP_SECONDS))
    warmup = int(rate * E2E_WARMUP_SECONDS)
    latencies: list[float] = []
    seen = bytearray(total)
    sent_all = threading.Event()
    stop = threading.Event()

    def consume() -> None:
        received = 0
        deadline = float("inf")
        while received < total and time.monotonic() < deadline and not stop.is_set():
            for value in session.receive():
                now = time.perf_counter_ns()
                seq, sent = E2E_HEADER.unpack_from(value)
                if not seen[seq]:
                    seen[seq] = 1
                    received += 1
                    if seq >= warmup:
                        latencies.append((now - sent) / 1e6)
            if sent_all.is_set() and deadline == float("inf"):
                deadline = time.monotonic() + E2E_DRAIN_SECONDS

    consumer = threading.Thread(target=consume, name="bench-e2e-consumer")
    consumer.start()
    try:
        interval = 1.0 / rate
        start = time.perf_counter()
        pack, padding = E2E_HEADER.pack, E2E_PADDING
        for seq in range(total):
            delay = start + seq * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            session.send(pack(seq, time.perf_counter_ns()) + padding)
    except BaseException:
        stop.set()  # interrupted: do not wait for the consumer to drain
        raise
    finally:
        sent_all.set()
        consumer.join(E2E_DRAIN_SECONDS + 5)
        stop.set()
        consumer.join()
    return E2eResult(latencies, [seq for seq in range(total) if not seen[seq]], total)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(fraction * len(ordered)), len(ordered) - 1)]


def run_once(
    system: System,
    run: int,
    records: int,
    send_records: int,
    e2e_seconds: float,
    lost: list[str],
) -> dict[str, float]:
    """One run of every figure for one system, each on fresh topics deleted afterwards.

    Records the e2e consumer lost are described in ``lost`` (the run goes on).
    """
    suffix = f"{run}-{uuid.uuid4().hex[:6]}"
    many, single, latency = f"bench-many-{suffix}", f"bench-send-{suffix}", f"bench-e2e-{suffix}"
    figures: dict[str, float] = {}
    for topic in (many, single, latency):
        system.create_topic(topic)
    try:
        figures["send_many"] = records / timed(lambda: system.produce_many(many, records))
        check_count(system, many, records)
        figures["send"] = send_records / timed(lambda: system.produce_send(single, send_records))
        check_count(system, single, send_records)
        figures["consume"] = records / timed(lambda: system.consume(many, records))
        session = system.e2e_session(latency)
        try:
            e2e = run_e2e(session, E2E_RATE, e2e_seconds)
        finally:
            session.close()
        figures["p50"] = percentile(e2e.latencies, 0.50)
        figures["p99"] = percentile(e2e.latencies, 0.99)
        figures["e2e_lost"] = len(e2e.missing)
        if e2e.missing:
            lost.append(
                f"{system.name} run {run}: the e2e consumer never received {len(e2e.missing)} "
                f"of {e2e.sent} records (sequence numbers {e2e.missing[:10]}...) within "
                f"{E2E_DRAIN_SECONDS:g} s; the topic holds {system.count(latency)}"
            )
    finally:
        for topic in (many, single, latency):
            with contextlib.suppress(Exception):
                system.delete_topic(topic)
    return figures


def warm_up(system: System) -> None:
    """A short unrecorded run: connections, the broker's JIT and coordinators, SQLite's cache."""
    run_once(system, 0, WARMUP_RECORDS, WARMUP_RECORDS // 5, 0.5, [])


# Reporting


def format_figure(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    if metric in ("p50", "p99"):
        return f"{value:.2f}"
    return f"{value:,.0f}"


def minimum(system: str, metric: str, bound: float) -> common.Target[Figures]:
    def check(results: dict[str, Figures]) -> tuple[str, bool] | None:
        value = results[system].median(metric) if system in results else None
        return None if value is None else (format_figure(metric, value), value >= bound)

    return common.Target(system, metric, f"{metric} >= {bound:,.0f} rec/s", check)


def maximum(system: str, metric: str, bound: float) -> common.Target[Figures]:
    def check(results: dict[str, Figures]) -> tuple[str, bool] | None:
        value = results[system].median(metric) if system in results else None
        return None if value is None else (f"{value:.2f} ms", value <= bound)

    return common.Target(system, metric, f"e2e {metric} <= {bound:g} ms", check)


def near_peer(metric: str) -> common.Target[Figures]:
    def check(results: dict[str, Figures]) -> tuple[str, bool] | None:
        if "riverbed-kafka" not in results or "confluent-kafka" not in results:
            return None
        ours = results["riverbed-kafka"].median(metric)
        peer = results["confluent-kafka"].median(metric)
        if ours is None or not peer:
            return None
        return f"{ours / peer:.0%} of confluent-kafka", ours >= 0.9 * peer

    return common.Target("riverbed-kafka", metric, f"{metric} within 10% of confluent-kafka", check)


TARGETS = (
    minimum("riverbed-sqlite", "send_many", 1_000_000),
    minimum("riverbed-sqlite", "send", 400_000),
    minimum("riverbed-sqlite", "consume", 2_000_000),
    maximum("riverbed-sqlite", "p99", 10),
    near_peer("send_many"),
    near_peer("send"),
    near_peer("consume"),
)

COLUMNS = (
    "system",
    "produce send_many rec/s",
    "produce send rec/s",
    "consume rec/s",
    "e2e p50 ms",
    "e2e p99 ms",
)


def table_rows(results: dict[str, Figures]) -> list[list[str]]:
    """Each cell is the median, marked ✓/✗ where a target applies to it."""
    marks = common.target_marks(TARGETS, results)
    return [
        [name] + [format_figure(m, figures.median(m)) + marks.get((name, m), "") for m in METRICS]
        for name, figures in results.items()
    ]


def target_rows(results: dict[str, Figures]) -> list[list[str]]:
    """The measured targets (the other benchmarks also list those not measured)."""
    rows = []
    for target in TARGETS:
        outcome = target.check(results)
        if outcome is not None:
            measured, met = outcome
            rows.append([target.system, target.description, measured, "met" if met else "MISSED"])
    return rows


def result_tables(results: dict[str, Figures], runs: int) -> common.Tables:
    title = f"log benchmark (median of {runs} runs)"
    return common.Tables(title, COLUMNS, table_rows(results), target_rows(results))


def print_tables(console: Console, tables: common.Tables) -> None:
    table = Table(title=tables.title)
    table.add_column("system", no_wrap=True)
    for column in COLUMNS[1:]:  # shorter headers, so that 80 columns fit the system names
        table.add_column(column.removeprefix("produce ").removeprefix("e2e "), justify="right")
    for row in tables.rows:
        table.add_row(*row)
    console.print(table)
    console.print(tables.targets_table())


def versions() -> str:
    return (
        f"riverbed {riverbed.__version__} ({common.git_revision()}), "
        f"Python {platform.python_version()}, "
        f"confluent-kafka {confluent_kafka.version()} / librdkafka "
        f"{confluent_kafka.libversion()[0]}, Apache Kafka broker {common.kafka_broker_version()} "
        f"(KRaft, one node), redis-server {common.redis_server_version()}, redis-py "
        f"{redis.__version__} with hiredis"
    )


def settings_notes(args: argparse.Namespace, settings: dict[str, str]) -> list[str]:
    clients = "; ".join(f"{name}: {text}" for name, text in settings.items() if text)
    return [
        f"Workload: {PARTITIONS} partitions (Redis: {PARTITIONS} streams), {VALUE_BYTES}-byte "
        "values, keyless (no key; riverbed and librdkafka use sticky partitioning, a batch's "
        "worth per partition in turn; Redis spreads round robin), no headers; fresh topics each "
        "run, deleted afterwards.",
        f"send_many: {args.records:,} records; riverbed `Producer.send_many` in chunks of "
        f"{SEND_MANY_CHUNK:,} pairs from a default `log.producer()`; confluent-kafka: a "
        "`produce()` loop without per-record callback; Redis: XADD "
        f"pipelined {REDIS_PIPELINE:,} per pipeline (no MULTI). Timed until flush returns / the "
        "last pipeline is answered (everything acknowledged).",
        f"send: {args.send_records:,} records, one call each with a per-record acknowledgement: "
        "riverbed `Producer.send` (a SendFuture each), confluent-kafka `produce(on_delivery=...)`, "
        "Redis a synchronous XADD per record (one round trip each, no pipelining).",
        f"consume: all send_many records from the beginning with a new consumer, timed from its "
        f"creation until all arrived; riverbed `log.consumer(group=None, from_beginning=True)` "
        f"with `poll(max_records={CONSUME_BATCH:,})`; confluent-kafka assign() + "
        f"`consume(num_messages={CONSUME_BATCH:,}, timeout=0)`, reading each message's value "
        "(waiting for the first message only when none is there, as riverbed does) with "
        "fetch.max.bytes 50 MB, "
        "max.partition.fetch.bytes 10 MB, queued.min.messages 1,000,000; Redis XREADGROUP "
        f"COUNT {CONSUME_BATCH:,} over the 4 streams + one pipelined XACK per stream.",
        f"e2e: {E2E_RATE:,} records/s paced by the clock for {args.e2e_seconds:g} s after "
        f"{E2E_WARMUP_SECONDS:g} s of warm-up; producer and consumer are threads of the "
        "benchmark process (they share its GIL); latency = receive time - perf_counter just "
        "before the send call. riverbed `send` with the default 5 ms linger and `poll(timeout="
        "0.1)`; confluent-kafka linger.ms 5 and the consume above with timeout 0.1; Redis "
        "XADD without pipelining and XREADGROUP BLOCK 100 + XACK.",
        "riverbed-sqlite: `sqlite:///<tmpdir>/log.db`, default fsync=normal (WAL; survives a "
        "process crash, not a power loss).",
        "Kafka: the broker of tests/services/kafka.py (one KRaft node, -Xmx512m, SerialGC) on "
        "the same 2 cores as the clients. riverbed-kafka and confluent-kafka both use acks=all + "
        "enable.idempotence, no compression. Raw confluent-kafka gets its best throughput "
        "settings: linger.ms 20, batch.size 1,000,000, batch.num.messages 100,000, "
        "queue.buffering.max.messages 2,000,000; riverbed-kafka gets the same linger (20 ms) "
        "with its default 1 MB batches for send_many and send, and its defaults (5 ms) for e2e. "
        "confluent-kafka-matched (only with --only): raw confluent-kafka with riverbed-kafka's "
        "producer defaults for linger.ms and batch.size instead.",
        f"Client settings: {clients}.",
        "redis-streams: `--save '' --appendonly yes --appendfsync everysec` (AOF written every "
        "event loop, fsynced every second: survives a process crash, like the others), AOF "
        "rewrite off.",
        f"Before the measured runs each system does one unrecorded warm-up run "
        f"({WARMUP_RECORDS:,} records). Each figure is the median of the runs; ✓/✗ marks a "
        "figure that has a target.",
    ]


def append_results(
    args: argparse.Namespace,
    results: dict[str, Figures],
    report: common.Report,
    tables: common.Tables,
    lost: list[str],
    settings: dict[str, str],
) -> None:
    """``lost``: the records the e2e consumers lost; ``settings``: each system's client settings."""
    lines = report.section(versions(), tables, settings_notes(args, settings))
    for name, figures in results.items():
        runs = ", ".join(
            f"{m} " + " / ".join(format_figure(m, v) for v in figures.runs[m]) for m in METRICS
        )
        lines.append(f"- {name}: {runs}")
    if lost:
        lines += ["", "Lost records (e2e; the figures above exclude them):", ""]
        lines += [f"- {problem}" for problem in lost]
    common.write_results(lines)


# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000, help="records per run")
    parser.add_argument(
        "--send-records", type=int, default=None, help="records for send (default: records/5)"
    )
    common.add_runs_argument(parser)
    parser.add_argument(
        "--only",
        default=",".join(SYSTEMS),
        help=f"comma-separated, from {','.join(SYSTEMS + EXTRA_SYSTEMS)} (default: the first 4)",
    )
    parser.add_argument(
        "--e2e-seconds", type=float, default=E2E_SECONDS, help="measured e2e seconds per run"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="riverbed producer batch_size (default: own)"
    )
    common.add_no_results_argument(parser)
    args = parser.parse_args(argv)
    args.systems = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(args.systems) - set(SYSTEMS + EXTRA_SYSTEMS)
    if unknown:
        parser.error(
            f"unknown system(s) {sorted(unknown)}; choose from {', '.join(SYSTEMS + EXTRA_SYSTEMS)}"
        )
    if args.send_records is None:
        args.send_records = max(args.records // 5, 1)
    return args


def open_systems(args: argparse.Namespace, stack: contextlib.ExitStack, root: Path) -> list[System]:
    """Start the servers the chosen systems need and connect to them; ``stack`` undoes it all."""
    systems: list[System] = []
    bootstrap = ""
    if {"riverbed-kafka", "confluent-kafka", *EXTRA_SYSTEMS} & set(args.systems):
        (root / "kafka").mkdir()
        bootstrap = stack.enter_context(common.kafka_server(root / "kafka"))
    for name in args.systems:
        system: System
        if name == "riverbed-sqlite":
            (root / "sqlite").mkdir()
            url = f"sqlite:///{root / 'sqlite' / 'log.db'}"
            system = RiverbedSystem(name, url, args.batch_size)
        elif name == "riverbed-kafka":
            # Throughput with the same linger as raw confluent-kafka's best settings, so the
            # comparison measures riverbed's layer, not a setting; e2e keeps the 5 ms default.
            system = RiverbedSystem(
                name,
                f"kafka://{bootstrap}",
                args.batch_size,
                linger_ms=THROUGHPUT_LINGER_MS,
            )
        elif name == "confluent-kafka":
            system = ConfluentSystem(bootstrap)
        elif name == "confluent-kafka-matched":
            from riverbed.log.kafka import KafkaLog

            defaults = producer_defaults(KafkaLog)
            matched = {"linger.ms": defaults["linger_ms"], "batch.size": defaults["batch_size"]}
            system = ConfluentSystem(bootstrap, name, matched)
        else:
            (root / "redis").mkdir()
            system = RedisSystem(stack.enter_context(common.redis_server(root / "redis")).port)
        stack.callback(system.close)
        systems.append(system)
    return systems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.stop_on_signals()
    console = Console()
    report = common.Report("Log", "bench/log.py", TARGETS_NOTE, "rec/s; ms")
    results: dict[str, Figures] = {name: Figures() for name in args.systems}
    lost: list[str] = []
    reported = 0
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="riverbed-bench-")))
        with console.status("starting servers"):
            systems = open_systems(args, stack, root)
        settings = {system.name: system.settings for system in systems}
        for system in systems:
            with console.status(f"warming up {system.name}"):
                warm_up(system)
        for run in range(1, args.runs + 1):
            for system in systems:
                with console.status(f"run {run}/{args.runs}: {system.name}"):
                    figures = run_once(
                        system, run, args.records, args.send_records, args.e2e_seconds, lost
                    )
                for metric, value in figures.items():
                    results[system.name].add(metric, value)
                console.log(
                    f"run {run} {system.name}: "
                    + ", ".join(f"{m} {format_figure(m, v)}" for m, v in figures.items())
                )
                for problem in lost[reported:]:
                    console.log(f"[bold red]lost records:[/] {problem}")
                reported = len(lost)
    report.stop()
    tables = result_tables(results, args.runs)
    print_tables(console, tables)
    console.print(report.summary())
    if not args.no_results:
        append_results(args, results, report, tables, lost, settings)
        console.print(f"appended to {common.RESULTS.relative_to(common.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
