"""Commands on one aggregate in one process take turns.

Commands racing for one aggregate conflict: all load the same version, one saves, the others
load again and retry. Within a process they need not race: ``handle`` waits for its turn on the
aggregate, so only other processes' commands conflict (and are retried). The wait is bounded:
a command whose ``decide`` waits, in turn, for another command on the same aggregate (in a
thread it started, or a task that was already running) does not deadlock, it goes ahead after
``TURN_WAIT_S`` and meets the conflict it met before turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from typing import Any, TypeVar

L = TypeVar("L", threading.Lock, asyncio.Lock)

# Long enough for a queue of commands on one aggregate to drain (each takes milliseconds).
TURN_WAIT_S = 5.0

# The aggregates whose turn the running code holds: a command in a command (and tasks that
# inherited its context) goes ahead instead of waiting for itself.
_holding: contextvars.ContextVar[frozenset[Hashable]] = contextvars.ContextVar(
    "riverbed_turns_held", default=frozenset()
)


class Turns:
    """One lock per aggregate while any command waits for it or holds it, for threads and for
    each event loop's tasks."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Hashable, tuple[threading.Lock, int]] = {}
        self._async_locks: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[Hashable, tuple[asyncio.Lock, int]]
        ] = weakref.WeakKeyDictionary()

    @contextlib.contextmanager
    def turn(self, key: Hashable) -> Iterator[None]:
        """Wait (up to ``TURN_WAIT_S``) until no other thread runs a command on ``key``."""
        if key in _holding.get():
            yield
            return
        lock = self._join(self._locks, key, threading.Lock)
        with self._held(self._locks, key, lock if lock.acquire(timeout=TURN_WAIT_S) else None):
            yield

    @contextlib.asynccontextmanager
    async def turn_async(self, key: Hashable) -> AsyncIterator[None]:
        """``turn`` for the running event loop's tasks."""
        if key in _holding.get():
            yield
            return
        with self._guard:
            locks = self._async_locks.setdefault(asyncio.get_running_loop(), {})
        lock = self._join(locks, key, asyncio.Lock)
        acquired: bool
        try:
            acquired = await asyncio.wait_for(lock.acquire(), TURN_WAIT_S)
        except TimeoutError:
            acquired = False
        except BaseException:  # cancelled while waiting
            self._leave(locks, key)
            raise
        with self._held(locks, key, lock if acquired else None):
            yield

    def _join(self, locks: dict[Hashable, tuple[L, int]], key: Hashable, new: Callable[[], L]) -> L:
        with self._guard:
            lock, users = locks.get(key) or (new(), 0)
            locks[key] = (lock, users + 1)
        return lock

    @contextlib.contextmanager
    def _held(
        self, locks: dict[Hashable, tuple[Any, int]], key: Hashable, lock: Any | None
    ) -> Iterator[None]:
        """Run the command holding ``key``'s turn (``lock``; None: it went ahead after waiting
        too long)."""
        token = _holding.set(_holding.get() | {key})
        try:
            yield
        finally:
            _holding.reset(token)
            if lock is not None:
                lock.release()
            self._leave(locks, key)

    def _leave(self, locks: dict[Hashable, tuple[Any, int]], key: Hashable) -> None:
        with self._guard:
            lock, users = locks[key]
            if users == 1:
                del locks[key]
            else:
                locks[key] = (lock, users - 1)
