"""A deadline for the store's waits on the server: ``command_timeout`` seconds.

A server that stopped answering without closing its connections would hold a call forever: a
server process stopped (SIGSTOP, a debugger), or a host stalled while its kernel still
acknowledges TCP, which keepalives take for a live peer. Neither libpq nor psycopg bounds the
wait for an answer. So the store watches each of its statements: when one has waited
``command_timeout`` seconds, this thread shuts the connection's socket down, which ends the wait
with an error on a broken connection, in a thread or in the event loop alike. The pool replaces
the connection, and the call raises ``StoreUnavailableError``, which runners wait out as an
outage. The time a subscriber's handler runs between its transaction's statements is not
watched (``paused``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import psycopg

# How often the thread looks for statements past their deadline: a deadline is met within this
# much. It is not woken for each statement, which cost a save a third of its time (the GIL and a
# wake-up on another CPU).
CHECK_INTERVAL_S = 0.25


class _Watched:
    """A connection as the watchdog knows it: its socket, and the deadline of its wait."""

    __slots__ = ("conn", "deadline", "fd", "key")

    def __init__(self, conn: psycopg.BaseConnection[Any]) -> None:
        self.conn = weakref.ref(conn)
        self.key = id(conn)
        self.fd = conn.pgconn.socket
        self.deadline = 0.0


class Watchdog:
    """Shuts down the socket of a connection whose statement waited ``timeout_s`` (0: never)."""

    def __init__(self, timeout_s: float, name: str) -> None:
        self.timeout_s = timeout_s
        self._name = name
        # Held to shut a socket down, and to stop watching one, so that neither happens while
        # the other does.
        self._lock = threading.Lock()
        self._watched: dict[int, _Watched] = {}  # by id(conn)
        self._expired: weakref.WeakSet[psycopg.BaseConnection[Any]] = weakref.WeakSet()
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    def watching(self, conn: psycopg.BaseConnection[Any]) -> _Watching:
        """Watch ``conn``'s statements in the block (an enclosing block's deadline holds). The
        block may be entered again, one at a time: a connection kept for many statements keeps
        its block (a new one cost each save ~0.5 us)."""
        return _Watching(self, conn)

    @contextlib.contextmanager
    def paused(self, conn: psycopg.BaseConnection[Any]) -> Iterator[None]:
        """Not ``conn``'s wait in the block (user code between statements); the watch goes on
        after it with a new deadline."""
        with self._lock:
            watched = self._watched.pop(id(conn), None)
        try:
            yield
        finally:
            if watched is not None:
                self._watch(watched)

    def timed_out(self, conn: psycopg.BaseConnection[Any]) -> bool:
        """Whether this watchdog shut ``conn`` down."""
        return conn in self._expired

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join()

    def _start(self, watched: _Watched) -> bool:
        """Watch ``watched`` unless a block watches its connection already; whether this call
        started the watch."""
        if watched.key in self._watched:
            return False
        self._watch(watched)
        return True

    def _unwatch(self, watched: _Watched) -> None:
        with self._lock:
            self._watched.pop(watched.key, None)

    def _watch(self, watched: _Watched) -> None:
        watched.deadline = time.monotonic() + self.timeout_s
        self._watched[watched.key] = watched
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name=f"riverbed-watchdog-{self._name}", daemon=True
                    )
                    self._thread.start()

    def _run(self) -> None:
        while not self._closed.wait(CHECK_INTERVAL_S):
            now = time.monotonic()
            with self._lock:
                for key, watched in list(self._watched.items()):
                    if watched.deadline <= now and self._watched.get(key) is watched:
                        del self._watched[key]
                        self._shut_down(watched)

    def _shut_down(self, watched: _Watched) -> None:
        """End the wait on ``watched``'s connection (under the lock, so that its owner has not
        given the connection back meanwhile), unless psycopg closed it already: its socket's
        number may be another's by now."""
        conn = watched.conn()
        if conn is None or conn.closed:
            return
        try:
            if conn.pgconn.socket != watched.fd:
                return
        except psycopg.OperationalError:  # closed as we looked
            return
        # A descriptor of its own for the socket object, which closes it after.
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(watched.fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
        self._expired.add(conn)


class _Watching:
    """A block of ``Watchdog.watching`` (a class: as a generator, it cost each statement 0.5 us
    more)."""

    __slots__ = ("_conn", "_started", "_watchdog", "_watched")

    def __init__(self, watchdog: Watchdog, conn: psycopg.BaseConnection[Any]) -> None:
        self._watchdog = watchdog
        self._conn = conn
        self._watched: _Watched | None = None  # made on the first entry with a limit
        self._started = False  # whether this block watches, not an enclosing one

    def __enter__(self) -> None:
        if self._watchdog.timeout_s:
            if self._watched is None:
                self._watched = _Watched(self._conn)
            self._started = self._watchdog._start(self._watched)

    def __exit__(self, *exc_info: object) -> None:
        if self._started:
            self._started = False
            assert self._watched is not None
            self._watchdog._unwatch(self._watched)
