"""bench/eventstore.py's peer: the `eventsourcing` library (pyeventsourcing) on the same workload.

Runs in bench/.venv-peers. One argument, a JSON config: ``env`` (the Application's
environment: PERSISTENCE_MODULE, SQLITE_DBNAME or POSTGRES_*, ...), ``aggregates``, ``events``
(per aggregate, the first one the creation), ``page`` (read-all page size), and optionally
``warmup`` (``env`` and ``aggregates``: the same phases first on a store of their own,
unrecorded). Prints one JSON line: the seconds of each phase and what it counted.

Phases, in order, on one store:

1. save per command: each aggregate created and saved, then each further command saved at once
   (``aggregates * events`` saves);
2. save per aggregate: ``events`` commands, then one ``app.save`` (``aggregates`` saves);
3. load: ``app.repository.get(id)`` of every aggregate of phase 2 (no aggregate cache);
4. read all: ``app.recorder.select_notifications`` page by page from the start (stored records,
   not decoded), then again decoding each into its domain event with ``app.mapper``.
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import sys
import time
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event


class Order(Aggregate):
    @event("Placed")
    def __init__(self, customer: str) -> None:
        self.customer = customer
        self.lines: list[str] = []

    @event("LineAdded")
    def add_line(self, sku: str) -> None:
        self.lines.append(sku)


class Orders(Application[UUID]):
    """Snapshotting off (the default: no ``snapshotting_intervals``)."""


def save_per_command(app: Orders, aggregates: int, events: int) -> list[UUID]:
    ids = []
    for i in range(aggregates):
        order = Order(f"customer-{i}")
        app.save(order)
        for j in range(1, events):
            order.add_line(f"sku-{j}")
            app.save(order)
        ids.append(order.id)
    return ids


def save_per_aggregate(app: Orders, aggregates: int, events: int) -> list[UUID]:
    ids = []
    for i in range(aggregates):
        order = Order(f"customer-{i}")
        for j in range(1, events):
            order.add_line(f"sku-{j}")
        app.save(order)
        ids.append(order.id)
    return ids


def load(app: Orders, ids: list[UUID], events: int) -> int:
    get = app.repository.get
    loaded = 0
    for aggregate_id in ids:
        order = get(aggregate_id)
        if order.version != events or len(order.lines) != events - 1:
            raise SystemExit(f"loaded {order.id} at version {order.version}, expected {events}")
        loaded += 1
    return loaded


def read_all(app: Orders, page: int, decode: bool) -> tuple[int, int]:
    """(events read, last position) reading the application sequence from its start."""
    select = app.recorder.select_notifications
    to_domain_event = app.mapper.to_domain_event
    last = 0
    count = 0
    while True:
        notifications = select(last, page, inclusive_of_start=False)
        if not notifications:
            return count, last
        if decode:
            for notification in notifications:
                to_domain_event(notification)
        count += len(notifications)
        last = notifications[-1].id


def run_phases(app: Orders, aggregates: int, events: int, page: int) -> dict[str, Any]:
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}
    gc.collect()
    started = time.perf_counter()
    save_per_command(app, aggregates, events)
    seconds["save_per_command"] = time.perf_counter() - started
    counts["save_per_command"] = aggregates * events

    gc.collect()
    started = time.perf_counter()
    ids = save_per_aggregate(app, aggregates, events)
    seconds["save_per_aggregate"] = time.perf_counter() - started
    counts["save_per_aggregate"] = aggregates * events

    gc.collect()
    started = time.perf_counter()
    counts["load"] = load(app, ids, events)
    seconds["load"] = time.perf_counter() - started

    last = 0
    for name, decode in (("read_all", False), ("read_all_decoded", True)):
        gc.collect()
        started = time.perf_counter()
        count, last = read_all(app, page, decode)
        seconds[name] = time.perf_counter() - started
        counts[name] = count
        if count != 2 * aggregates * events:
            raise SystemExit(f"{name} read {count} events, expected {2 * aggregates * events}")
    return {"seconds": seconds, "counts": counts, "last_position": last}


def main() -> None:
    config: dict[str, Any] = json.loads(sys.argv[1])
    events, page = config["events"], config["page"]
    warmup = config.get("warmup")
    if warmup:  # the same phases on a store of their own, unrecorded
        app = Orders(env=warmup["env"])
        try:
            run_phases(app, warmup["aggregates"], events, page)
        finally:
            app.close()
    app = Orders(env=config["env"])
    try:
        result = run_phases(app, config["aggregates"], events, page)
        result["recorder"] = type(app.recorder).__qualname__
        result["version"] = importlib.metadata.version("eventsourcing")
        print(json.dumps(result), flush=True)
    finally:
        app.close()


if __name__ == "__main__":
    main()
