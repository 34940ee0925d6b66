"""The streams benchmark's pipeline on Quix Streams (run by bench/streams.py in bench/.venv-peers).

One argument: a JSON object with bootstrap, input, output, group, state_dir, exactly_once,
commit_interval (s), window_ms and grace_ms. Prints ``READY`` once the pipeline is built and its
topics exist, then runs until SIGTERM; the benchmark watches the group's committed offsets.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from quixstreams import Application
from quixstreams.dataframe.windows import Count, Sum
from quixstreams.models import TopicConfig


def event_time(value: Any, headers: Any, timestamp: float, timestamp_type: Any) -> int:
    """The record's own ``ts`` (epoch ms), not the Kafka timestamp."""
    return int(value["ts"])


def quiet_late(*args: Any, **kwargs: Any) -> bool:
    """Late records are dropped without a log line each (the grace period makes them rare)."""
    return False


def main() -> None:
    config = json.loads(sys.argv[1])
    app = Application(
        broker_address=config["bootstrap"],
        consumer_group=config["group"],
        auto_offset_reset="earliest",
        commit_interval=config["commit_interval"],
        state_dir=config["state_dir"],
        processing_guarantee="exactly-once" if config["exactly_once"] else "at-least-once",
        loglevel="WARNING",
    )
    payments = app.topic(
        config["input"],
        value_deserializer="json",
        key_deserializer="str",
        timestamp_extractor=event_time,
    )
    totals = app.topic(
        config["output"],
        key_serializer="str",
        value_serializer="json",
        config=TopicConfig(num_partitions=config["partitions"], replication_factor=1),
    )
    sdf = app.dataframe(payments)
    sdf = sdf.filter(lambda payment: payment["amount"] > 0)
    sdf = sdf.group_by("card")
    sdf = (
        sdf.tumbling_window(config["window_ms"], grace_ms=config["grace_ms"], on_late=quiet_late)
        .agg(count=Count(), total=Sum("amount"))
        .final()
    )
    sdf.to_topic(totals)
    print("READY", flush=True)
    app.run()


if __name__ == "__main__":
    main()
