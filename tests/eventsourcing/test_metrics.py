"""The event-sourcing metrics a worker serves: read from the store when scraped, and a store
that is slow or down does not hold the scrape up."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import riverbed
from riverbed.eventsourcing import SubscriberStatus
from riverbed.eventsourcing.metrics import STATUS_WAIT_S, SubscriberMetrics


class SlowStore:
    """``statuses`` as of a store that answers only once ``answer`` is set."""

    def __init__(self) -> None:
        self.answer = threading.Event()

    def statuses(self) -> list[SubscriberStatus]:
        self.answer.wait(30)
        return [SubscriberStatus("totals", 1, 5, 7, 2, 1)]


def test_a_scrape_answers_without_the_store_while_it_is_slow_then_with_it() -> None:
    store = SlowStore()
    metrics = SubscriberMetrics(store)  # type: ignore[arg-type]
    started = time.monotonic()
    assert list(metrics.collect()) == []  # the scrape is not held up
    assert time.monotonic() - started < STATUS_WAIT_S + 2
    store.answer.set()
    families: dict[str, Any] = {family.name: family for family in metrics.collect()}
    assert families["riverbed_subscriber_lag"].samples[0].value == 2
    assert families["riverbed_subscriber_parked"].samples[0].labels == {"name": "totals"}


@pytest.mark.parametrize("with_handler", [False, True])
def test_a_metrics_port_in_use_is_refused_naming_it_before_any_runner_starts(
    tmp_path: Path, with_handler: bool
) -> None:
    app = riverbed.App(
        "shop", url=f"sqlite:///{tmp_path}/log.db", events_url=f"sqlite:///{tmp_path}/events.db"
    )
    app.events.projection(Totals())
    if with_handler:  # the pipelines' runner serves the metrics, after the projections started
        app.handler(app.topic("orders", value=str))(lambda order: None)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(riverbed.RiverbedError, match=(
            rf"cannot serve metrics on port {port}: Address already in use; give a free port"
        )):  # fmt: skip
            app.run(threading.Event(), metrics_port=port)
        assert not (tmp_path / "events.db").exists()  # no runner ran: none made the store
    app.close()


class Totals(riverbed.Projection):
    name = "totals"

    def handle(self, event: riverbed.Envelope, tx: riverbed.eventsourcing.ReadModel) -> None:
        tx.put("totals", event.stream, {"seen": True})
