"""Commands on one aggregate in one process take turns.

Commands racing for one aggregate conflict: all load the same version, one saves, the others
load again and retry. Within a process they need not race: ``handle`` waits for its turn on the
aggregate, whether it runs in a thread or in a task of any thread's event loop, so only other
processes' commands conflict (and are retried). Turns are first come, first served. The wait is
bounded: a command whose ``decide`` waits, in turn, for another command on the same aggregate
(in a thread it started, or a task that was already running) does not deadlock, it goes ahead
after ``TURN_WAIT_S`` and meets the conflict it met before turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from typing import TypeVar

# Long enough for a queue of commands on one aggregate to drain (each takes milliseconds).
TURN_WAIT_S = 5.0

# The aggregates whose turn the running code holds: a command in a command (and tasks that
# inherited its context) goes ahead instead of waiting for itself.
_holding: contextvars.ContextVar[frozenset[Hashable]] = contextvars.ContextVar(
    "riverbed_turns_held", default=frozenset()
)

# A command waiting for its turn: a thread's event, or a task's future on its loop.
_TaskWaiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]
_Waiter = threading.Event | _TaskWaiter
W = TypeVar("W", threading.Event, _TaskWaiter)


class _Turn:
    """Whether a command on one aggregate holds its turn, and who waits for it, in order."""

    __slots__ = ("held", "waiters")

    def __init__(self) -> None:
        self.held = False
        self.waiters: deque[_Waiter] = deque()


class Turns:
    """The turns of the aggregates that commands hold or wait for, in one process."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._turns: dict[Hashable, _Turn] = {}

    @contextlib.contextmanager
    def turn(self, key: Hashable) -> Iterator[None]:
        """Wait (up to ``TURN_WAIT_S``) until no other command runs on ``key``."""
        if key in _holding.get():
            yield
            return
        waiter = self._enter(key, threading.Event)
        if waiter is not None and _on_event_loop():
            # Waiting would block the loop, whose task may hold the turn: go ahead at once.
            held = not self._give_up(key, waiter)
        else:
            held = waiter is None or waiter.wait(TURN_WAIT_S) or not self._give_up(key, waiter)
        with self._holding(key, held):
            yield

    @contextlib.asynccontextmanager
    async def turn_async(self, key: Hashable) -> AsyncIterator[None]:
        """``turn`` for a task of the running event loop."""
        if key in _holding.get():
            yield
            return
        loop = asyncio.get_running_loop()
        waiter = self._enter(key, lambda: (loop, loop.create_future()))
        held = waiter is None
        if waiter is not None:
            try:
                async with asyncio.timeout(TURN_WAIT_S):
                    await waiter[1]
                held = True
            except TimeoutError:
                held = not self._give_up(key, waiter)
            except BaseException:  # cancelled: a turn given meanwhile goes to the next
                if not self._give_up(key, waiter):
                    self._leave(key)
                raise
        with self._holding(key, held):
            yield

    def _enter(self, key: Hashable, new_waiter: Callable[[], W]) -> W | None:
        """Take ``key``'s turn if it is free (None), else queue a new waiter for it."""
        with self._guard:
            turn = self._turns.get(key)
            if turn is None:
                self._turns[key] = turn = _Turn()
            if not turn.held:
                turn.held = True
                return None
            waiter = new_waiter()
            turn.waiters.append(waiter)
            return waiter

    def _give_up(self, key: Hashable, waiter: _Waiter) -> bool:
        """Stop waiting: True if the waiter was still queued, False if the turn was given to
        it meanwhile (it holds it now)."""
        with self._guard:
            turn = self._turns[key]
            if waiter in turn.waiters:
                turn.waiters.remove(waiter)
                return True
            return False

    @contextlib.contextmanager
    def _holding(self, key: Hashable, held: bool) -> Iterator[None]:
        """Run the command (``held``: in its turn, which it hands on after; else it went
        ahead after waiting too long)."""
        token = _holding.set(_holding.get() | {key})
        try:
            yield
        finally:
            _holding.reset(token)
            if held:
                self._leave(key)

    def _leave(self, key: Hashable) -> None:
        """Hand ``key``'s turn to the first waiter still there, or free it."""
        with self._guard:
            turn = self._turns[key]
            while turn.waiters:
                waiter = turn.waiters.popleft()
                if isinstance(waiter, threading.Event):
                    waiter.set()
                    return
                loop, future = waiter
                with contextlib.suppress(RuntimeError):  # its loop closed: the next one
                    loop.call_soon_threadsafe(_give, future)
                    return
            turn.held = False
            del self._turns[key]


def _give(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _on_event_loop() -> bool:
    """Whether this thread runs an event loop (a sync command called from a coroutine)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
