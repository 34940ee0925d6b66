"""Event sourcing and CQRS: aggregates, event stores, projections, an outbox to the log, sagas."""

from __future__ import annotations

from riverbed.eventsourcing.aggregate import Aggregate, DomainEvent, event
from riverbed.eventsourcing.codec import ERASED, Personal
from riverbed.eventsourcing.errors import (
    AggregateNotFoundError,
    ConcurrencyError,
    EventDecodeError,
    EventSourcingError,
    HandlerAbortedTransactionError,
    NotParkedError,
    RunnerFailedError,
    StoreUnavailableError,
    UnknownEventTypeError,
)
from riverbed.eventsourcing.outbox import Inbox, Relay, stored_event
from riverbed.eventsourcing.projections import Projection, ReadModel
from riverbed.eventsourcing.repository import Envelope, Events, causing
from riverbed.eventsourcing.runtime import EventSourcing
from riverbed.eventsourcing.sagas import ProcessManager, Saga
from riverbed.eventsourcing.stores import connect_async_store, connect_store
from riverbed.eventsourcing.subscriptions import SubscriberStatus
from riverbed.eventsourcing.testing import scenario

__all__ = [
    "ERASED",
    "Aggregate",
    "AggregateNotFoundError",
    "ConcurrencyError",
    "DomainEvent",
    "Envelope",
    "EventDecodeError",
    "EventSourcing",
    "EventSourcingError",
    "Events",
    "HandlerAbortedTransactionError",
    "Inbox",
    "NotParkedError",
    "Personal",
    "ProcessManager",
    "Projection",
    "ReadModel",
    "Relay",
    "RunnerFailedError",
    "Saga",
    "StoreUnavailableError",
    "SubscriberStatus",
    "UnknownEventTypeError",
    "causing",
    "connect_async_store",
    "connect_store",
    "event",
    "scenario",
    "stored_event",
]
