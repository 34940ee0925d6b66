"""A relay process for the crash test: ``python -m tests.eventsourcing.relay_worker EVENTS_URL
LOG_URL TOPIC PAGE``; prints each batch's last position as it checkpoints it."""

from __future__ import annotations

import sys

import riverbed
import tests.eventsourcing.shop  # noqa: F401 - registers the event types
from riverbed.eventsourcing import EventSourcing, Relay


def main() -> None:
    events_url, log_url, topic, page = sys.argv[1:5]
    events = EventSourcing("relay", events_url)
    with riverbed.connect(log_url) as log:
        relay = Relay(events, log, topic)
        while True:
            if relay.run_once(int(page)):
                print(events.store.checkpoint(relay.name), flush=True)
            else:
                events.store.wait_for_events(events.store.checkpoint(relay.name), 0.5)


if __name__ == "__main__":
    main()
