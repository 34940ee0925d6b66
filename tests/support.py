"""Helpers for tests: waiting for eventual conditions and draining consumers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

import riverbed


def wait_until(condition: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` if it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.1)


def consume(
    consumer: riverbed.Consumer, count: int, timeout: float = 30.0
) -> list[riverbed.Record]:
    """Poll until ``count`` records arrived (failing after ``timeout``), then check nothing more."""
    records: list[riverbed.Record] = []
    deadline = time.monotonic() + timeout
    while len(records) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"got {len(records)} of {count} records within {timeout} s")
        records.extend(consumer.poll(max_records=count - len(records), timeout=0.5))
    return records


@contextmanager
def running(app: riverbed.App) -> Iterator[None]:
    """Run ``app`` in a thread for the ``with`` block; stop it and check it finished."""
    stop = threading.Event()
    thread = threading.Thread(target=app.run, args=(stop,))
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)
        assert not thread.is_alive()
