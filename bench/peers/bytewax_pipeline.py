"""The streams benchmark's pipeline on Bytewax (run by bench/streams.py in bench/.venv-peers).

One argument: a JSON object with bootstrap, input, output, window_ms and grace_ms. Bytewax keeps
its input positions in its own recovery store, not in a Kafka consumer group, so there are no
committed offsets to watch: the source reads the input to its end (``tail=False``), the dataflow
then closes every window and finishes. Prints ``READY`` just before the dataflow starts and
``DONE`` when it has finished (one worker, in this process).
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage, KafkaSource
from bytewax.dataflow import Dataflow
from bytewax.operators.windowing import EventClock, TumblingWindower, fold_window
from bytewax.testing import run_main

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def event_time(payment: dict[str, Any]) -> datetime:
    return EPOCH + timedelta(milliseconds=payment["ts"])


def add(totals: tuple[int, float], payment: dict[str, Any]) -> tuple[int, float]:
    return totals[0] + 1, totals[1] + payment["amount"]


def merge(a: tuple[int, float], b: tuple[int, float]) -> tuple[int, float]:
    return a[0] + b[0], a[1] + b[1]


def to_message(item: tuple[str, tuple[int, tuple[int, float]]]) -> KafkaSinkMessage[bytes, bytes]:
    card, (window_id, (count, total)) = item
    value = {"card": card, "window": window_id, "count": count, "total": total}
    return KafkaSinkMessage(card.encode(), json.dumps(value).encode())


def build(config: dict[str, Any]) -> Dataflow:
    brokers = [config["bootstrap"]]
    flow = Dataflow("bench-streams")
    messages = op.input("payments", flow, KafkaSource(brokers, [config["input"]], tail=False))
    payments = op.map("decode", messages, lambda message: json.loads(message.value))
    positive = op.filter("positive", payments, lambda payment: payment["amount"] > 0)
    by_card = op.key_on("by_card", positive, lambda payment: payment["card"])
    clock = EventClock(
        event_time, wait_for_system_duration=timedelta(milliseconds=config["grace_ms"])
    )
    windower = TumblingWindower(length=timedelta(milliseconds=config["window_ms"]), align_to=EPOCH)
    windows = fold_window(
        "totals", by_card, clock, windower, lambda: (0, 0.0), add, merge, ordered=False
    )
    op.output(
        "card_totals",
        op.map("encode", windows.down, to_message),
        KafkaSink(brokers, config["output"]),
    )
    return flow


def main() -> None:
    flow = build(json.loads(sys.argv[1]))
    print("READY", flush=True)
    run_main(flow)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
