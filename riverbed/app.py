"""``riverbed.App``: the one object users wire streams, handlers, tasks and aggregates onto."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from riverbed.eventsourcing.runtime import EventSourcing
from riverbed.streams.app import DEFAULT_STATE_DIR, stopping_on_signals
from riverbed.streams.app import App as StreamApp
from riverbed.streams.runner import Runner
from riverbed.tasks.registry import Tasks

log = logging.getLogger("riverbed.app")
# How long stopping waits for each projection's, process manager's and relay's thread.
STOP_WAIT_S = 30.0


class App(StreamApp):
    """An application: topics and pipelines on its log (``url``), tasks on its task broker
    (``tasks_url``, else ``$RIVERBED_TASKS_URL``, else ``sqlite:///.riverbed/tasks.db``), and
    aggregates, projections and sagas on its event store (``events_url``, else
    ``$RIVERBED_EVENTS_URL``, else ``sqlite:///.riverbed/events.db``)."""

    def __init__(
        self,
        name: str,
        url: str | None = None,
        *,
        tasks_url: str | None = None,
        events_url: str | None = None,
        exactly_once: bool = True,
        state_dir: str | Path = DEFAULT_STATE_DIR,
    ) -> None:
        super().__init__(name, url, exactly_once=exactly_once, state_dir=state_dir)
        self.tasks = Tasks(name, tasks_url)
        self.task = self.tasks.task
        self.periodic = self.tasks.periodic
        self.events = EventSourcing(name, events_url)

    def close(self) -> None:
        self.tasks.close()
        self.events.close()
        super().close()

    def check_runnable(self) -> None:
        if not self.events.has_work():
            super().check_runnable()

    def metric_collectors(self) -> list[Any]:
        if not self.events.has_work():
            return []
        from riverbed.eventsourcing.metrics import SubscriberMetrics

        return [SubscriberMetrics(self.events)]

    def run(
        self,
        stop: threading.Event | None = None,
        report: Callable[[Runner], None] | None = None,
        metrics_port: int | None = None,
    ) -> None:
        """Run the app's pipelines and handlers, and its projections, process managers and
        outbox relays, until ``stop`` is set or the process gets SIGTERM or SIGINT."""
        if not self.events.has_work():
            super().run(stop, report, metrics_port)
            return
        stop = stop or threading.Event()
        # Until the runners have ended: a second signal (a terminal's Ctrl-C and the parent
        # worker's, say) would otherwise interrupt the join and close the store under them.
        with stopping_on_signals(stop):
            if self.has_streams():
                self.start()
            # Served before anything runs: a port in use fails the worker with nothing done.
            metrics = None if metrics_port is None else self.serve_metrics(metrics_port)
            # The log connected by the relays, which wait it out if it is unreachable.
            threads = self.events.run(stop, (lambda: self.log) if self.events.relays else None)
            try:
                if self.has_streams():
                    self.run_pipelines(stop, report, metrics)
                else:
                    stop.wait()
            finally:
                stop.set()
                for thread in threads:
                    thread.join(STOP_WAIT_S)
                    if thread.is_alive():  # a handler still running: its transaction rolls back
                        log.warning("runner thread %s did not stop within %g s; what it was "
                                    "handling is rolled back, and handled again after a restart",
                                    thread.name, STOP_WAIT_S)  # fmt: skip
        if self.events.failures:
            raise self.events.failures[0]
