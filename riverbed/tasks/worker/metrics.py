"""Prometheus metrics of a task worker, served on ``--metrics-port`` (the ``metrics`` extra)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Sequence

from riverbed.errors import MissingExtraError
from riverbed.metrics_server import serve_metrics
from riverbed.tasks.messages import Outcome

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge
except ImportError as error:  # only a worker started with --metrics-port imports this module
    raise MissingExtraError("--metrics-port", "metrics", "prometheus-client") from error


class WorkerMetrics:
    """Counters move once per reported batch: tasks finished per task name and state."""

    def __init__(self, app: str, held: Callable[[], int]) -> None:
        """``held``: how many tasks the worker holds now, read at each scrape."""
        self.registry = CollectorRegistry()
        self.finished = Counter(
            "riverbed_tasks_finished", "Tasks finished, by task and outcome", ["task", "state"],
            registry=self.registry,
        )  # fmt: skip
        self.held = Gauge(
            "riverbed_tasks_held", "Tasks this worker holds: running or waiting for a slot",
            registry=self.registry,
        )  # fmt: skip
        self.held.set_function(held)
        Gauge("riverbed_app", "The app this worker runs", ["app"], registry=self.registry).labels(
            app
        ).set(1)

    def serve(self, port: int) -> None:
        serve_metrics(port, self.registry)

    def observe(self, outcomes: Sequence[Outcome]) -> None:
        for (name, state), n in Tally((o.message.name, str(o.state)) for o in outcomes).items():
            self.finished.labels(name, state).inc(n)
