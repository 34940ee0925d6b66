"""Process managers (sagas): react to events, keep state, issue commands, time out, compensate.

A process manager is a subscription: for each event it may read and write its own state,
run commands on aggregates and set or cancel timers, and all of it commits with its checkpoint
in one transaction of the store, commands' events included. So a crash neither loses a command
nor issues one twice. Timers live in the store too (``due_timers``) and fire ``on_timeout``, each
in a transaction of its own, which deletes the timer. ``on_timeout`` runs in the process's
correlation: that of the event being handled when the timer was set, caused by the timer.

A failing event is parked like a projection's (``on_error``). A failing ``on_timeout`` rolls back
and its timer is parked too, not tried again: ``app.events.parked(name)`` lists it beside the
events, with ``type`` "timer", ``event_id`` "timer:<key>", the error with its traceback, and a
negative ``position`` derived from the key (a key parked again replaces its entry). The timer
itself is kept with its data, never due, until ``app.events.retry_parked(name, position)`` fires
it again, ``app.events.unpark(name, position)`` forgets it with its entry, or the manager sets or
cancels that key. The manager goes on with its other events and timers; with ``on_error =
"stop"`` it stops there instead, and the timer fires again when it restarts. An ``on_timeout``
whose command raced another writer (``ConcurrencyError``) fires again at once; the same conflict
ten times in a row is on_timeout's doing, and fails like an error.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
import traceback
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import msgspec

from riverbed.eventsourcing.aggregate import MAX_ID_BYTES, Aggregate, check_key
from riverbed.eventsourcing.errors import (
    ConcurrencyError,
    EventSourcingError,
)
from riverbed.eventsourcing.records import ParkedEvent, StoredEvent, Timer
from riverbed.eventsourcing.repository import Envelope, causing
from riverbed.eventsourcing.snapshots import same_when_loaded
from riverbed.eventsourcing.stores.api import Document, Transaction
from riverbed.eventsourcing.subscriptions import (
    PAGE,
    STOPPED,
    HandlerError,
    Subscription,
    described,
    returned,
)
from riverbed.log.errors import BrokerUnavailableError

if TYPE_CHECKING:
    from riverbed.eventsourcing.repository import Events

A = TypeVar("A", bound=Aggregate)
log = logging.getLogger("riverbed.sagas")
TIMER_WAIT_S = 0.2
# Every timer due by a time, to find one among them (a store lists them in due order).
MAX_TIMERS = 2**31 - 1
# A parked timer's due time: never, until retried.
PARKED_DUE_MS = 2**62
MAX_TIMER_S = 100 * 365 * 24 * 3600
TIMERS_PER_ROUND = 100  # then a page of events, so timers set due at once cannot starve them


class ProcessManager:
    """Subclass with a ``name``, ``handle(event, saga)`` and, if it sets timers,
    ``on_timeout(key, data, saga)``; register with ``app.events.process_manager(...)``."""

    name: ClassVar[str]
    on_error: ClassVar[Literal["park", "stop"]] = "park"

    def handle(self, event: Envelope, saga: Saga) -> None:
        raise NotImplementedError

    def on_timeout(self, key: str, data: dict[str, Any], saga: Saga) -> None:
        # Reached only by a timer set before the manager lost its on_timeout: parked.
        raise NotImplementedError(f"{type(self).__name__} set a timer but has no on_timeout")


def manager_name(manager: ProcessManager) -> str:
    name = getattr(manager, "name", "")
    if not name:
        raise EventSourcingError(f"{type(manager).__name__} needs a name = '...'")
    return name


class _StoredTimer(msgspec.Struct, frozen=True, array_like=True):
    """A timer's data, with the correlation id in force when it was set."""

    data: dict[str, Any]
    correlation_id: str


# A bare dict: a timer set before timers kept their correlation id.
_timer_decoder = msgspec.msgpack.Decoder(_StoredTimer | dict[str, Any])


