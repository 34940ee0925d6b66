"""``app.events``: the repository plus what runs beside it — projections, process managers and
outbox relays — registered on the app and run by ``app.events.run``."""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Mapping
from typing import NamedTuple, TypeVar

from riverbed.errors import RiverbedError
from riverbed.eventsourcing.aggregate import check_name
from riverbed.eventsourcing.claims import claim, take_over
from riverbed.eventsourcing.errors import EventSourcingError, RunnerFailedError
from riverbed.eventsourcing.outages import Outage
from riverbed.eventsourcing.outbox import (
    LEASE_TTL_S,
    RELAY_PREFIX,
    Relay,
    check_lease_ttl,
    relay_name,
)
from riverbed.eventsourcing.projections import Projection, Projections
from riverbed.eventsourcing.records import ParkedEvent
from riverbed.eventsourcing.repository import Events
from riverbed.eventsourcing.sagas import ProcessManager, SagaRunner, manager_name
from riverbed.eventsourcing.subscriptions import SubscriberStatus, Subscription
from riverbed.log.api import DEFAULT_MAX_RECORD_BYTES, Log, TopicInfo, validate_topic
from riverbed.log.errors import BrokerUnavailableError

log = logging.getLogger("riverbed.eventsourcing")

P = TypeVar("P", bound=Projection)


class RelaySettings(NamedTuple):
    partitions: int
    lease_ttl: float
    max_record_bytes: int


M = TypeVar("M", bound=ProcessManager)


