"""The app of the exactly-once crash test: a windowed count per key, built from the command
line so that the test can run it in worker processes (``python -m tests.streams.eos_app``)."""

from __future__ import annotations

import sys

import riverbed

WINDOW_S = 1


def build(url: str, name: str, source: str, target: str, state_dir: str) -> riverbed.App:
    app = riverbed.App(name, url=url, state_dir=state_dir)
    # One input partition, in event-time order, read by one worker; the four partitions it is
    # re-keyed into are shared by both workers and stay in event-time order, so no record is
    # late and the expected counts are exact.
    events = app.topic(source, partitions=1, value=int, key=str)
    counts = app.topic(target, partitions=4, value=riverbed.Windowed[int], key=str)
    (
        app.stream(events)
        .key_by(lambda n: f"k{n % 50}", partitions=4)
        .window(riverbed.tumbling(seconds=WINDOW_S), timestamp=lambda n: n)
        .count()
        .to(counts)
    )
    return app


if __name__ == "__main__":
    url, name, source, target, state_dir = sys.argv[1:6]
    build(url, name, source, target, state_dir).run()