class Saga:
    """What a process manager may do while handling one event or timer, in its transaction;
    ``correlation_id``: the process's (the event's, or the one the timer kept)."""

    def __init__(
        self,
        events: Events,
        tx: Transaction,
        manager: ProcessManager,
        correlation_id: str,
        now_ms: int,
        timer_set: Callable[[int], None] | None = None,
    ) -> None:
        """``now_ms``: when what is handled happened (the event's time, the timer's due
        time): timers are set from then, however late the manager runs. ``timer_set``: told
        each timer's due time."""
        self.events = events
        self.tx = tx
        self.manager = manager
        self.correlation_id = correlation_id
        self.now_ms = now_ms
        self._timer_set = timer_set
        self._collection = f"saga:{manager.name}"

    def state(self, key: str) -> Document | None:
        check_key(key, "a state key", "Saga.state")
        return self.tx.get(self._collection, key)

    def save_state(self, key: str, state: Document) -> None:
        check_key(key, "a state key", "Saga.save_state")
        self.tx.put(self._collection, key, state)

    def end(self, key: str) -> None:
        """Forget the state of a finished process."""
        check_key(key, "a state key", "Saga.end")
        self.tx.delete(self._collection, key)

    def command(self, cls: type[A], aggregate_id: str, decide: Callable[[A], None]) -> A:
        """Load an aggregate, let ``decide`` call its command methods, and append the events in
        this transaction."""
        aggregate = self.events.load(cls, aggregate_id, None, self.tx.read_stream)
        decide(aggregate)
        self.save(aggregate)
        return aggregate

    def save(self, *aggregates: Aggregate) -> int:
        """Append new or changed aggregates' events in this transaction, stamped with the time
        of what is handled (``now_ms``): a manager that runs late then meets them among the
        events and timers as a live one would have."""
        appends = self.events.appends(aggregates, None, timestamp_ms=self.now_ms)
        position = self.tx.append(appends) if appends else 0
        for aggregate in aggregates:
            aggregate.pending.clear()
        return position

    def set_timer(self, key: str, seconds: float, data: dict[str, Any] | None = None) -> None:
        """Call ``on_timeout(key, data, saga)`` in ``seconds`` (setting ``key`` again moves it)."""
        manager = type(self.manager)
        if manager.on_timeout is ProcessManager.on_timeout:
            # Refused now, parking the event that set it, rather than failing when it is due.
            raise EventSourcingError(
                f"{manager.__name__} sets timer {key!r} but has no on_timeout: define "
                "on_timeout(self, key, data, saga) to handle it"
            )
        check_key(key, "a timer key", "Saga.set_timer")
        if data is not None and (
            not isinstance(data, dict) or not all(isinstance(k, str) for k in data)
        ):
            raise TypeError(f"timer {key!r}: its data is a dict with str keys, got {data!r}")
        if not isinstance(seconds, int | float) or not abs(seconds) <= MAX_TIMER_S:
            raise ValueError(
                f"timer {key!r}: seconds is a number of at most {MAX_TIMER_S:,} (a century), "
                f"got {seconds!r}"
            )
        due = self.now_ms + int(seconds * 1000)
        try:
            encoded = msgspec.msgpack.encode(_StoredTimer(data or {}, self.correlation_id))
        except (OverflowError, TypeError, ValueError) as error:  # an int past 64 bits, say
            raise TypeError(f"timer {key!r}: its data does not encode: {error}") from None
        # What on_timeout will get: refused now unless it is the data as set.
        stored = _timer_decoder.decode(encoded)
        if data and not same_when_loaded(stored.data if isinstance(stored, _StoredTimer) else {},
                                         data):  # fmt: skip
            raise TypeError(
                f"timer {key!r}: its data would come back changed ({stored.data!r}, not "
                f"{data!r}): give it values msgpack keeps as they are (str, int, float, bool, "
                "None, lists and dicts of them)"
            )
        self.tx.set_timer(key, due, encoded)
        if self._timer_set is not None:
            self._timer_set(due)

    def cancel_timer(self, key: str) -> None:
        check_key(key, "a timer key", "Saga.cancel_timer")
        self.tx.cancel_timer(key)


