"""Holding off Python's cyclic garbage collector while a batch is processed.

A batch (a stream runner's records, the outbox relay's page of events) allocates its objects by
the ten thousand and keeps them until it is done; left alone, the collector would run every few
hundred of them, and every hundredth run walks the whole heap, to find no garbage: the batch's
objects are freed by reference counting when it ends, and cycles wait for the collections
between batches.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator


class CollectionPause:
    """Holds off the collector while some thread of the process is inside a batch; it runs again
    once none is (if it ran before the first one began)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._was_enabled = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if not self._inside:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._inside += 1
        try:
            yield
        finally:
            with self._lock:
                self._inside -= 1
                if not self._inside and self._was_enabled:
                    gc.enable()


collection_deferred = CollectionPause()
