"""Subscriptions: handlers that follow the store's global order, exactly once.

A subscription handles events in position order inside a transaction of the store's own database
that also moves its checkpoint, so each event's effects (read-model writes, appended commands,
timers) commit with the checkpoint that says it was handled: a crash replays nothing twice and
skips nothing. It catches up in pages, then follows live appends (LISTEN/NOTIFY on PostgreSQL,
``data_version`` on SQLite).

A page is handled in one transaction; if an event fails, the page is rolled back and handled
again one event per transaction, so the failing event alone is parked with its error (or the
subscription stops, with ``on_error = "stop"``) and the rest go on. A ``ConcurrencyError`` (a
command raced another writer) is not a failure: the page is rolled back and tried again.

Each transaction first asks whether the subscriber was ``replaced`` (a projection version a
rebuild switched away from): if so it writes nothing and the work goes on under the successor.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, Self, TypeVar

import msgspec

from riverbed.eventsourcing.claims import claim, renamed_to
from riverbed.eventsourcing.errors import (
    ConcurrencyError,
    EventSourcingError,
    HandlerAbortedTransactionError,
    NotParkedError,
    UnknownEventTypeError,
    refuse_awaitable,
)
from riverbed.eventsourcing.outages import Outage
from riverbed.eventsourcing.records import ParkedEvent, StoredEvent, metadata_of
from riverbed.eventsourcing.repository import APP_KEY, Envelope, causing, envelope
from riverbed.eventsourcing.stores.api import EventStore, Transaction
from riverbed.log.errors import BrokerUnavailableError

if TYPE_CHECKING:
    from riverbed.eventsourcing.repository import Events

log = logging.getLogger("riverbed.subscriptions")
T = TypeVar("T")

PAGE = 1000
# A page also ends after this long: its transaction holds SQLite's one write lock (PostgreSQL's
# append lock once a handler appended), which every other writer waits for.
PAGE_S = 0.2
# The documents saying where subscribers with on_error = "stop" stopped, by subscriber name.
STOPPED = "riverbed.stopped"
RETRY_S = 0.05
CONFLICT_RETRIES = 10
PAGE_ATTEMPTS = 3  # then one event at a time


def returned(result: object, handler: Callable[..., object]) -> None:
    """``TypeError`` if ``handler`` returned an awaitable: an ``async def`` behind a decorator
    (registration refuses a bare one), whose work would never run while its event or timer
    counted as handled."""
    refuse_awaitable(
        result,
        f"{getattr(handler, '__qualname__', handler)} returned {type(result).__name__}: it is "
        "async (behind a decorator?), and riverbed runs it in the store's transaction, which "
        "commits with the checkpoint when it returns; make it a plain method",
    )


class SubscriberStatus(msgspec.Struct, frozen=True):
    """Where a projection or process manager stands (``status``)."""

    name: str
    version: int | None  # a projection's active one; None for a process manager
    checkpoint: int  # the position it handled last
    head: int  # the store's last position
    lag: int  # events stored that it has not handled yet
    parked: int
    # With on_error = "stop": the event it stopped at (a negative position: a process manager's
    # timer), until a restarted runner handles it.
    stopped_at: int | None = None
    stopped_error: str | None = None

    def stopped_where(self) -> str:
        """Where it stopped, for people: "position 1,234" or "a timer"."""
        if self.stopped_at is None:
            return "nowhere"
        return f"position {self.stopped_at:,}" if self.stopped_at > 0 else "a timer"


class Subscription:
    """The loop; subclasses say what handling an event means (``handle``)."""

    kind: str  # "projection", "process manager": in messages and its claim
    on_error: Literal["park", "stop"] = "park"
    version: int | None = None

    def __init__(self, events: Events, name: str, label: str) -> None:
        """``name``: the checkpoint's; ``label``: what parked events are filed under."""
        self.events = events
        self.name = name
        self.label = label
        self.stopped_on: ParkedEvent | None = None
        # Set for the last attempt after races: a conflict then fails like an error.
        self.conflicts_fail = False
        self.retrying_parked = False  # while a parked event is handled again
        # How many events a page reads: fewer after one whose time ran out (large events were
        # read again and again by each next page), more again after one that did not.
        self._page_events = PAGE

    @property
    def store(self) -> EventStore:
        return self.events.store

    @property
    def checkpoint(self) -> int:
        return self.store.checkpoint(self.name)

    def handle(self, event: Envelope, tx: Transaction) -> None:
        raise NotImplementedError

    def _another_apps(self, stored: StoredEvent) -> bool:
        """Whether another app saved ``stored``: not this one, nor one renamed to it (events
        saved before they named their app are taken for this one's: an unknown type among
        them is a missing import)."""
        saved_by = metadata_of(stored).get(APP_KEY)
        app = self.events.app_name
        return saved_by not in (None, app) and renamed_to(self.store, str(saved_by)) != app

    def replaced(self, tx: Transaction) -> bool:
        """Whether a successor took this subscriber's place, asked first in each of its
        transactions (which then write nothing); a subscriber that says so has switched to the
        successor (a projection runner to the version a rebuild made active)."""
        return False

    def run_once(self, limit: int = PAGE) -> int:
        """Handle the next page of events; how many were handled (applied or parked)."""
        try:
            while self.stopped_on is None:
                with self.store.transaction(self.name) as tx:
                    if self.replaced(tx):
                        continue  # nothing written: read the page again as the successor
                    handled = 0
                    ends = time.monotonic() + PAGE_S
                    page = self.page(tx, min(limit, self._page_events))
                    for stored in page:
                        if self.stops_before(stored):
                            break
                        self._apply(stored, tx)
                        handled += 1
                        if time.monotonic() > ends:
                            break
                    if handled < len(page) and time.monotonic() > ends:
                        self._page_events = max(1, 2 * handled)
                    else:
                        self._page_events = min(PAGE, 2 * self._page_events)
                    return handled
            return 0
        except HandlerError:
            pass
        # Outside the except block, so that a parked event's traceback does not carry the page's.
        return self._one_by_one(limit)

    def page(self, tx: Transaction, limit: int) -> list[StoredEvent]:
        """The next events to handle, after the checkpoint."""
        return self.store.read_all(tx.checkpoint, limit)

    def stops_before(self, stored: StoredEvent) -> bool:
        """Whether the page ends before ``stored`` (what the events before it did comes
        first: a timer they set that falls due before it)."""
        return False

    def _one_by_one(self, limit: int) -> int:
        """Handle up to ``limit`` events, each in a transaction of its own and tried again
        after a race: a failing event alone is parked, or the subscriber stops there."""
        return self.repeat(self._handle_one, limit)

    def repeat(self, step: Callable[[], bool], limit: int) -> int:
        """``step`` (tried again after races) until it finds nothing to do, ``limit`` times,
        or the subscriber stops; how many times it did something."""
        done = 0
        while done < limit and self.stopped_on is None and self._retrying(step):
            done += 1
        return done

    @staticmethod
    def failure_of(tx: Transaction, work: Callable[[], None]) -> str | None:
        """Run ``work`` in a savepoint of ``tx``: the reason it failed (its writes rolled
        back, the transaction still usable), or None."""
        try:
            with tx.savepoint():
                work()
        except (HandlerError, HandlerAbortedTransactionError) as failed:
            return _reason(failed)
        return None

    def _handle_one(self) -> bool:
        """Handle the next event; False if there is none. A failing one is parked in the same
        transaction, which holds the subscriber's lock: no other runner of it handles the
        event meanwhile."""
        stopping = None
        with self.store.transaction(self.name) as tx:
            if self.replaced(tx):
                return True  # nothing written: the successor's turn
            page = self.page(tx, 1)
            if not page:
                return False
            (stored,) = page
            reason = self.failure_of(tx, lambda: self._apply(stored, tx))
            if reason is not None:
                parked = ParkedEvent(self.label, stored.position, stored.id, stored.type,
                                     reason, time.time_ns() // 1_000_000)  # fmt: skip
                stopping = self.settle(parked, tx)
                if stopping is None:
                    tx.set_checkpoint(stored.position)
        if stopping is not None:
            self.stopped_on = stopping
        return True

    def settle(self, parked: ParkedEvent, tx: Transaction) -> ParkedEvent | None:
        """After an entry failed, in the transaction its work rolled back in: park it, or, with
        ``on_error = "stop"``, say where the subscriber stops (for ``status``, until a restarted
        runner gets past it) and return that, to stop once committed."""
        error = parked.error.partition("\n")[0]
        if self.on_error == "stop":
            tx.put(STOPPED, self.name, msgspec.structs.asdict(parked))
            log.error("%s stopped at %s: %s", self.name, _where(parked), error)
            return parked
        tx.park(parked)
        log.warning("%s parked %s: %s", self.name, _where(parked), error)
        return None

    def _apply(self, stored: StoredEvent, tx: Transaction) -> None:
        self._handle(stored, tx)
        try:
            tx.set_checkpoint(stored.position)
        except BrokerUnavailableError:
            raise
        except HandlerAbortedTransactionError as error:  # the handler ended it (SQLite)
            raise HandlerError(described(error)) from error
        except Exception as error:
            # A handler that caught a failed statement of its own leaves a PostgreSQL
            # transaction aborted: the event failed all the same.
            reason = (
                f"{described(error)} (the handler left its transaction "
                "unusable: on PostgreSQL a failed statement aborts the transaction even when "
                "the handler catches its error)"
            )
            raise HandlerError(reason) from error

    def _handle(self, stored: StoredEvent, tx: Transaction) -> None:
        try:
            try:
                decoded = envelope(stored, self.store.stream_key)
            except UnknownEventTypeError:
                if self._another_apps(stored):
                    return  # in a store apps share: that app's subscribers handle it
                raise
            with causing(decoded.id, decoded.correlation_id):
                self.handle(decoded, tx)
        except ConcurrencyError:
            if not self.conflicts_fail:
                raise
            reason = f"ConcurrencyError on every retry: {traceback.format_exc()}"
            raise HandlerError(reason) from None
        except BrokerUnavailableError:  # the store (a handler's read) is down: waited out
            raise
        except Exception as error:
            reason = f"{described(error)}\n{traceback.format_exc()}"
            raise HandlerError(reason) from error

    def parked_labels(self) -> list[str]:
        """What this subscriber's parked events are filed under."""
        return [self.label]

    def parked(self) -> list[ParkedEvent]:
        """What this subscriber parked, with the errors, in position order."""
        found = [p for label in self.parked_labels() for p in self.store.parked(label)]
        return sorted(found, key=lambda p: p.position)

    def unpark(self, position: int) -> bool:
        """Forget the entry parked at ``position``: the subscriber goes on without it. False if
        nothing is parked there."""
        _check_position(position)
        if not -(2**63) <= position < 2**63:
            return False  # no store holds such a position
        with self.store.transaction(self.name) as tx:
            return any(tx.unpark(label, position) for label in self.parked_labels())

    def status(self) -> SubscriberStatus:
        """How far it got, how far behind the store it is, what it parked, where it stopped."""
        checkpoint = self.checkpoint
        head = self.store.last_position()  # read after the checkpoint: the lag is never negative
        stopped = self.store.get_document(STOPPED, self.name)
        if stopped is not None and 0 < stopped["position"] <= checkpoint:
            stopped = None  # a restarted runner applied the event it stopped at
        return SubscriberStatus(
            self.registered_name,
            self.version,
            checkpoint,
            head,
            head - checkpoint,
            sum(self.store.parked_count(label) for label in self.parked_labels()),
            None if stopped is None else stopped["position"],
            None if stopped is None else stopped["error"],
        )

    def described(self) -> str:
        """The subscriber, for error messages."""
        return f"{self.kind} {self.registered_name!r}"

    @property
    def registered_name(self) -> str:
        """The name it was registered under."""
        return self.label

    @property
    def claim_name(self) -> str:
        """What its app claims to run it (``claims.py``): "projection totals"."""
        return f"{self.kind} {self.registered_name}"

    def claimed(self) -> Self:
        """This subscriber, once its app claimed it: another app's is refused before its state
        is touched."""
        claim(self.store, self.events.app_name, [self.claim_name])
        return self

    def retry(self, position: int) -> ParkedEvent | None:
        """Handle the event parked at ``position`` again, now, after the events that followed
        it, in a transaction of its own that forgets it once handled (the checkpoint, already
        past it, stays). None once handled; if it fails again it stays parked, with the new
        error, which is returned. ``NotParkedError`` if nothing is parked there (any more)."""
        parked = self._parked_at(position)

        def handle(tx: Transaction) -> None:
            (stored,) = self.store.read_all(position - 1, 1)
            self.retrying_parked = True  # handled now, not as of its time
            try:
                self._handle(stored, tx)
            finally:
                self.retrying_parked = False

        return self._retry_parked(parked, handle)

    def _retry_parked(
        self, parked: ParkedEvent, handle: Callable[[Transaction], None]
    ) -> ParkedEvent | None:
        """``handle`` the parked entry again in a transaction that unparks it, or parks it
        again with the new error if it fails. Retries of one entry take turns on the
        subscriber's lock: the one that finds it no longer parked (handled by another, or
        unparked) raises ``NotParkedError``."""

        def attempt() -> ParkedEvent | None:
            with self.store.transaction(self.name) as tx:
                if self.replaced(tx):
                    raise EventSourcingError(
                        f"{self.described()} was rebuilt while retrying position "
                        f"{parked.position}: the switch forgot the old version's parked events"
                    )
                if not tx.unpark(parked.projection, parked.position):
                    raise NotParkedError(
                        f"{self.described()} has no event parked at position "
                        f"{parked.position} any more: another retry handled it, or it was "
                        "unparked, meanwhile"
                    )
                reason = self.failure_of(tx, lambda: handle(tx))
                if reason is not None:
                    again = msgspec.structs.replace(
                        parked, error=reason, parked_ms=time.time_ns() // 1_000_000
                    )
                    tx.park(again)
                    return again
            log.info("%s handled parked %s", self.name, parked.event_id)
            return None

        return self._retrying(attempt)

    def _retrying(self, attempt: Callable[[], T]) -> T:
        """``attempt()``, again after each race with another writer (``ConcurrencyError``).
        The same conflict every time is the handler's doing, not a race: on the last attempt it
        fails like any error."""
        for _ in range(CONFLICT_RETRIES - 1):
            try:
                return attempt()
            except ConcurrencyError as error:
                log.info("%s raced another writer, trying again: %s", self.name, error)
                time.sleep(RETRY_S)
        self.conflicts_fail = True
        try:
            return attempt()
        finally:
            self.conflicts_fail = False

    def _parked_at(self, position: int) -> ParkedEvent:
        _check_position(position)
        for label in self.parked_labels():
            for parked in self.store.parked(label):
                if parked.position == position:
                    return parked
        raise NotParkedError(f"{self.described()} has no event parked at position {position}")

    def catch_up(self, after_each: Callable[[], None] | None = None) -> int:
        """Handle every event stored so far; how many. ``after_each``: called after each page
        (a rebuild renews its lease there)."""
        total = 0
        while (handled := self._retrying_once()) > 0:
            total += handled
            if after_each is not None:
                after_each()
        return total

    def _retrying_once(self) -> int:
        """A page; after races with other writers, one event at a time, each tried again on
        its own: a conflict every time is then one event's, which is parked, instead of the
        page behind it handled again and again."""
        for _ in range(PAGE_ATTEMPTS):
            try:
                return self.run_once()
            except ConcurrencyError as error:
                log.info("%s raced another writer, trying again: %s", self.name, error)
                time.sleep(RETRY_S)
        return self._one_by_one(PAGE)

    def run(self, stop: threading.Event, idle_wait: float = 1.0) -> None:
        """Handle events until ``stop``, waiting out the store's outages, or until an event
        fails with ``on_error = "stop"``; one that can be replaced (a projection's version,
        by a rebuild's) then waits for its successor and goes on as it."""
        outage = Outage(self.name)
        self._restarted()
        while not stop.is_set():
            try:
                if self.stopped_on is not None:
                    if not self.can_be_replaced() or not self._succeeded(stop, idle_wait):
                        return
                elif self._retrying_once() == 0:
                    self.store.wait_for_events(self.checkpoint, self.idle_wait(idle_wait))
            except BrokerUnavailableError as error:
                outage.wait(error, stop)
            else:
                outage.over()

    def can_be_replaced(self) -> bool:
        """Whether a successor may take its place (``replaced``): stopped, it waits for one."""
        return False

    def _succeeded(self, stop: threading.Event, idle_wait: float) -> bool:
        """Whether, stopped, it was replaced (and goes on as its successor); False once
        ``stop`` is set."""
        while not stop.is_set():
            with self.store.transaction(self.name) as tx:
                if self.replaced(tx):
                    self.stopped_on = None
                    return True
            stop.wait(idle_wait)
        return False

    def idle_wait(self, default: float) -> float:
        return default

    def _restarted(self) -> None:
        """Forget where an earlier run stopped (``on_error = "stop"``): this one tries that event
        again, and read-your-writes waits for it meanwhile; it says so again if it stops there."""
        try:
            with self.store.transaction(self.name) as tx:
                if tx.get(STOPPED, self.name) is not None:
                    tx.delete(STOPPED, self.name)
        except BrokerUnavailableError:  # the store is out: the loop waits it out
            pass


def described(error: BaseException) -> str:
    """``Type: message``, even for an error whose message cannot be made."""
    try:
        message = str(error)
    except Exception:  # its __str__ is broken: the type still says something
        message = f"(its message could not be made: {object.__repr__(error)})"
    return f"{type(error).__qualname__}: {message}"


def _check_position(position: object) -> None:
    if type(position) is not int:
        raise TypeError(f"position={position!r}: a parked event's position is an int")


def _reason(failed: Exception) -> str:
    """The failure's text as both stores keep it: NUL characters (which PostgreSQL's text and
    the stores' JSON documents refuse) and lone surrogates (which UTF-8 cannot encode) written
    as escapes."""
    reason = failed.reason if isinstance(failed, HandlerError) else str(failed)
    return reason.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _where(parked: ParkedEvent) -> str:
    if parked.position < 0:
        return f"timer {parked.event_id.removeprefix('timer:')!r}"
    return f"position {parked.position}"


class HandlerError(Exception):
    """A handler failed; ``reason``: the error with its traceback, to park."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
