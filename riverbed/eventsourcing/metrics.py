"""Prometheus metrics of an app's event sourcing (the ``metrics`` extra): where each projection,
process manager and relay stands, read from the store when ``/metrics`` is scraped."""

from __future__ import annotations

from collections.abc import Iterator
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


class SubscriberMetrics(Collector):
    """Each projection's, process manager's and relay's checkpoint, lag, parked events and
    whether it stopped (``on_error = "stop"``), labelled by name."""

    def __init__(self, events: EventSourcing) -> None:
        self.events = events

    def collect(self) -> Iterator[Metric]:
        try:
            statuses = self.events.statuses()
        except BrokerUnavailableError:  # the store is down: the scrape answers without them
            return
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
