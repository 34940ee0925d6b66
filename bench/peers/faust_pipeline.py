"""The streams benchmark's pipeline on faust-streaming (run by bench/streams.py, peers venv).

One argument: a JSON object with bootstrap, input, output, group, state_dir, commit_interval (s),
window_ms, grace_ms and partitions. Prints ``READY`` once the app is built, then runs a worker until
SIGTERM; the benchmark watches the group's committed offsets (input and repartition topic).

Faust expires windows by wall-clock time (``expires`` after the window, checked every
``table_cleanup_interval``), not by event time; ``on_window_close`` sends the closed windows'
count and total to the output topic.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterable
from datetime import timedelta
from typing import Any

import faust


def main() -> None:
    config = json.loads(sys.argv[1])
    partitions = config["partitions"]
    app = faust.App(
        config["group"],
        broker=f"kafka://{config['bootstrap']}",
        store="memory://",
        datadir=config["state_dir"],
        web_enabled=False,
        topic_partitions=partitions,
        topic_replication_factor=1,
        broker_commit_interval=config["commit_interval"],
        consumer_auto_offset_reset="earliest",
        processing_guarantee="at_least_once",
        table_cleanup_interval=config.get("table_cleanup_interval", 1.0),
    )
    payments = app.topic(
        config["input"], key_serializer="raw", value_serializer="json", partitions=partitions
    )
    totals_topic = app.topic(
        config["output"], key_serializer="raw", value_serializer="json", partitions=partitions
    )

    async def on_window_close(key: Any, value: Any) -> None:
        card, (start, end) = key
        count, total = value
        await totals_topic.send(
            key=card.encode(),
            value={"card": card, "start": start, "end": end, "count": count, "total": total},
        )

    window_s = config["window_ms"] / 1000
    totals = (
        app.Table(
            "totals",
            default=lambda: [0, 0.0],
            partitions=partitions,
            on_window_close=on_window_close,
        )
        .tumbling(
            window_s, expires=timedelta(milliseconds=config["window_ms"] + config["grace_ms"])
        )
        .relative_to(lambda event: event.value["ts"] / 1000)
    )

    @app.agent(payments)
    async def aggregate(stream: AsyncIterable[Any]) -> None:
        positive = stream.filter(lambda payment: payment["amount"] > 0)  # type: ignore[attr-defined]
        async for payment in positive.group_by(lambda payment: payment["card"], name="card"):
            card = payment["card"]
            count, total = totals[card].current()
            totals[card] = [count + 1, total + payment["amount"]]

    print("READY", flush=True)
    faust.Worker(app, loglevel="WARNING", quiet=True).execute_from_commandline()


if __name__ == "__main__":
    main()
