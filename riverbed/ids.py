"""Random ids for tasks and events: version-4 UUIDs in their 32-hex-digit form.

They come from ``os.urandom`` in batches: a ``getrandom`` call per save cost a save per command
on PostgreSQL 4% of its time. A forked child drops its parent's spare ids, so the two never hand
out the same ones.
"""

from __future__ import annotations

import os
import threading

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


def _fresh(count: int) -> list[str]:
    raw = os.urandom(16 * count).hex()
    return [
        f"{raw[i : i + 12]}4{raw[i + 13 : i + 16]}{_VARIANT[raw[i + 16]]}{raw[i + 17 : i + 32]}"
        for i in range(0, 32 * count, 32)
    ]


# The RFC 4122 variant: the top two bits of the 17th hex digit are 10.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}
