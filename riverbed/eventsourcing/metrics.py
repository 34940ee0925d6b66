"""Prometheus metrics of an app's event sourcing (the ``metrics`` extra): where each projection,
process manager and relay stands, read from the store when ``/metrics`` is scraped."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from riverbed.errors import MissingExtraError
from riverbed.log.errors import BrokerUnavailableError

try:
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as error:  # only a worker started with --metrics-port imports this module
    raise MissingExtraError("--metrics-port", "metrics", "prometheus-client") from error

if TYPE_CHECKING:
    from riverbed.eventsourcing.runtime import EventSourcing
    from riverbed.eventsourcing.subscriptions import SubscriberStatus

# How long a scrape waits for the store's answer.
STATUS_WAIT_S = 3.0


class SubscriberMetrics(Collector):
    """Each projection's, process manager's and relay's checkpoint, lag, parked events and
    whether it stopped (``on_error = "stop"``), labelled by name."""

    def __init__(self, events: EventSourcing) -> None:
        self.events = events
        # Read in a thread of its own: a store that is down holds a read for its pool_timeout,
        # past a scraper's own timeout; the scrape answers without them meanwhile.
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="riverbed-metrics")
        self._reading: Future[list[SubscriberStatus]] | None = None

    def collect(self) -> Iterator[Metric]:
        if self._reading is None:
            self._reading = self._reader.submit(self.events.statuses)
        try:
            statuses = self._reading.result(timeout=STATUS_WAIT_S)
        except TimeoutError:  # still reading: the next scrape takes its result
            return
        except BrokerUnavailableError:
            return
        finally:
            if self._reading.done():
                self._reading = None
        families = {
            "checkpoint": GaugeMetricFamily(
                "riverbed_subscriber_checkpoint", "The last position handled", labels=["name"]
            ),
            "lag": GaugeMetricFamily(
                "riverbed_subscriber_lag", "Events stored and not handled yet", labels=["name"]
            ),
            "parked": GaugeMetricFamily(
                "riverbed_subscriber_parked", "Events (and timers) parked", labels=["name"]
            ),
            "stopped": GaugeMetricFamily(
                "riverbed_subscriber_stopped", "1 if it stopped on an error", labels=["name"]
            ),
        }
        for status in statuses:
            families["checkpoint"].add_metric([status.name], status.checkpoint)
            families["lag"].add_metric([status.name], status.lag)
            families["parked"].add_metric([status.name], status.parked)
            families["stopped"].add_metric([status.name], int(status.stopped_at is not None))
        yield from families.values()