class EventSourcing(Events):
    def __init__(self, app_name: str, url: str | None = None) -> None:
        super().__init__(app_name, url)
        self.projections = Projections(self)
        self.process_managers: dict[str, ProcessManager] = {}
        self.relays: dict[str, RelaySettings] = {}
        self.failures: list[RunnerFailedError] = []

    def projection(self, projection: P) -> P:
        """Register a projection (``app.events.projection(OrderTotals())``)."""
        _check_subscriber(projection)
        self._name_free(getattr(projection, "name", ""), self.process_managers, "process manager")
        self.projections.add(projection)
        return projection

    def process_manager(self, manager: M) -> M:
        """Register a process manager (``app.events.process_manager(Fulfilment())``)."""
        _check_subscriber(manager)
        name = manager_name(manager)
        self._name_free(name, self.projections.registered, "projection")
        if name in self.process_managers:
            raise EventSourcingError(f"a process manager named {name!r} is already registered")
        self.process_managers[name] = manager
        return manager

    @staticmethod
    def _name_free(name: str, others: Mapping[str, object], what: str) -> None:
        # Their parked events would mix: a projection also reads those filed under its bare
        # name (as they were before per-version filing), which is how a manager files them.
        if name in others:
            raise EventSourcingError(
                f"a {what} named {name!r} is already registered: give projections and process "
                "managers different names"
            )

    def relay(
        self,
        topic: str,
        partitions: int = 4,
        *,
        lease_ttl: float = LEASE_TTL_S,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    ) -> None:
        """Publish every stored event to log topic ``topic`` (keyed by stream id; created with
        ``partitions`` and ``max_record_bytes`` if missing): every process running the app runs
        the relay, and one of them at a time publishes (see ``Relay``; a standby takes over
        ``lease_ttl`` seconds after the leader dies)."""
        # Here, not when the workers start.
        check_lease_ttl(lease_ttl)
        for setting, value in (("partitions", partitions), ("max_record_bytes", max_record_bytes)):
            if type(value) is not int or value < 1:
                raise ValueError(f"relay {topic!r}: {setting} is an int >= 1, got {value!r}")
        if isinstance(topic, str) and topic.startswith("__"):
            raise ValueError(f"relay {topic!r}: topics named __... are Kafka's own")
        validate_topic(TopicInfo(topic, partitions, max_record_bytes=max_record_bytes))
        self.relays[topic] = RelaySettings(partitions, lease_ttl, max_record_bytes)

    def subscriber(self, name: str) -> Subscription:
        """The runner of projection or process manager ``name`` (its active version, for a
        projection); an error naming the registered ones if there is neither."""
        if name in self.projections.registered:
            return self.projections.runner(name)
        manager = self.process_managers.get(name)
        if manager is None:
            known = sorted([*self.projections.registered, *self.process_managers]) or ["none"]
            raise EventSourcingError(
                f"no projection or process manager named {name!r}; registered: {', '.join(known)}"
            )
        return SagaRunner(self, manager)

    def status(self, name: str) -> SubscriberStatus:
        """Where projection or process manager ``name`` stands: its checkpoint, the store's
        head, the lag between them, how many events it parked, where it stopped."""
        return self.subscriber(name).status()

    def statuses(self) -> list[SubscriberStatus]:
        """Where each projection, process manager and relay stands (a relay, named
        ``relay:<topic>``, parks nothing)."""
        statuses = [self.status(name) for name in [*self.projections.registered,
                                                    *self.process_managers]]  # fmt: skip
        for topic in self.relays:
            name = relay_name(topic)
            checkpoint = self.store.checkpoint(name)
            head = self.store.last_position()
            statuses.append(SubscriberStatus(name, None, checkpoint, head, head - checkpoint, 0))
        return statuses

    def parked(self, name: str) -> list[ParkedEvent]:
        """What projection or process manager ``name`` parked (a manager's timers too, at
        negative positions), with the errors, in position order."""
        return self.subscriber(name).parked()

    def retry_parked(self, name: str, position: int) -> ParkedEvent | None:
        """Handle the event that projection or process manager ``name`` parked at ``position``
        again, now (after the events that followed it), and forget it once handled; if it fails
        again it stays parked with the new error, which is returned. ``NotParkedError`` if
        nothing is parked there (any more: another retry handled it, or it was unparked)."""
        return self.subscriber(name).claimed().retry(position)

    def unpark(self, name: str, position: int) -> bool:
        """Forget what projection or process manager ``name`` parked at ``position``: it goes
        on without it (a parked timer never fires). False if nothing is parked there."""
        return self.subscriber(name).claimed().unpark(position)

    def has_work(self) -> bool:
        """Whether projections, process managers or relays are registered."""
        return bool(self.projections.registered or self.process_managers or self.relays)

    def run(
        self, stop: threading.Event, log: Log | Callable[[], Log] | None = None
    ) -> list[threading.Thread]:
        """Run the projections, process managers and (given the ``log``, or a function that
        connects to it) relays, each in a thread of its own, until ``stop`` is set; returns the
        threads. They wait out outages of the store and the log, at the start too; one that
        fails otherwise sets ``stop``, so the others end too, and its error is in ``failures``
        (``App.run`` raises it)."""
        if self.relays and log is None:
            raise ValueError("relays publish to a log: pass log= (app.log)")
        self.failures.clear()
        outage = Outage(f"app {self.app_name!r}")
        while not stop.is_set():
            try:
                subscribers = self.claim_runners()
                break
            except BrokerUnavailableError as error:  # the store, out as the workers start
                outage.wait(error, stop)
        else:
            return []
        whats = [subscriber.claim_name for subscriber in subscribers]
        runs: list[Callable[[threading.Event], None]] = [s.run for s in subscribers]
        for topic, settings in self.relays.items():
            assert log is not None
            relay = Relay(self, log, topic, settings.partitions, lease_ttl=settings.lease_ttl,
                          max_record_bytes=settings.max_record_bytes)  # fmt: skip
            whats.append(_relay_claim(topic))
            runs.append(_closing(relay))
        return [self._start(what, run, stop) for what, run in zip(whats, runs, strict=True)]

    def claim_runners(self) -> list[Subscription]:
        """Claim for this app what ``run`` runs (``claims.py``): a name another app runs in
        the store is refused. The projections' and process managers' runners."""
        subscribers: list[Subscription] = [
            *map(self.projections.runner, self.projections.registered),
            *(SagaRunner(self, manager) for manager in self.process_managers.values()),
        ]
        whats = [subscriber.claim_name for subscriber in subscribers]
        claim(self.store, self.app_name, whats + [_relay_claim(topic) for topic in self.relays])
        return subscribers

    def take_over_names(self, renamed_from: str) -> int:
        """After the app was renamed from ``renamed_from``: the projections, process managers,
        relays and inboxes that app ran in the store are this one's; how many."""
        return take_over(self.store, self.app_name, renamed_from)

    def _start(
        self, what: str, run: Callable[[threading.Event], None], stop: threading.Event
    ) -> threading.Thread:
        def guarded() -> None:
            try:
                run(stop)
            except BaseException as error:  # a handler's SystemExit too: never a silent stop
                if isinstance(error, RiverbedError):  # says what is wrong: App.run raises it
                    log.info("the %s failed; stopping the others: %s", what, error)
                else:
                    log.exception("the %s failed; stopping the others", what)
                failure = RunnerFailedError(f"the {what} failed: {error!r}")
                failure.__cause__ = error
                self.failures.append(failure)
                stop.set()

        name = "riverbed-" + what.replace(" ", "-")
        thread = threading.Thread(target=guarded, daemon=True, name=name)
        thread.start()
        return thread


def _closing(relay: Relay) -> Callable[[threading.Event], None]:
    """``relay.run``, then ``relay.close``: each run makes its relays, and their producers."""

    def run(stop: threading.Event) -> None:
        try:
            relay.run(stop)
        finally:
            relay.close()

    return run


def _check_subscriber(subscriber: object) -> None:
    """A projection or process manager riverbed can run: a name its checkpoint, claim and
    collections can take, ``on_error`` of "park" or "stop", and plain methods."""
    what = type(subscriber).__name__
    name = getattr(subscriber, "name", "")
    if name:
        check_name(name, f"{what}.name")
        if name.startswith(RELAY_PREFIX):  # a relay's: statuses and metrics would show two
            raise ValueError(f"{what}.name {name!r}: names starting {RELAY_PREFIX!r} are relays'")
    on_error = getattr(subscriber, "on_error", "park")
    if on_error not in ("park", "stop"):
        raise EventSourcingError(
            f"{what}.on_error = {on_error!r}: use 'park' (the default) or 'stop'"
        )
    for method in ("handle", "on_timeout"):
        function = getattr(subscriber, method, None)
        if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
            # Its coroutine would never run: the event or timer would count as handled.
            raise EventSourcingError(
                f"{what}.{method} is async: riverbed runs it in the store's transaction, which "
                "commits with the checkpoint when it returns; make it a plain method"
            )


def _relay_claim(topic: str) -> str:
    return f"relay to {topic}"
