"""A relay process for the crash test: ``python -m tests.eventsourcing.relay_worker EVENTS_URL
LOG_URL TOPIC PAGE``; prints each batch's last position as it checkpoints it."""

from __future__ import annotations

import sys
import time

import riverbed
import tests.eventsourcing.shop  # noqa: F401 - registers the event types
from riverbed.eventsourcing import EventSourcing, Relay

# A restarted relay waits for the killed one's lease to expire: keep the test short.
LEASE_TTL_S = 1.0


def main() -> None:
    events_url, log_url, topic, page = sys.argv[1:5]
    events = EventSourcing("relay", events_url)
    with riverbed.connect(log_url) as log:
        relay = Relay(events, log, topic, lease_ttl=LEASE_TTL_S)
        while True:
            if relay.run_once(int(page)):
                print(events.store.checkpoint(relay.name), flush=True)
            elif relay.leading:
                events.store.wait_for_events(events.store.checkpoint(relay.name), 0.3)
            else:
                time.sleep(0.1)


if __name__ == "__main__":
    main()
