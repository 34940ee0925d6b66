"""Helpers for users' unit tests: run an app's pipelines over lists of inputs.

``run_app`` runs the app for real, on a throwaway embedded log: the inputs are written with the
topics' codecs, every pipeline (repartitioning, windows, joins, exactly-once commits) runs until
nothing is left to process, and the outputs and the state are read back.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from riverbed.errors import RiverbedError
from riverbed.streams.app import App
from riverbed.streams.runner import reachable_outputs
from riverbed.streams.topics import Topic

# (key, value) or (key, value, timestamp_ms)
Input = tuple[Any, Any] | tuple[Any, Any, int]


class PipelineResult(msgspec.Struct):
    """What the pipelines wrote, per output topic, as ``(key, value)`` pairs in order; and
    the state they hold, per store, as ``{state key: entry}`` over all partitions."""

    outputs: dict[str, list[tuple[Any, Any]]]
    state: dict[str, dict[Any, Any]]
    late: int = 0  # records that arrived after their windows closed


def run_app(
    app: App, inputs: Mapping[Topic[Any, Any], Iterable[Input]], url: str | None = None
) -> PipelineResult:
    """Write ``inputs`` to their topics, process everything, return outputs and state.

    ``app`` must not have opened its log yet: it runs on a temporary SQLite file (or on the log
    at ``url``, whose topics should then be new).
    """
    if app.is_connected:
        raise RiverbedError(
            f"app '{app.name}' already opened its log; run_app needs a fresh App to run it on "
            "a temporary log"
        )
    with tempfile.TemporaryDirectory(prefix="riverbed-test-") as tmp:
        app.use_url(url or f"sqlite:///{Path(tmp) / 'log.db'}")
        try:
            app.start()
            with app.log.producer() as producer:
                for topic, rows in inputs.items():
                    for key, value, *timestamp in rows:
                        key_bytes, value_bytes, headers = topic.encode(value, key)
                        producer.send(
                            topic.name,
                            value_bytes,
                            key=key_bytes,
                            headers=headers,
                            timestamp_ms=timestamp[0] if timestamp else None,
                        )
            # Done when polls stay empty: the embedded log answers at once, a broker needs longer
            # (a rebalance, a fetch round trip).
            idle_s = 0.2 if url is None or url.startswith("sqlite:") else 2.0
            with app.runner() as runner:
                while runner.run_once(idle_s) or runner.run_once(idle_s):
                    pass
                state = {name: node.snapshot() for name, node in app.topology.stateful.items()}
                late = runner.late
            outputs: dict[str, list[tuple[Any, Any]]] = {}
            for node in reachable_outputs(app.topology):
                outputs[node.topic.name] = _read(app, node.topic)
            return PipelineResult(outputs, state, late)
        finally:
            app.close()
            app.use_url(None)


def _read(app: App, topic: Topic[Any, Any]) -> list[tuple[Any, Any]]:
    with app.log.consumer(topics=[topic.name], from_beginning=True) as consumer:
        records = []
        while batch := consumer.poll(max_records=10_000, timeout=0.2):
            records.extend(batch)
    records.sort(key=lambda r: (r.partition, r.offset))
    return [(typed.key, typed.value) for typed in map(topic.decode, records)]