def timer_cause(manager: str, key: str) -> str:
    """The cause id of what a timer's ``on_timeout`` saves: naming the manager and the key,
    unless that would pass a cause id's 1,000 bytes (a digest of the key instead)."""
    cause = f"timer:{manager}:{key}:{uuid.uuid4()}"
    if len(cause.encode()) <= MAX_ID_BYTES:
        return cause
    digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
    return f"timer:{manager}:{digest}:{uuid.uuid4()}"


def timer_position(key: str) -> int:
    """Where a failed timer is parked: negative, never an event's position, one per key."""
    digest = hashlib.blake2b(key.encode(), digest_size=7).digest()
    return -1 - int.from_bytes(digest, "big")


class SagaRunner(Subscription):
    kind = "process manager"

    def __init__(self, events: Events, manager: ProcessManager) -> None:
        name = manager_name(manager)
        super().__init__(events, f"saga:{name}", name)
        self.manager = manager
        self.on_error = manager.on_error
        self._earliest_set: int | None = None

    def handle(self, event: Envelope, tx: Transaction) -> None:
        # Timers count from the event's time; a parked event handled again counts from now.
        now_ms = time.time_ns() // 1_000_000 if self.retrying_parked else event.timestamp_ms
        saga = Saga(self.events, tx, self.manager, event.correlation_id, now_ms, self._timer_set)
        handler: Callable[..., object] = self.manager.handle  # maybe async, behind a decorator
        returned(handler(event, saga), handler)

    def _timer_set(self, due_ms: int) -> None:
        if self._earliest_set is None or due_ms < self._earliest_set:
            self._earliest_set = due_ms

    def stops_before(self, stored: StoredEvent) -> bool:
        # A timer an event of this page set, due before this one was stored, fires first.
        return self._earliest_set is not None and stored.timestamp_ms >= self._earliest_set

    def run_once(self, limit: int = PAGE) -> int:
        """Fire the due timers, then handle the next page of events; how many of both."""
        fired = self._fire_due_timers()
        return fired + super().run_once(limit)

    def page(self, tx: Transaction, limit: int) -> list[StoredEvent]:
        """The next events, up to the first one stored once a timer had fallen due: the
        timer fires first."""
        self._earliest_set = None  # of the timers this page sets
        page = super().page(tx, limit)
        due = tx.due_timers(time.time_ns() // 1_000_000, limit=1)
        if not due or not page:
            return page
        return list(itertools.takewhile(lambda e: e.timestamp_ms < due[0].due_ms, page))

    def _fire_due_timers(self) -> int:
        """Fire up to TIMERS_PER_ROUND due timers, each in a transaction of its own; how
        many."""
        return self.repeat(self._fire_next, TIMERS_PER_ROUND)

    def _fire_next(self) -> bool:
        """Fire the next due timer; False if none is due. A failing one is parked in the same
        transaction (kept, never due, with its data, for a retry), which holds the manager's
        lock: no other runner of it fires the timer meanwhile."""
        stopping = None
        with self.store.transaction(self.name) as tx:
            due = tx.due_timers(self._due_by(tx), limit=1)
            if not due:
                return False
            timer = due[0]
            tx.cancel_timer(timer.key)  # firing a timer is deleting it
            reason = self.failure_of(tx, lambda: self._fire(timer, tx))
            if reason is None:
                # Fired where a runner stopped on it (another process's, say): that stop is over.
                stopped = tx.get(STOPPED, self.name)
                if stopped is not None and stopped["position"] == timer_position(timer.key):
                    tx.delete(STOPPED, self.name)
            else:
                parked = ParkedEvent(self.label, timer_position(timer.key), f"timer:{timer.key}",
                                     "timer", reason, time.time_ns() // 1_000_000)  # fmt: skip
                stopping = self.settle(parked, tx)
                # Stopped, it is due again when the manager restarts; parked, it is kept
                # never due, for a retry.
                tx.set_timer(timer.key, PARKED_DUE_MS if stopping is None else timer.due_ms,
                             timer.data)  # fmt: skip
        if stopping is not None:
            self.stopped_on = stopping
        return True

    def _due_by(self, tx: Transaction) -> int:
        """Timers fall due by now, but fire after the events stored before they fell due: a
        payment that succeeded in time beats its timeout, however late the manager is."""
        now_ms = time.time_ns() // 1_000_000
        following = self.store.read_all(tx.checkpoint, 1)
        return min(now_ms, following[0].timestamp_ms) if following else now_ms

    def _fire(self, timer: Timer, tx: Transaction) -> None:
        """Run ``on_timeout``; ``_TimerError`` if it fails, except on a race
        (``ConcurrencyError``, unless ``conflicts_fail``) or an outage, after which the timer
        fires again."""
        cause = timer_cause(self.manager.name, timer.key)
        try:
            stored = _timer_decoder.decode(timer.data)
            if isinstance(stored, dict):
                stored = _StoredTimer(stored, cause)  # kept no correlation: starts its own
            with causing(cause, stored.correlation_id):
                now_ms = min(timer.due_ms, time.time_ns() // 1_000_000)  # a retried one: now
                saga = Saga(self.events, tx, self.manager, stored.correlation_id, now_ms)
                on_timeout: Callable[..., object] = self.manager.on_timeout
                returned(on_timeout(timer.key, stored.data, saga), on_timeout)
        except ConcurrencyError:
            if not self.conflicts_fail:
                raise
            reason = f"ConcurrencyError on every retry: {traceback.format_exc()}"
            raise _TimerError(timer, reason) from None
        except BrokerUnavailableError:
            raise
        except Exception as error:
            reason = f"on_timeout({timer.key!r}) raised {described(error)}"
            raise _TimerError(timer, f"{reason}\n{traceback.format_exc()}") from error

    def retry(self, position: int) -> ParkedEvent | None:
        """Handle a parked event again (``Subscription.retry``), or fire a parked timer (at a
        negative position) again."""
        parked = self._parked_at(position)
        if parked.type != "timer":
            return super().retry(position)
        key = parked.event_id.removeprefix("timer:")

        def fire(tx: Transaction) -> None:
            timer = _kept_timer(tx, key)
            if timer is None:
                raise EventSourcingError(
                    f"timer {key!r} of {self.described()} was set again or cancelled since it "
                    "was parked, or parked before riverbed kept parked timers: there is nothing "
                    "to fire; unpark it"
                )
            tx.cancel_timer(key)
            self._fire(timer, tx)

        return self._retry_parked(parked, fire)

    def unpark(self, position: int) -> bool:
        """Forget a parked event, or a parked timer (which then never fires: its data goes
        too, unless the manager set that key again since)."""
        parked = next((p for p in self.parked() if p.position == position), None)
        if parked is None or parked.type != "timer":
            return super().unpark(position)
        with self.store.transaction(self.name) as tx:
            if not tx.unpark(parked.projection, position):
                return False  # retried or unparked meanwhile
            key = parked.event_id.removeprefix("timer:")
            if _kept_timer(tx, key) is not None:
                tx.cancel_timer(key)
        return True

    def idle_wait(self, default: float) -> float:
        # Timers fall due without an append to wake the runner.
        return min(default, TIMER_WAIT_S)


def _kept_timer(tx: Transaction, key: str) -> Timer | None:
    """The timer parked under ``key``, kept never due, if the manager has not set or cancelled
    that key since."""
    kept = tx.due_timers(PARKED_DUE_MS, limit=MAX_TIMERS)
    return next((t for t in kept if t.key == key and t.due_ms == PARKED_DUE_MS), None)


class _TimerError(HandlerError):
    def __init__(self, timer: Timer, reason: str) -> None:
        super().__init__(reason)
        self.timer = timer
