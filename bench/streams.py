"""The streams benchmark: a windowed aggregation on riverbed against Quix Streams, faust, Bytewax.

Every system runs the same pipeline over the same pre-produced input in the same run on the same
machine: JSON payments ``{"card", "amount", "ts"}`` over 1,000 cards in a 4-partition topic (~5%
with amount <= 0, ``ts`` rising over 10 minutes of event time); keep amount > 0, key by card,
tumbling 10 s windows on ``ts``, count and sum of amount per card and window, final results to an
output topic. The figure is input records per second from the start of the pipeline until its
consumer group's committed offsets have caught up with the end of the input and of its internal
repartition topic(s). riverbed runs in this process; the peers run as subprocesses in their own
venv (``bench/.venv-peers``, ``make bench-peers``). It prints the medians of ``--runs`` runs and
appends them to ``bench/RESULTS.md``; ``bench/README.md`` explains the figures. Run it with::

    .venv/bin/python bench/streams.py [--records N] [--runs R] [--systems riverbed,quix]
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import platform
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import common  # bench/common.py: python puts bench/ first on sys.path
import confluent_kafka
import msgspec
from confluent_kafka import ConsumerGroupTopicPartitions
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]
from rich.console import Console

riverbed, RIVERBED_IMPORT_ERROR = common.import_riverbed()
PEER_PACKAGES = ("quixstreams", "faust-streaming", "bytewax", "confluent-kafka", "aiokafka")

# The workload
PARTITIONS = 4
CARDS = 1_000
NON_POSITIVE = 0.05  # share of amounts <= 0 (dropped by the filter)
EVENT_SPAN_MS = 600_000  # ts rises over 10 minutes of event time: 60 windows
WINDOW_MS = 10_000
# Allowed lateness. Records of the 4 input partitions interleave by fetch (up to 1 MB of one
# partition at a time), so after the repartition a card's ts can jump back by minutes of event
# time; 5 minutes keeps every system aggregating every record instead of dropping late ones.
GRACE_MS = 300_000
SEED = 20_261_126
SEND_CHUNK = 10_000

# Measuring
SQLITE_POLL = 0.01  # s between progress checks on SQLite (runs take ~1-2 s)
DEFAULT_POLL = 0.05  # s between progress checks on Kafka (admin requests to the broker)
PEER_COMMIT_INTERVAL = 0.5  # s; Quix's default is 5 s, faust's 2.8 s (see README)
READY_TIMEOUT = 120.0  # s for a peer to build its pipeline
MARKER_SLACK = 2  # offsets a transactional topic's end may hold past the last record (markers)
WARMUP_RECORDS = 20_000

RIVERBED_SYSTEMS = (
    "riverbed-sqlite-alo",
    "riverbed-sqlite-eos",
    "riverbed-kafka-alo",
    "riverbed-kafka-eos",
)
PEER_SYSTEMS = ("quix", "quix-eos", "faust", "bytewax")
SYSTEMS = RIVERBED_SYSTEMS + PEER_SYSTEMS
ALIASES = {
    "riverbed": RIVERBED_SYSTEMS,
    "riverbed-sqlite": RIVERBED_SYSTEMS[:2],
    "riverbed-kafka": RIVERBED_SYSTEMS[2:],
    "peers": PEER_SYSTEMS,
}
KAFKA_SYSTEMS = frozenset(SYSTEMS) - {"riverbed-sqlite-alo", "riverbed-sqlite-eos"}

TARGETS_NOTE = (
    "riverbed-sqlite >= 300,000 records/s; riverbed-kafka >= 2x Quix Streams (at-least-once "
    "against at-least-once, exactly-once against exactly-once); exactly-once costs at most 20% "
    "against at-least-once on each backend"
)


# The input: the same bytes for every system


@dataclass(frozen=True)
class Workload:
    pairs: list[tuple[bytes, bytes]]  # (card, JSON value), in ts order
    positive: int  # records with amount > 0

    @property
    def records(self) -> int:
        return len(self.pairs)


def make_workload(records: int, end_ms: int) -> Workload:
    """``records`` payments whose ``ts`` rises evenly over EVENT_SPAN_MS up to ``end_ms``."""
    rng = random.Random(SEED)
    start_ms = (end_ms - EVENT_SPAN_MS) // WINDOW_MS * WINDOW_MS
    encode = msgspec.json.encode
    pairs = []
    positive = 0
    for i in range(records):
        card = f"card-{rng.randrange(CARDS):04d}"
        if rng.random() < NON_POSITIVE:
            amount = -round(rng.uniform(0.0, 100.0), 2)  # <= 0
        else:
            amount = round(rng.uniform(0.01, 500.0), 2)
            positive += 1
        ts = start_ms + i * EVENT_SPAN_MS // records
        pairs.append((card.encode(), encode({"card": card, "amount": amount, "ts": ts})))
    return Workload(pairs, positive)


# riverbed: the streams API this benchmark is written against (adapt here if a name differs)


class Payment(msgspec.Struct):
    card: str
    amount: float
    ts: int


def build_riverbed_app(
    name: str, url: str, exactly_once: bool, source: str, sink: str, state_dir: Path
) -> Any:
    """The pipeline on a ``riverbed.App``; ``app.start()`` creates its topics."""
    options: dict[str, Any] = {}
    if "state_dir" in inspect.signature(riverbed.App).parameters:
        options["state_dir"] = str(state_dir)  # else the App's default under the working dir
    app = riverbed.App(name, url=url, exactly_once=exactly_once, **options)
    payments = app.topic(source, partitions=PARTITIONS, value=Payment)
    # Keys: the cards; values: each window's start_ms, end_ms and {"count": ..., "total": ...}.
    totals = app.topic(
        sink, partitions=PARTITIONS, key=str, value=riverbed.Windowed[dict[str, Any]]
    )
    (
        app.stream(payments)
        .filter(lambda p: p.amount > 0)
        .key_by(lambda p: p.card)
        .window(
            riverbed.tumbling(seconds=WINDOW_MS // 1000),
            timestamp=lambda p: p.ts,
            grace=GRACE_MS / 1000,
        )
        .aggregate(count=riverbed.count(), total=riverbed.sum(lambda p: p.amount))
        .to(totals)
    )
    return app


# The systems


@dataclass(frozen=True)
class Outcome:
    seconds: float  # from the start of the pipeline until all input was processed
    emitted: int  # records in the output topic when the pipeline was stopped (informational)


class System(Protocol):
    name: str

    def run(self, workload: Workload, tag: str) -> Outcome:
        """Produce ``workload`` to fresh topics (untimed), time the pipeline over it, clean up."""
        ...


Lags = Mapping[tuple[str, int], int]


def caught_up(lags: Lags, source: str, settled: Callable[[str, int, int], bool]) -> bool:
    """All of ``source``'s partitions committed to their end, and every other topic of the group
    (there must be one: the repartition topic) too, allowing an end offset up to MARKER_SLACK
    past the committed one where ``settled`` says that only transaction markers are left there."""
    if sorted(p for t, p in lags if t == source) != list(range(PARTITIONS)):
        return False
    if all(t == source for t, _ in lags):  # the pipeline repartitions: that topic must show
        return False
    if any(lag for (t, _), lag in lags.items() if t == source):
        return False
    behind = {tp: lag for tp, lag in lags.items() if lag}
    if any(lag > MARKER_SLACK for lag in behind.values()):
        return False
    return all(settled(t, p, lag) for (t, p), lag in behind.items())


def wait_caught_up(
    lags: Callable[[], Lags],
    source: str,
    settled: Callable[[str, int, int], bool],
    timeout: float,
    poll: float,
    problem: Callable[[], str | None],
) -> float:
    """perf_counter right after the lag reading that showed everything processed."""
    deadline = time.monotonic() + timeout
    last: Lags = {}
    error: Exception | None = None
    while True:
        trouble = problem()
        if trouble is not None:
            raise common.BenchError(trouble)
        try:
            last = lags()
            error = None
        except Exception as exc:  # the group or a topic may not exist yet
            error = exc
        observed = time.perf_counter()
        if error is None and caught_up(last, source, settled):
            return observed
        if time.monotonic() > deadline:
            lagging: dict[str, int] = {}
            for (topic, _), lag in sorted(last.items()):
                lagging[topic] = lagging.get(topic, 0) + lag
            raise common.BenchError(
                f"not caught up after {timeout:g} s; lag per topic {lagging or 'unknown'}"
                + (f"; last error: {error}" if error else "")
            )
        time.sleep(poll)


def no_markers(topic: str, partition: int, lag: int) -> bool:
    return False


class KafkaTools:
    """Admin and consumer calls on the benchmark's broker, for every system that uses it."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.admin = AdminClient({"bootstrap.servers": bootstrap})

    def create_topic(self, topic: str) -> None:
        common.create_kafka_topic(self.admin, topic, PARTITIONS)

    def delete_topics(self, tag: str) -> None:
        """Every topic whose name holds ``tag`` (inputs, outputs, repartition, changelogs)."""
        topics = [t for t in self.admin.list_topics(timeout=10).topics if tag in t]
        if topics:
            for future in self.admin.delete_topics(topics).values():
                with contextlib.suppress(Exception):
                    future.result(30)

    def produce(self, topic: str, workload: Workload) -> None:
        """The workload, keyed; murmur2 puts each card in the partition riverbed would."""
        failures: list[str] = []

        def on_delivery(error: Any, message: Any) -> None:
            if error is not None:
                failures.append(str(error))

        producer = confluent_kafka.Producer(
            {
                "bootstrap.servers": self.bootstrap,
                "acks": "all",
                "enable.idempotence": True,
                "partitioner": "murmur2_random",
                "linger.ms": 20,
                "batch.size": 1_000_000,
                "queue.buffering.max.messages": 1_000_000,
                "on_delivery": on_delivery,
            }
        )
        for i, (key, value) in enumerate(workload.pairs):
            while True:
                try:
                    producer.produce(topic, value, key)
                    break
                except BufferError:
                    producer.poll(0.01)
            if i % 10_000 == 0:
                producer.poll(0)
        remaining = producer.flush(60)
        if remaining or failures:
            raise common.BenchError(
                f"producing the input: {remaining} unacknowledged, {failures[:3]}"
            )
        stored = self.count(topic)
        if stored != workload.records:
            raise common.BenchError(
                f"'{topic}' holds {stored} records, expected {workload.records}"
            )

    def ends(self, partitions: list[confluent_kafka.TopicPartition]) -> dict[tuple[str, int], int]:
        if not partitions:
            return {}
        latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
        futures = self.admin.list_offsets({tp: latest for tp in partitions})
        return {(tp.topic, tp.partition): f.result(10).offset for tp, f in futures.items()}

    def count(self, topic: str) -> int:
        metadata = self.admin.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return 0
        tps = [confluent_kafka.TopicPartition(topic, p) for p in metadata.partitions]
        return sum(self.ends(tps).values())

    def group_lag(self, group: str, source: str, internal: Callable[[str], bool]) -> Lags:
        """End offset minus committed offset (the whole end where nothing is committed) of
        ``source`` and of the topics ``internal`` picks out, for ``group``."""
        metadata = self.admin.list_topics(timeout=5).topics
        tps = [
            confluent_kafka.TopicPartition(name, p)
            for name, topic in metadata.items()
            if name == source or internal(name)
            for p in topic.partitions
        ]
        request = ConsumerGroupTopicPartitions(group, tps)
        answer = self.admin.list_consumer_group_offsets([request])[group].result(10)
        committed = {(tp.topic, tp.partition): tp.offset for tp in answer.topic_partitions}
        return {tp: end - max(committed.get(tp, 0), 0) for tp, end in self.ends(tps).items()}

    def only_markers(self, topic: str, partition: int, lag: int) -> bool:
        """Whether a read_committed consumer finds no record between the committed offset and the
        end: what is left there are transaction markers, which no consumer commits past."""
        end = self.ends([confluent_kafka.TopicPartition(topic, partition)])[topic, partition]
        consumer = confluent_kafka.Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"bench-markers-{uuid.uuid4().hex}",
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
                "enable.auto.commit": False,
            }
        )
        try:
            consumer.assign([confluent_kafka.TopicPartition(topic, partition, end - lag)])
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                message = consumer.poll(0.5)
                if message is None:
                    continue
                error = message.error()
                if error is None:
                    return False
                if error.code() == confluent_kafka.KafkaError._PARTITION_EOF:
                    return True
            return False
        finally:
            consumer.close()


