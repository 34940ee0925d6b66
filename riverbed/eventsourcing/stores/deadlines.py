"""A caller's deadline for the store calls it makes: their waits for a pooled connection end by
it.

``Projections.wait_for(timeout=)`` answers within its timeout. Without a deadline, its reads on
PostgreSQL would wait the URL's ``pool_timeout`` (30 s) for a connection while the server is
out or every pooled one is in use, and fail long after the caller's timeout.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# The shortest wait a call past its deadline gets: a free connection is still taken.
MIN_WAIT_S = 0.001

_deadline: ContextVar[float] = ContextVar("riverbed_store_deadline", default=math.inf)


@contextmanager
def deadline(at: float) -> Iterator[None]:
    """Store calls in this context (thread or task) wait for a connection until ``at``
    (``time.monotonic()``) at most; an enclosing deadline that ends sooner still holds."""
    token = _deadline.set(min(at, _deadline.get()))
    try:
        yield
    finally:
        _deadline.reset(token)


def connection_wait(pool_timeout: float) -> float:
    """How long a call may wait for a pooled connection: ``pool_timeout``, or less if the
    caller's deadline comes first."""
    left = _deadline.get() - time.monotonic()
    return pool_timeout if left >= pool_timeout else max(left, MIN_WAIT_S)
