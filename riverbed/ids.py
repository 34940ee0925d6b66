"""Ids for tasks, events and aggregates: UUIDs in their 32-hex-digit form.

Random ids (version 4) come from ``os.urandom`` in batches: a ``getrandom`` call per save cost a
save per command on PostgreSQL 4% of its time. A forked child drops its parent's spare ids, so
the two never hand out the same ones.

Aggregate ids are time-ordered (version 7), as they key the event stores' (stream, version)
index: with random ones, every new aggregate's events went to a random page of that index, and
on SQLite a 10-event save wrote ~13% more pages and slowed as the store grew (from ~105k to ~86k
events/s over 26,000 saves; ~105-118k throughout with version 7).
"""

from __future__ import annotations

import os
import threading
import time

BATCH = 256  # ids per urandom call


class _Spare:
    """Ids drawn but not handed out yet."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.lock = threading.Lock()

    def take(self, count: int) -> list[str]:
        if count <= 0:
            return []
        with self.lock:
            if count > len(self.ids):
                self.ids.extend(_fresh(max(count, BATCH)))
            taken = self.ids[-count:]
            del self.ids[-count:]
        return taken

    def forget(self) -> None:
        """In a forked child: the parent hands these out, and one of its threads may have held
        the lock at the fork."""
        self.ids = []
        self.lock = threading.Lock()


_spare = _Spare()
os.register_at_fork(after_in_child=_spare.forget)


def random_ids(count: int) -> list[str]:
    """``count`` random version-4 UUIDs in their 32-hex-digit form."""
    return _spare.take(count)


def random_id() -> str:
    return random_ids(1)[0]


def time_ordered_id() -> str:
    """A version-7 UUID (RFC 9562) in its 32-hex-digit form: the Unix time in milliseconds,
    then 74 random bits, so ids made one after another sort close together."""
    # A version-4 id's digits after its version digit: 3 random, the variant, 15 random.
    return f"{time.time_ns() // 1_000_000:012x}7{random_id()[13:]}"


def _fresh(count: int) -> list[str]:
    raw = bytearray(os.urandom(16 * count))
    # The version (4) and the RFC 4122 variant (top bits 10) set for all ids at once: a
    # formatted string per id took three times as long.
    raw[6::16] = raw[6::16].translate(_VERSION_4)
    raw[8::16] = raw[8::16].translate(_VARIANT)
    # Split by hex() itself, a space every 16 bytes: half the time of slicing its digits.
    return raw.hex(" ", 16).split()


_VERSION_4 = bytes((byte & 0x0F) | 0x40 for byte in range(256))
_VARIANT = bytes((byte & 0x3F) | 0x80 for byte in range(256))
