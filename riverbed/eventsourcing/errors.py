"""The event-sourcing layer's exceptions. Each message names the thing, the problem and the fix."""

from __future__ import annotations

import inspect

from riverbed.errors import RiverbedError
from riverbed.log.errors import BrokerUnavailableError


class EventSourcingError(RiverbedError):
    """Base class of the event-sourcing layer's errors."""


class ConcurrencyError(EventSourcingError):
    """An append expected a stream at one version and found it at another."""

    def __init__(self, stream: str, expected: int, actual: int) -> None:
        super().__init__(
            f"stream {stream!r} is at version {actual}, not the expected {expected}: another "
            "writer appended first; load it again and retry the command"
        )
        self.stream = stream
        self.expected = expected
        self.actual = actual


class AggregateNotFoundError(EventSourcingError, LookupError):
    """No events are stored for the aggregate id asked for."""


class UnknownEventTypeError(EventSourcingError, LookupError):
    """A stored event's type names no event class this program registered."""


class EventDecodeError(EventSourcingError, ValueError):
    """A stored event's payload no longer decodes into its class (even after upcasting)."""


class NotParkedError(EventSourcingError, LookupError):
    """Nothing is parked at the position a retry names: it never was, or another retry handled
    it, or it was unparked."""


class HandlerAbortedTransactionError(EventSourcingError):
    """A handler caught the error of a statement it ran, which on PostgreSQL aborts the
    transaction all the same: what it did is rolled back."""


class StoreUnavailableError(EventSourcingError, BrokerUnavailableError):
    """The event store's server cannot be reached."""


class RunnerFailedError(EventSourcingError):
    """A projection, process manager or relay thread ended on an error (its ``__cause__``)."""


def refuse_awaitable(result: object, message: str) -> None:
    """``TypeError(message)`` if ``result`` is awaitable: an async function was called where
    riverbed runs plain ones, so nothing of it ran (its coroutine is closed: no "never awaited"
    warning)."""
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise TypeError(message)
