"""Handlers: ``@app.handler(topic)`` for plain consumers, the microservice case.

A handler is called once per record with the decoded value (``def`` or ``async def``). When it
raises, it is retried with exponential backoff up to ``retries`` times, blocking its partition so
records stay in order; then the record goes to the topic's dead-letter topic with the error. While
a handler runs, records it sends through ``Topic.send`` carry the input's correlation id (or the
input's own id, if it had none) and the input as their causation id.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from riverbed.backoff import Backoff
from riverbed.log.api import Record

CORRELATION_HEADER = "riverbed-correlation-id"
# On a record in a retry topic: when it may run again (epoch ms).
DUE_HEADER = "riverbed-retry-due-ms"
RETRY_SUFFIX = ".retry-"
CAUSATION_HEADER = "riverbed-causation-id"
ATTEMPTS_HEADER = "riverbed-attempts"

# The record a handler is working on, for the headers of what it sends.
_current_input: contextvars.ContextVar[Record | None] = contextvars.ContextVar(
    "riverbed_current_input", default=None
)


def retry_topic(topic: str, level: int) -> str:
    """The retry topic of ``topic`` for the ``level``-th delay (1-based)."""
    return f"{topic}{RETRY_SUFFIX}{level}"


def record_id(record: Record) -> str:
    return f"{record.topic}/{record.partition}/{record.offset}"


def causal_headers() -> dict[str, bytes]:
    """Headers linking a record sent now to the input being handled, if any."""
    current = _current_input.get()
    if current is None:
        return {}
    correlation = current.headers.get(CORRELATION_HEADER) or record_id(current).encode()
    return {CORRELATION_HEADER: correlation, CAUSATION_HEADER: record_id(current).encode()}


@contextmanager
def handling(record: Record) -> Iterator[None]:
    token = _current_input.set(record)
    try:
        yield
    finally:
        _current_input.reset(token)


class Handler:
    """A user function bound to a topic, with its retry policy."""

    def __init__(
        self,
        fn: Callable[..., Any],
        retries: int,
        backoff: Backoff,
        retry_delays: tuple[float, ...] = (),
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if any(delay < 0 for delay in retry_delays):
            raise ValueError(f"retry_delays must be >= 0 seconds, got {retry_delays}")
        self.retry_delays = tuple(retry_delays)
        self.fn = fn
        self.name = getattr(fn, "__qualname__", repr(fn))
        self.retries = retries
        self.backoff = backoff
        self._is_async = inspect.iscoroutinefunction(fn)
        self._wants_key = len(inspect.signature(fn).parameters) >= 2
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def attempts(self) -> int:
        return self.retries + 1

    def call(self, record: Record, key: Any, value: Any) -> BaseException | None:
        """Call the handler, retrying; the last error if every attempt failed, else None."""
        error: BaseException | None = None
        for attempt in range(1, self.attempts + 1):
            try:
                with handling(record):
                    self._invoke(key, value)
            except Exception as failure:  # the user's code: any error counts as a failed attempt
                error = failure
                if attempt <= self.retries:
                    time.sleep(self.backoff.delay(attempt))
                continue
            return None
        return error

    def _invoke(self, key: Any, value: Any) -> None:
        args = (key, value) if self._wants_key else (value,)
        if not self._is_async:
            self.fn(*args)
            return
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        coroutine: Awaitable[Any] = self.fn(*args)
        # The context var is copied into the task, so sends inside it get the causal headers.
        self._loop.run_until_complete(coroutine)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None
