"""``riverbed.App``: the one object a user wires topics, pipelines and handlers onto."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

from riverbed.backoff import Backoff, exponential
from riverbed.errors import RiverbedError
from riverbed.log import connect
from riverbed.log.api import Closing, Log, Producer, TopicPartition
from riverbed.log.errors import TopicExistsError
from riverbed.serde.compat import Compatibility, schema_of
from riverbed.serde.registry import SchemaRegistry
from riverbed.signals import handling
from riverbed.streams.dsl import Stream
from riverbed.streams.handlers import Handler, retry_topic
from riverbed.streams.joins import Table
from riverbed.streams.runner import COMMIT_INTERVAL_S, Runner
from riverbed.streams.state import state_backend_for
from riverbed.streams.state.backend import changelog_topics
from riverbed.streams.topics import Topic
from riverbed.streams.topology import Topology

log = logging.getLogger("riverbed.streams")

if TYPE_CHECKING:
    from riverbed.streams.metrics import RunnerMetrics

K = TypeVar("K")
V = TypeVar("V")
F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_STATE_DIR = ".riverbed/state"
# At least once, the runner's producer holds records until the batch's commit flushes them (as
# Kafka Streams' producers linger): written in the runner's own thread, in one go. On the embedded
# log, the producer's thread writing them meanwhile would take turns with the runner for the GIL
# at every SQLite call, and hold the write lock the commit then waits for.
RUNNER_LINGER_MS = 2 * COMMIT_INTERVAL_S * 1000


class App(Closing):
    """An application: its topics on one log (``url``, else ``$RIVERBED_URL``, else SQLite)."""

    def __init__(
        self,
        name: str,
        url: str | None = None,
        *,
        exactly_once: bool = True,
        state_dir: str | Path = DEFAULT_STATE_DIR,
    ) -> None:
        """``exactly_once``: each batch's outputs, state and input offsets commit atomically
        (a transaction); False: at least once, cheaper, outputs may repeat after a crash.
        ``state_dir``: where workers keep local state on Kafka (restored from changelogs)."""
        if not name:
            raise RiverbedError("an App needs a name, e.g. riverbed.App('shop')")
        self.name = name
        self.exactly_once = exactly_once
        self.state_dir = Path(state_dir)
        self._url = url
        self._log: Log | None = None
        self._producer: Producer | None = None
        self._topics: dict[str, Topic[Any, Any]] = {}
        self._topology = Topology(name)
        self._handlers: list[tuple[Topic[Any, Any], Handler]] = []
        self._started = False

    @property
    def is_connected(self) -> bool:
        return self._log is not None

    def use_url(self, url: str | None) -> None:
        """Point a not yet connected app at another log (``riverbed.testing`` does)."""
        if self._log is not None:
            raise RiverbedError(f"app '{self.name}' is connected; close() it first")
        self._url = url

    @property
    def log(self) -> Log:
        if self._log is None:
            self._log = connect(self._url)
        return self._log

    @property
    def producer(self) -> Producer:
        """The app's shared producer (created on first use)."""
        if self._producer is None:
            self._producer = self.log.producer()
        return self._producer

    def _flush_producer(self) -> None:
        if self._producer is not None:
            self._producer.flush()

    @overload
    def topic(
        self,
        name: str,
        *,
        partitions: int = ...,
        value: type[V],
        key: type[K],
        compact: bool = ...,
        retention_ms: int | None = ...,
        compatibility: Compatibility = ...,
    ) -> Topic[K, V]: ...

    @overload
    def topic(
        self,
        name: str,
        *,
        partitions: int = ...,
        value: type[V],
        key: None = ...,
        compact: bool = ...,
        retention_ms: int | None = ...,
        compatibility: Compatibility = ...,
    ) -> Topic[bytes, V]: ...

    @overload
    def topic(
        self,
        name: str,
        *,
        partitions: int = ...,
        value: None = ...,
        key: None = ...,
        compact: bool = ...,
        retention_ms: int | None = ...,
        compatibility: Compatibility = ...,
    ) -> Topic[bytes, bytes]: ...

    def topic(
        self,
        name: str,
        *,
        partitions: int = 1,
        value: Any = None,
        key: Any = None,
        compact: bool = False,
        retention_ms: int | None = None,
        compatibility: Compatibility = Compatibility.BACKWARD,
    ) -> Topic[Any, Any]:
        """Declare a topic; ``start()`` creates it if missing and registers its value schema."""
        if name in self._topics:
            raise RiverbedError(f"topic '{name}' is already declared on app '{self.name}'")
        declared: Topic[Any, Any] = Topic(
            name, partitions, key, value, compact, retention_ms, compatibility
        )
        self._topics[name] = declared
        return declared

    @property
    def topics(self) -> dict[str, Topic[Any, Any]]:
        return dict(self._topics)

    def stream(self, topic: Topic[K, V]) -> Stream[K, V]:
        """A pipeline reading ``topic``; chain operators on it and end it with ``.to()``."""
        self._check_declared(topic)
        return Stream(
            self._topology,
            self._topology.source(topic),
            topic.value_type,
            topic.partitions,
            topic.name,
        )

    def table(self, topic: Topic[Any, Any]) -> Table:
        """``topic``'s latest value per key, kept current in every worker, for
        ``stream.join_table(table, ...)``; make the topic ``compact=True`` to bound it."""
        self._check_declared(topic)
        return self._topology.table(topic)

    @property
    def topology(self) -> Topology:
        return self._topology

    def _check_declared(self, topic: Topic[Any, Any]) -> None:
        if self._topics.get(topic.name) is not topic:
            raise RiverbedError(
                f"topic '{topic.name}' is not declared on app '{self.name}'; "
                f"declare it with app.topic('{topic.name}', ...)"
            )

    def handler(
        self,
        topic: Topic[Any, Any],
        retries: int = 3,
        backoff: Backoff | None = None,
        retry_delays: tuple[float, ...] = (),
    ) -> Callable[[F], F]:
        """Decorate ``def f(value)`` / ``def f(key, value)`` (or ``async def``) to handle each
        record of ``topic``: retried ``retries`` times with ``backoff``; then, for each of
        ``retry_delays`` (seconds), parked in a retry topic (``<topic>.retry-1``, ...) and tried
        again that much later, without holding up the records behind it; then dead-lettered."""
        self._check_declared(topic)

        def register(fn: F) -> F:
            handler = Handler(fn, retries, backoff or exponential(), retry_delays)
            self._handlers.append((topic, handler))
            return fn

        return register

    def start(self) -> None:
        """Create missing topics (and their dead-letter topics) and register their key and
        value schemas.

        An incompatible schema change raises ``IncompatibleSchemaError`` naming the field, before
        anything is written with it. Done once per connection: ``run`` after ``start`` does not
        repeat it.
        """
        if self._started:
            return
        registry = SchemaRegistry(self.log)
        for topic in self._topics.values():
            for name in (topic.name, topic.dead_letter_topic):
                try:
                    self.log.create_topic(
                        name,
                        partitions=topic.partitions,
                        compact=topic.compact and name == topic.name,
                        retention_ms=topic.retention_ms,
                    )
                except TopicExistsError:
                    if name == topic.name:
                        _warn_if_other_partitions(topic, self.log.topic(name).partitions)
        topics = list(self._topics.values())
        # Keys too, as a schema registry's serializers do: a key of another type would also
        # send a key's records to another partition.
        versions = registry.register_many(
            [(f"{t.name}-value", t.value_schema, t.compatibility) for t in topics]
            + [(f"{t.name}-key", schema_of(t.key_type), t.compatibility) for t in topics]
        )
        for topic, version in zip(topics, versions[: len(topics)], strict=True):  # the values'
            topic.schema_version = version.version
        internal = {name: t.partitions for name, t in self._topology.internal_topics.items()}
        for topic, handler in self._handlers:
            for level in range(1, len(handler.retry_delays) + 1):
                internal[retry_topic(topic.name, level)] = topic.partitions
        for name, partitions in internal.items():
            with contextlib.suppress(TopicExistsError):
                self.log.create_topic(name, partitions=partitions)
        for name, partitions in changelog_topics(self.log, self._topology.store_partitions).items():
            with contextlib.suppress(TopicExistsError):
                self.log.create_topic(name, partitions=partitions, compact=True)
        self._started = True

    def run(
        self,
        stop: threading.Event | None = None,
        report: Callable[[Runner], None] | None = None,
        metrics_port: int | None = None,
    ) -> None:
        """Run the app's pipelines until ``stop`` is set or the process gets SIGTERM or SIGINT;
        the batch in hand is finished and committed, and the consumer leaves the group.
        ``report(runner)`` is called about once a second with the runner's counters; with
        ``metrics_port``, Prometheus metrics are served there (the ``metrics`` extra)."""
        self._sources()  # nothing to run: say so before touching the log
        self.start()  # topics exist before the metrics endpoint answers
        metrics = None if metrics_port is None else self.serve_metrics(metrics_port)
        self.run_pipelines(stop or threading.Event(), report, metrics)

    def serve_metrics(self, port: int) -> RunnerMetrics:
        """Serve the app's Prometheus metrics on ``port``; ``RiverbedError`` if it cannot."""
        from riverbed.streams.metrics import RunnerMetrics

        metrics = RunnerMetrics(self.name, self.metric_collectors())
        metrics.serve(port)
        return metrics

    def run_pipelines(
        self,
        stop: threading.Event,
        report: Callable[[Runner], None] | None,
        metrics: RunnerMetrics | None,
    ) -> None:
        """``run``, once the topics exist and the metrics (if any) are served."""
        if metrics is not None:
            report = self._reporting_lag(metrics, report)
        with stopping_on_signals(stop), self.runner(metrics) as runner:
            runner.run(stop, report)

    def metric_collectors(self) -> list[Any]:
        """Prometheus collectors a worker serves beside its own metrics (a subclass's)."""
        return []

    @contextmanager
    def runner(self, metrics: RunnerMetrics | None = None) -> Iterator[Runner]:
        """The app started, in its group, with a runner to call ``run_once`` on (what
        ``run`` loops over); leaving the block leaves the group."""
        sources = self._sources()
        self.start()
        runner: Runner | None = None

        def revoked(partitions: set[TopicPartition]) -> None:
            if runner is not None:
                runner.revoked(partitions)

        with (
            self.log.consumer(
                group=self.name, topics=sources, from_beginning=True, on_revoke=revoked
            ) as consumer,
            contextlib.ExitStack() as cleanup,
        ):
            producer: Producer
            if self.exactly_once:
                producer = cleanup.enter_context(self.log.transactional_producer(consumer))
            else:
                producer = cleanup.enter_context(self.log.producer(linger_ms=RUNNER_LINGER_MS))
            state = state_backend_for(self.log, self.name, self.state_dir)
            cleanup.callback(state.close)
            runner = Runner(
                self._topology,
                self._handlers,
                self.log,
                consumer,
                producer,
                state,
                self.exactly_once,
                metrics,
                self._flush_producer,
            )
            cleanup.callback(runner.close)
            yield runner

    def has_streams(self) -> bool:
        """Whether the app has a pipeline or handler to run."""
        return bool(self._source_topics())

    def check_runnable(self) -> None:
        """``RiverbedError`` if a worker would have nothing of the app's to run."""
        self._sources()

    def _sources(self) -> list[str]:
        """The topics the app's consumer reads; an error if there is nothing to run."""
        sources = self._source_topics()
        if not sources:
            raise RiverbedError(
                f"app '{self.name}' has no pipeline or handler to run; end a pipeline with "
                "app.stream(topic)...to(other), or decorate a function with @app.handler(topic)"
            )
        return sources

    def _source_topics(self) -> list[str]:
        return sorted(
            set(self._topology.running_sources())
            | {t.name for t, _ in self._handlers}
            | {
                retry_topic(t.name, level)
                for t, h in self._handlers
                for level in range(1, len(h.retry_delays) + 1)
            }
        )

    def _reporting_lag(
        self, metrics: RunnerMetrics, report: Callable[[Runner], None] | None
    ) -> Callable[[Runner], None]:
        """``report``, plus the group's lag into the metrics each time."""

        def report_with_lag(runner: Runner) -> None:
            metrics.set_lag(self.log.group_lag(self.name))
            if report is not None:
                report(runner)

        return report_with_lag

    def close(self) -> None:
        self._started = False
        if self._producer is not None:
            self._producer.close()
            self._producer = None
        if self._log is not None:
            self._log.close()
            self._log = None


@contextmanager
def stopping_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set ``stop`` while running (main thread only); the previous handlers
    come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def set_stop(*_: object) -> None:
        # From a thread of its own: the handler runs between two bytecodes of the main thread,
        # which may hold the lock of stop's condition (inside stop.wait or, after a first
        # signal, stop.set), and Event.set here would wait on it for ever.
        threading.Thread(target=stop.set, name="riverbed-stopping", daemon=True).start()

    with handling((signal.SIGTERM, signal.SIGINT), set_stop):
        yield


def _warn_if_other_partitions(topic: Topic[Any, Any], partitions: int) -> None:
    """An existing topic keeps its partitions (another app, a relay or a person made it first);
    a pipeline that counted on the declared number should know."""
    if partitions != topic.partitions:
        log.warning(
            "topic %s exists with %d partitions; the app declares %d, and the topic keeps its "
            "own (riverbed does not repartition a topic)", topic.name, partitions,
            topic.partitions,
        )  # fmt: skip
