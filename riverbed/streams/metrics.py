"""Prometheus metrics of a running app, served on ``--metrics-port`` (the ``metrics`` extra).

Counters move once per batch, not per record: records in and out per topic, dead-lettered
records, and a histogram of batch processing time; the group's lag per partition is a gauge
updated with the worker's status line.
"""

from __future__ import annotations

from collections.abc import Sequence

from riverbed.errors import MissingExtraError
from riverbed.metrics_server import serve_metrics

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.registry import Collector
except ImportError as error:  # only a worker started with --metrics-port imports this module
    raise MissingExtraError("--metrics-port", "metrics", "prometheus-client") from error


class RunnerMetrics:
    """One worker's metrics, in a registry of its own (``collectors`` too: the app's event
    sourcing's, say)."""

    def __init__(self, app: str, collectors: Sequence[Collector] = ()) -> None:
        self.registry = CollectorRegistry()
        for collector in collectors:
            self.registry.register(collector)
        labels = {"app": app}
        self.records_in = Counter(
            "riverbed_records_in", "Records read", ["topic"], registry=self.registry
        )
        self.records_out = Counter(
            "riverbed_records_out", "Records written", ["topic"], registry=self.registry
        )
        self.dead_lettered = Counter(
            "riverbed_dead_lettered", "Records sent to a dead-letter topic", ["topic"],
            registry=self.registry,
        )  # fmt: skip
        self.late = Counter(
            "riverbed_late_records", "Records that arrived after their windows closed",
            registry=self.registry,
        )  # fmt: skip
        self.batch_seconds = Histogram(
            "riverbed_batch_seconds",
            "Time to process, write and commit one batch",
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.lag = Gauge(
            "riverbed_lag", "Records not yet processed", ["topic", "partition"],
            registry=self.registry,
        )  # fmt: skip
        self.info = Gauge(
            "riverbed_app", "The app this worker runs", ["app"], registry=self.registry
        )
        self.info.labels(**labels).set(1)

    def serve(self, port: int) -> None:
        """Serve ``/metrics`` on ``port`` from a daemon thread."""
        serve_metrics(port, self.registry)

    def set_lag(self, lag: dict[tuple[str, int], int]) -> None:
        for (topic, partition), value in lag.items():
            self.lag.labels(topic, str(partition)).set(value)
