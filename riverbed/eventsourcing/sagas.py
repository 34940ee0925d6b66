"""Process managers (sagas): react to events, keep state, issue commands, time out, compensate.

A process manager is a subscription: for each event it may read and write its own state,
run commands on aggregates and set or cancel timers, and all of it commits with its checkpoint
in one transaction of the store, commands' events included. So a crash neither loses a command
nor issues one twice. Timers live in the store too (``due_timers``) and fire ``on_timeout`` in the
same kind of transaction.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import msgspec

from riverbed.eventsourcing.aggregate import Aggregate
from riverbed.eventsourcing.errors import EventSourcingError
from riverbed.eventsourcing.repository import Envelope, causing
from riverbed.eventsourcing.stores.api import Document, Transaction
from riverbed.eventsourcing.subscriptions import Subscription

if TYPE_CHECKING:
    from riverbed.eventsourcing.repository import Events

A = TypeVar("A", bound=Aggregate)
_timer_decoder = msgspec.msgpack.Decoder(dict[str, Any])
TIMER_WAIT_S = 0.2


class ProcessManager:
    """Subclass with a ``name``, ``handle(event, saga)`` and, if it sets timers,
    ``on_timeout(key, data, saga)``; register with ``app.events.process_manager(...)``."""

    name: ClassVar[str]
    on_error: ClassVar[Literal["park", "stop"]] = "park"

    def handle(self, event: Envelope, saga: Saga) -> None:
        raise NotImplementedError

    def on_timeout(self, key: str, data: dict[str, Any], saga: Saga) -> None:
        raise NotImplementedError(f"{type(self).__name__} set a timer but has no on_timeout")


class Saga:
    """What a process manager may do while handling one event or timer, in its transaction."""

    def __init__(self, events: Events, tx: Transaction, name: str) -> None:
        self.events = events
        self.tx = tx
        self._collection = f"saga:{name}"

    def state(self, key: str) -> Document | None:
        return self.tx.get(self._collection, key)

    def save_state(self, key: str, state: Document) -> None:
        self.tx.put(self._collection, key, state)

    def end(self, key: str) -> None:
        """Forget the state of a finished process."""
        self.tx.delete(self._collection, key)

    def command(self, cls: type[A], aggregate_id: str, decide: Callable[[A], None]) -> A:
        """Load an aggregate, let ``decide`` call its command methods, and append the events in
        this transaction."""
        aggregate = self.events.load(cls, aggregate_id, None, self.tx.read_stream)
        decide(aggregate)
        self.save(aggregate)
        return aggregate

    def save(self, *aggregates: Aggregate) -> int:
        """Append new or changed aggregates' events in this transaction."""
        appends = self.events.appends(aggregates, None)
        position = self.tx.append(appends) if appends else 0
        for aggregate in aggregates:
            aggregate.pending.clear()
        return position

    def set_timer(self, key: str, seconds: float, data: dict[str, Any] | None = None) -> None:
        due = time.time_ns() // 1_000_000 + int(seconds * 1000)
        self.tx.set_timer(key, due, msgspec.msgpack.encode(data or {}))

    def cancel_timer(self, key: str) -> None:
        self.tx.cancel_timer(key)


class SagaRunner(Subscription):
    def __init__(self, events: Events, manager: ProcessManager) -> None:
        if not getattr(manager, "name", ""):
            raise EventSourcingError(f"{type(manager).__name__} needs a name = '...'")
        super().__init__(events, f"saga:{manager.name}", manager.name)
        self.manager = manager
        self.on_error = manager.on_error

    def handle(self, event: Envelope, tx: Transaction) -> None:
        self.manager.handle(event, Saga(self.events, tx, self.manager.name))

    def before_page(self, tx: Transaction) -> None:
        for timer in tx.due_timers(time.time_ns() // 1_000_000):
            tx.cancel_timer(timer.key)
            with causing(f"timer:{self.manager.name}:{timer.key}:{uuid.uuid4()}"):
                self.manager.on_timeout(
                    timer.key,
                    _timer_decoder.decode(timer.data),
                    Saga(self.events, tx, self.manager.name),
                )

    def idle_wait(self, default: float) -> float:
        # Timers fall due without an append to wake the runner.
        return min(default, TIMER_WAIT_S)
