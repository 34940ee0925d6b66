"""Helpers for tests: waiting for eventual conditions and draining consumers."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

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


def take_over(successor: riverbed.Consumer, partitions: int, records: int) -> list[riverbed.Record]:
    """Poll until ``successor`` owns all ``partitions`` of a stopped member, then until it has
    read ``records``; what it read."""
    read: list[riverbed.Record] = []

    def owns_everything() -> bool:
        read.extend(successor.poll(timeout=0.2))
        return len(successor.assignment()) == partitions

    wait_until(owns_everything, 60, "the stopped member's partitions to move")
    return read + consume(successor, records - len(read))


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


ROOT = Path(__file__).resolve().parents[1]


class Worker:
    """``python -m module *args`` as a subprocess; its stdout lines are collected as they come."""

    def __init__(self, module: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a process group of its own, for signal_group
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.strip())

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 60) -> None:
        """Until the lines reported so far satisfy ``predicate``; fail if the worker exits."""

        def reported() -> bool:
            if predicate(list(self.lines)):
                return True
            if self.process.poll() is not None:
                self._reader.join(5)
                if not predicate(list(self.lines)):
                    stderr = self.process.stderr.read() if self.process.stderr else ""
                    pytest.fail(f"worker exited with {self.process.returncode}: {stderr[-2000:]}")
            return False

        wait_until(reported, timeout, f"the worker to report (it said {self.lines[-3:]})")

    def signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def signal_group(self, signum: int) -> None:
        """Signal it and the processes it started, as systemd and a terminal's Ctrl-C do."""
        os.killpg(self.process.pid, signum)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)
        self._reader.join(5)


def read_topic(log: riverbed.Log, topic: str) -> list[riverbed.Record]:
    """Every record of ``topic``, from the beginning."""
    total = sum(log.end_offsets(topic).values())
    records: list[riverbed.Record] = []
    with log.consumer(group=None, topics=[topic], from_beginning=True) as consumer:
        while len(records) < total:
            records.extend(consumer.poll(max_records=10_000, timeout=1.0))
    return records


def stopped(stop: threading.Event, threads: list[threading.Thread]) -> None:
    """Set ``stop`` and check the threads end."""
    stop.set()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)


def published(log: riverbed.Log, topic: str) -> int:
    """How many records ``topic`` holds; 0 until a relay made it."""
    if topic not in {t.name for t in log.list_topics()}:
        return 0
    return sum(log.end_offsets(topic).values())
