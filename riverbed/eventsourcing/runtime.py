"""``app.events``: the repository plus what runs beside it — projections, process managers and
outbox relays — registered on the app and run by ``app.events.run``."""

from __future__ import annotations

import threading
from typing import NamedTuple, TypeVar

from riverbed.eventsourcing.outbox import LEASE_TTL_S, Relay, check_lease_ttl
from riverbed.eventsourcing.projections import Projection, Projections
from riverbed.eventsourcing.repository import Events
from riverbed.eventsourcing.sagas import ProcessManager, SagaRunner
from riverbed.log.api import Log

P = TypeVar("P", bound=Projection)


class RelaySettings(NamedTuple):
    partitions: int
    lease_ttl: float


M = TypeVar("M", bound=ProcessManager)


class EventSourcing(Events):
    def __init__(self, app_name: str, url: str | None = None) -> None:
        super().__init__(app_name, url)
        self.projections = Projections(self)
        self.process_managers: dict[str, ProcessManager] = {}
        self.relays: dict[str, RelaySettings] = {}

    def projection(self, projection: P) -> P:
        """Register a projection (``app.events.projection(OrderTotals())``)."""
        self.projections.add(projection)
        return projection

    def process_manager(self, manager: M) -> M:
        self.process_managers[manager.name] = manager
        return manager

    def relay(self, topic: str, partitions: int = 4, *, lease_ttl: float = LEASE_TTL_S) -> None:
        """Publish every stored event to log topic ``topic`` (keyed by stream id): every process
        running the app runs the relay, and one of them at a time publishes (see ``Relay``; a
        standby takes over ``lease_ttl`` seconds after the leader dies)."""
        check_lease_ttl(lease_ttl)  # here, not when the workers start
        self.relays[topic] = RelaySettings(partitions, lease_ttl)

    def has_work(self) -> bool:
        """Whether projections, process managers or relays are registered."""
        return bool(self.projections.registered or self.process_managers or self.relays)

    def run(self, stop: threading.Event, log: Log | None = None) -> list[threading.Thread]:
        """Run the projections, process managers and (given the ``log``) relays, each in a thread
        of its own, until ``stop`` is set; returns the threads."""
        threads = self.projections.run(stop)
        for manager in self.process_managers.values():
            runner = SagaRunner(self, manager)
            threads.append(_start(runner.run, stop, f"riverbed-saga-{manager.name}"))
        if self.relays and log is None:
            raise ValueError("relays publish to a log: pass log= (app.log)")
        for topic, settings in self.relays.items():
            assert log is not None
            relay = Relay(self, log, topic, settings.partitions, lease_ttl=settings.lease_ttl)
            threads.append(_start(relay.run, stop, f"riverbed-relay-{topic}"))
        return threads


def _start(target: object, stop: threading.Event, name: str) -> threading.Thread:
    thread = threading.Thread(target=target, args=(stop,), daemon=True, name=name)  # type: ignore[arg-type]
    thread.start()
    return thread