class RiverbedStreams:
    """riverbed's streams API in this process: app.run in a thread, progress from group_lag."""

    def __init__(
        self, name: str, root: Path, kafka: KafkaTools | None, exactly_once: bool, timeout: float
    ) -> None:
        self.name = name
        self._root = root
        self._kafka = kafka
        self._exactly_once = exactly_once
        self._timeout = timeout

    def _url(self, directory: Path) -> str:
        if self._kafka is not None:
            return f"kafka://{self._kafka.bootstrap}"
        return f"sqlite:///{directory / 'log.db'}"

    def run(self, workload: Workload, tag: str) -> Outcome:
        name, source, sink = f"bench-streams-{tag}", f"payments-{tag}", f"card-totals-{tag}"
        directory = self._root / tag
        directory.mkdir()
        url = self._url(directory)
        app = build_riverbed_app(name, url, self._exactly_once, source, sink, directory / "state")
        try:
            app.start()
            producer = app.log.producer()
            try:
                for start in range(0, workload.records, SEND_CHUNK):
                    producer.send_many(source, workload.pairs[start : start + SEND_CHUNK])
                producer.flush()
            finally:
                producer.close()
            stored = sum(app.log.end_offsets(source).values())
            if stored != workload.records:
                raise common.BenchError(
                    f"'{source}' holds {stored} records, expected {workload.records}"
                )
            stop = threading.Event()
            failure: list[BaseException] = []

            def run_app() -> None:
                try:
                    app.run(stop=stop)
                except BaseException as exc:
                    failure.append(exc)

            def problem() -> str | None:
                if failure:
                    return f"app.run raised {type(failure[0]).__name__}: {failure[0]}"
                return None

            settled = self._kafka.only_markers if self._kafka is not None else no_markers
            thread = threading.Thread(target=run_app, name=f"bench-{self.name}", daemon=True)
            started = time.perf_counter()
            thread.start()
            try:
                done = wait_caught_up(
                    lambda: app.log.group_lag(name),
                    source,
                    settled,
                    self._timeout,
                    SQLITE_POLL if self._kafka is None else DEFAULT_POLL,
                    problem,
                )
            finally:
                stop.set()
                thread.join(60)
            if thread.is_alive():
                raise common.BenchError("app.run did not return within 60 s of stop being set")
            if failure:
                raise common.BenchError(f"app.run raised {failure[0]!r} while stopping")
            emitted = sum(app.log.end_offsets(sink).values())
            return Outcome(done - started, emitted)
        finally:
            with contextlib.suppress(Exception):
                app.close()
            if self._kafka is not None:
                with contextlib.suppress(Exception):
                    self._kafka.delete_topics(tag)


class PeerProcess:
    """A peer's pipeline script in bench/.venv-peers; its stdout lines are read by a thread."""

    def __init__(self, script: Path, config: dict[str, Any], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self._process = subprocess.Popen(
            [str(common.PEER_PYTHON), str(script), json.dumps(config)],
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=config["state_dir"],
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(
            target=self._read, args=(self._process.stdout,), daemon=True
        )
        self._reader.start()

    def _read(self, stream: IO[str] | None) -> None:
        if stream is not None:
            for line in stream:
                self._lines.put(line.strip())
        self._lines.put(None)

    def wait_line(self, word: str, timeout: float) -> float:
        """perf_counter when the script printed ``word`` on a line of its own."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise common.BenchError(f"no '{word}' from the peer within {timeout:g} s") from None
            if line is None:
                self._process.wait(10)
                raise common.BenchError(self.exited())
            if line == word:
                return time.perf_counter()

    def problem(self) -> str | None:
        return None if self._process.poll() is None else self.exited()

    def exited(self) -> str:
        self._log.flush()
        return (
            f"the peer exited with code {self._process.poll()}: {common.last_error(self.log_path)}"
        )

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
        self._log.close()


class PeerStreams:
    """A peer's pipeline in a subprocess on the benchmark's broker.

    Consumer-group peers (Quix Streams, faust): done when the group's committed offsets caught up
    with the input and the topics ``internal(topic, tag)`` picks out (the repartition topic; not
    the changelogs, which the group does not consume). Without ``internal`` (Bytewax): done when
    the script prints DONE (it reads the input to the end and keeps its positions in its own
    recovery store, not in a group).
    """

    def __init__(
        self,
        name: str,
        script: str,
        root: Path,
        kafka: KafkaTools,
        timeout: float,
        options: dict[str, Any],
        internal: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.name = name
        self._script = common.PEERS / script
        self._root = root
        self._kafka = kafka
        self._timeout = timeout
        self._options = options
        self._internal = internal or (lambda topic, tag: False)
        self._runs_to_end = internal is None

    def run(self, workload: Workload, tag: str) -> Outcome:
        source, sink, group = f"payments-{tag}", f"card-totals-{tag}", f"bench-streams-{tag}"
        state = self._root / tag
        state.mkdir()
        peer: PeerProcess | None = None
        try:
            self._kafka.create_topic(source)
            self._kafka.create_topic(sink)
            self._kafka.produce(source, workload)
            config = {
                "bootstrap": self._kafka.bootstrap,
                "input": source,
                "output": sink,
                "group": group,
                "state_dir": str(state),
                "partitions": PARTITIONS,
                "window_ms": WINDOW_MS,
                "grace_ms": GRACE_MS,
                **self._options,
            }
            peer = PeerProcess(self._script, config, self._root / f"{tag}.log")
            started = peer.wait_line("READY", READY_TIMEOUT)
            if self._runs_to_end:
                done = peer.wait_line("DONE", self._timeout)
            else:
                done = wait_caught_up(
                    lambda: self._kafka.group_lag(group, source, lambda t: self._internal(t, tag)),
                    source,
                    self._kafka.only_markers,
                    self._timeout,
                    DEFAULT_POLL,
                    peer.problem,
                )
            peer.stop()
            peer = None
            return Outcome(done - started, self._kafka.count(sink))
        finally:
            if peer is not None:
                peer.stop()
            with contextlib.suppress(Exception):
                self._kafka.delete_topics(tag)


def quix_internal(topic: str, tag: str) -> bool:
    """Quix's repartition topics: ``repartition__<group>--<topic>--<operation>``."""
    return topic.startswith("repartition__") and tag in topic


def faust_internal(topic: str, tag: str) -> bool:
    """faust's: ``<app id>-<topic>-<name>-repartition``."""
    return topic.endswith("-repartition") and tag in topic


PEER_PACKAGE = {
    "quix": "quixstreams",
    "quix-eos": "quixstreams",
    "faust": "faust-streaming",
    "bytewax": "bytewax",
}


def open_systems(
    args: argparse.Namespace, stack: contextlib.ExitStack, root: Path, peers: dict[str, str]
) -> list[System]:
    """Start the broker if a chosen system needs it; ``stack`` stops it."""
    kafka: KafkaTools | None = None
    if KAFKA_SYSTEMS & set(args.systems):
        (root / "kafka").mkdir()
        kafka = KafkaTools(stack.enter_context(common.kafka_server(root / "kafka")))
    work = root / "runs"
    work.mkdir()
    options = {"commit_interval": args.peer_commit_interval}
    systems: list[System] = []
    for name in args.systems:
        if name.startswith("riverbed-") and RIVERBED_IMPORT_ERROR is not None:
            systems.append(common.Unavailable(name, RIVERBED_IMPORT_ERROR))
            continue
        if name.startswith("riverbed-"):
            backend = kafka if "-kafka-" in name else None
            systems.append(
                RiverbedStreams(name, work, backend, name.endswith("-eos"), args.timeout)
            )
            continue
        assert kafka is not None
        package = PEER_PACKAGE[name]
        if not peers:
            systems.append(common.Unavailable(name, "no bench/.venv-peers: run `make bench-peers`"))
        elif package not in peers:
            systems.append(
                common.Unavailable(name, f"{package} is not installed in bench/.venv-peers")
            )
        elif name in ("quix", "quix-eos"):
            eos = {"exactly_once": name == "quix-eos"}
            systems.append(
                PeerStreams(
                    name,
                    "quix_pipeline.py",
                    work,
                    kafka,
                    args.timeout,
                    options | eos,
                    quix_internal,
                )
            )
        elif name == "faust":
            systems.append(
                PeerStreams(
                    name, "faust_pipeline.py", work, kafka, args.timeout, options, faust_internal
                )
            )
        else:
            systems.append(PeerStreams(name, "bytewax_pipeline.py", work, kafka, args.timeout, {}))
    return systems


# Results


@dataclass
class Results(common.Runs[Outcome]):
    records: int = 0  # input records per run

    def rate(self) -> float | None:
        rates = [self.records / o.seconds for o in self.outcomes]
        return statistics.median(rates) if rates else None

    def seconds(self) -> float | None:
        return statistics.median(o.seconds for o in self.outcomes) if self.outcomes else None

    def emitted(self) -> float | None:
        return statistics.median(o.emitted for o in self.outcomes) if self.outcomes else None


RATE = "records/s"  # the figure every target is about


def at_least(system: str, bound: float) -> common.Target[Results]:
    def check(results: dict[str, Results]) -> tuple[str, bool] | None:
        rate = results[system].rate() if system in results else None
        return None if rate is None else (f"{rate:,.0f} records/s", rate >= bound)

    return common.Target(system, RATE, f">= {bound:,.0f} records/s", check)


def ratio(system: str, peer: str, factor: float, description: str) -> common.Target[Results]:
    check: common.Check[Results] = common.ratio_check(system, peer, factor, Results.rate)
    return common.Target(system, RATE, description, check)


TARGETS = (
    at_least("riverbed-sqlite-alo", 300_000),
    at_least("riverbed-sqlite-eos", 300_000),
    ratio("riverbed-kafka-alo", "quix", 2.0, ">= 2x Quix Streams (at-least-once)"),
    ratio("riverbed-kafka-eos", "quix-eos", 2.0, ">= 2x Quix Streams (exactly-once)"),
    ratio("riverbed-sqlite-eos", "riverbed-sqlite-alo", 0.8, "exactly-once costs <= 20%"),
    ratio("riverbed-kafka-eos", "riverbed-kafka-alo", 0.8, "exactly-once costs <= 20%"),
)
COLUMNS = ("system", RATE, "seconds", "window results emitted", "runs")


def table_rows(results: dict[str, Results]) -> list[list[str]]:
    marks = common.target_marks(TARGETS, results)
    rows = []
    for name, result in results.items():
        rate, seconds, emitted = result.rate(), result.seconds(), result.emitted()
        if rate is None:
            rows.append(result.failed_row(name, len(COLUMNS)))
            continue
        rows.append(
            [
                name,
                f"{rate:,.0f}" + marks.get((name, RATE), ""),
                f"{seconds:.2f}",
                f"{emitted:,.0f}",
                result.tally(),
            ]
        )
    return rows


def result_tables(results: dict[str, Results], runs: int, records: int) -> common.Tables:
    title = f"streams benchmark: {records:,} records (median of {runs} runs)"
    targets = common.target_rows(TARGETS, results)
    return common.Tables(title, COLUMNS, table_rows(results), targets)


def versions(peers: dict[str, str]) -> str:
    version = riverbed.__version__ if riverbed is not None else "(does not import)"
    peer_text = ", ".join(f"{name} {version}" for name, version in peers.items()) or "none"
    return (
        f"riverbed {version} ({common.git_revision()}), Python {platform.python_version()}, "
        f"msgspec {msgspec.__version__}, confluent-kafka {confluent_kafka.version()}; peers "
        f"(bench/.venv-peers, Python 3.11): {peer_text}; Apache Kafka broker "
        f"{common.kafka_broker_version()} (KRaft, one node)"
    )


def settings_notes(args: argparse.Namespace, workload: Workload) -> list[str]:
    return [
        f"Workload: {workload.records:,} JSON payments `{{card, amount, ts}}` over {CARDS:,} "
        f"cards, keyed by card (murmur2, the same partition for every system), in a "
        f"{PARTITIONS}-partition topic produced before timing; {workload.positive:,} with amount "
        f"> 0; ts (epoch ms) rises evenly over {EVENT_SPAN_MS // 60_000} minutes of event time "
        f"({EVENT_SPAN_MS // WINDOW_MS} windows of {WINDOW_MS // 1000} s). Fresh topics, group "
        "and state for every run.",
        "Pipeline: filter amount > 0, key by card (a repartition topic on every Kafka system but "
        f"Bytewax), tumbling {WINDOW_MS // 1000} s windows on ts with {GRACE_MS // 1000} s "
        "allowed lateness, count and sum of amount per card and window, final results to a "
        "4-partition output topic.",
        "Figure: input records / seconds from the start of the pipeline (riverbed: app.run's "
        "thread started, after app.start() created the topics; peers: their script printed "
        "READY with the pipeline built, before their run call) until the group's committed "
        "offsets reached the end of the input and of the repartition topic(s) (riverbed: "
        "`log.group_lag(app)`; Quix, faust: the group's offsets through confluent-kafka's "
        "admin API; on transactional topics an end up to 2 offsets past the committed one "
        "counts when a read_committed consumer finds no record there). Bytewax: until its "
        "dataflow finished reading the input to the end (tail=False) and closed its windows. "
        "Window results emitted: the output topic's end offsets when the run was stopped "
        "(informational: windows close at different times on each system; on exactly-once "
        "Kafka runs the offsets include transaction markers).",
        "riverbed: in this process; riverbed-sqlite `sqlite:///<tmpdir>/log.db` (a new file each "
        "run), riverbed-kafka the broker below; -alo `exactly_once=False`, -eos "
        "`exactly_once=True`; `state_dir` a temp dir per run; `.window(tumbling(seconds=10), "
        f"timestamp=ts, grace={GRACE_MS // 1000})` into a `Windowed` output topic keyed by card. "
        "Progress checked every "
        f"{SQLITE_POLL * 1000:g} ms (SQLite) / {DEFAULT_POLL * 1000:g} ms.",
        f"Quix Streams: `processing_guarantee` at-least-once (quix) / exactly-once (quix-eos), "
        f"commit_interval {args.peer_commit_interval:g} s (default 5 s, which would add up to 5 s "
        "to the time until the offsets show the work), RocksDB state with changelog topics "
        "(its defaults), `group_by('card')`, `tumbling_window(10_000, grace_ms=...).agg(count="
        "Count(), total=Sum('amount')).final()`, a timestamp extractor reading ts.",
        f"faust-streaming: at-least-once, broker_commit_interval {args.peer_commit_interval:g} s "
        "(default 2.8 s), memory store with changelog topic, `group_by(card)`, a tumbling "
        "windowed table relative to ts (`on_window_close` sends to the output topic; faust "
        "expires windows by wall-clock time).",
        "Bytewax: one worker, KafkaSource (tail=False) -> filter -> key_on -> fold_window "
        "(EventClock on ts, TumblingWindower) -> KafkaSink; no repartition topic (one worker) "
        "and no consumer group.",
        "Kafka: the broker of tests/services/kafka.py (one KRaft node, -Xmx512m, SerialGC) on "
        "the same 2 cores as the clients. Peers run as subprocesses with bench/.venv-peers' "
        "Python. "
        + (
            f"Each system does one unrecorded warm-up run ({args.warmup_records:,} records) first; "
            if args.warmup_records
            else "No warm-up runs; "
        )
        + "each figure is the median of the runs.",
    ]


def append_results(
    args: argparse.Namespace,
    results: dict[str, Results],
    report: common.Report,
    tables: common.Tables,
    workload: Workload,
    peers: dict[str, str],
) -> None:
    lines = report.section(versions(peers), tables, settings_notes(args, workload))
    for name, result in results.items():
        runs = [f"{result.records / o.seconds:,.0f} ({o.emitted:,})" for o in result.outcomes]
        lines.append(result.runs_line(name, runs, " / "))
    common.write_results(lines)


# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000, help="input records per run")
    common.add_runs_argument(parser)
    common.add_systems_argument(parser, SYSTEMS, ALIASES)
    parser.add_argument(
        "--warmup-records",
        type=int,
        default=WARMUP_RECORDS,
        help="records of the unrecorded warm-up run per system (0: none)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds one run may take before it fails"
    )
    parser.add_argument(
        "--peer-commit-interval",
        type=float,
        default=PEER_COMMIT_INTERVAL,
        help="Quix commit_interval and faust broker_commit_interval in seconds",
    )
    common.add_no_results_argument(parser)
    args = parser.parse_args(argv)
    args.systems = common.chosen_systems(parser, args.systems, SYSTEMS, ALIASES)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.stop_on_signals()
    console = Console()
    report = common.Report(
        "Streams", "bench/streams.py", TARGETS_NOTE, "records/s; window results emitted"
    )
    now_ms = int(time.time() * 1000)
    workload = make_workload(args.records, now_ms)
    warmup = make_workload(args.warmup_records, now_ms) if args.warmup_records else None
    peers = common.peer_versions(PEER_PACKAGES)
    console.log(f"peers venv: {peers or 'missing'}")
    results = {name: Results(records=workload.records) for name in args.systems}
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="riverbed-streams-")))
        with console.status("starting the broker"):
            systems = open_systems(args, stack, root, peers)
        if warmup is not None:
            for system in systems:
                with console.status(f"warming up {system.name}"):
                    outcome = common.outcome_or_failure(
                        system.run, warmup, f"w{uuid.uuid4().hex[:8]}"
                    )
                if isinstance(outcome, str):
                    console.log(
                        f"warm-up {system.name}: [red]failed[/] {common.short(outcome, 300)}"
                    )
        for run in range(1, args.runs + 1):
            for system in systems:
                with console.status(f"run {run}/{args.runs}: {system.name}"):
                    outcome = common.outcome_or_failure(
                        system.run, workload, f"r{run}{uuid.uuid4().hex[:8]}"
                    )
                if isinstance(outcome, str):
                    results[system.name].failures.append(outcome)
                    console.log(
                        f"run {run} {system.name}: [red]failed[/] {common.short(outcome, 300)}"
                    )
                else:
                    results[system.name].outcomes.append(outcome)
                    console.log(
                        f"run {run} {system.name}: {workload.records / outcome.seconds:,.0f} "
                        f"records/s ({outcome.seconds:.2f} s), {outcome.emitted:,} window "
                        "results emitted"
                    )
    report.stop()
    tables = result_tables(results, args.runs, workload.records)
    tables.print(console)
    console.print(report.summary())
    if not args.no_results:
        append_results(args, results, report, tables, workload, peers)
        console.print(f"appended to {common.RESULTS.relative_to(common.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
