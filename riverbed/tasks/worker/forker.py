"""The process pool's forker: a process forked from the worker as its pool is made, before the
worker runs, that forks the pool's children on request.

A child forked straight from the worker could inherit, held, a lock another of the worker's
threads held at that instant (SQLite's own, which every connection of the process shares, as a
fetch, a heartbeat or a task's result takes them), and hang for ever when its task took it in
turn: a task enqueuing another on a SQLite broker, say. The forker runs one thread, so its
children inherit no lock held; they inherit the worker as it was when it was made, the app's
tasks with it. The forker itself is forked then, when no thread of the worker's is inside
SQLite yet (the app's own threads are the app's to start later).

The worker asks for a child and gets its pid and its end of a socket pair to it; it kills a
child itself, and asks the forker for the exit status of one whose pipe ended. When the worker
goes away, the forker kills its children and exits.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from multiprocessing import reduction
from typing import Any

ChildMain = Callable[..., None]
Connection = multiprocessing.connection.Connection
# A child's exit status as multiprocessing gives it: the code, or minus the signal that ended it.
ExitCode = int
# How long the forker has to kill its children and exit once the pool stops.
CLOSE_TIMEOUT_S = 5.0


class Forker:
    """Forks children running ``target(pipe, *args)`` on request (see the module's doc)."""

    def __init__(self, target: ChildMain, args: tuple[Any, ...]) -> None:
        self._requests, forker_end = multiprocessing.Pipe()

        def serve() -> None:
            self._requests.close()
            _serve(forker_end, target, args)

        # Forked by hand, not as a multiprocessing Process: that one's exit handler would wait
        # for the forker, which ignores the SIGTERM it sends.
        pid = _spawn(serve)
        forker_end.close()
        self._lock = threading.Lock()  # one request and its reply at a time
        # Also when a worker that never ran is dropped, or the interpreter exits: a forker
        # outlived by nothing would stay a process of the worker's until the worker exits.
        self._end = weakref.finalize(self, _end, self._requests, pid, os.getpid())

    def fork(self) -> tuple[int, Connection] | None:
        """A new child's pid and the worker's end of the pipe to it; None once the forker is
        closed (the pool stopped)."""
        with self._lock:
            if self.closed:
                return None
            self._requests.send(("fork", 0))
            pid: int = self._requests.recv()
            handle = reduction.recv_handle(self._requests)
        return pid, Connection(handle)

    def reap(self, pid: int) -> ExitCode:
        """Wait for child ``pid`` to exit (its pipe ended: it exits, or was killed); its status."""
        with self._lock:
            if self.closed:  # it killed and reaped its children as it ended
                return -signal.SIGKILL
            self._requests.send(("reap", pid))
            code: ExitCode = self._requests.recv()
        return code

    @property
    def closed(self) -> bool:
        return self._requests.closed

    def close(self) -> None:
        """End the forker, and with it the children still running."""
        with self._lock:
            self._end()


def _end(requests: Connection, pid: int, parent: int) -> None:
    """Close the forker's pipe, which ends it; reap it (killed if it lingers). Only in the
    process that forked it: a copy of the pool in a later forker is not its parent."""
    if os.getpid() != parent:
        return
    requests.close()
    deadline = time.monotonic() + CLOSE_TIMEOUT_S
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        time.sleep(0.01)


def _serve(requests: Connection, target: ChildMain, args: tuple[Any, ...]) -> None:
    # The worker decides when the forker and the children stop (see _child_main).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    children: set[int] = set()
    while True:
        try:
            kind, pid = requests.recv()
        except EOFError:  # the worker went away
            break
        if kind == "fork":
            pid, worker_end = _fork_child(requests, target, args)
            children.add(pid)
            requests.send(pid)
            reduction.send_handle(requests, worker_end.fileno(), os.getppid())
            worker_end.close()  # the worker's copy is now the only one: its exit ends the child
        else:
            children.discard(pid)
            requests.send(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _fork_child(
    requests: Connection, target: ChildMain, args: tuple[Any, ...]
) -> tuple[int, Connection]:
    """A child running ``target``: its pid, and the end of its pipe for the worker."""
    worker_end, child_end = multiprocessing.Pipe()

    def run() -> None:
        requests.close()
        worker_end.close()
        target(child_end, *args)

    pid = _spawn(run)
    child_end.close()
    return pid, worker_end


def _spawn(body: Callable[[], None]) -> int:
    """Fork a process that runs ``body``, then exits: 0, or 1 if ``body`` raised. Its pid."""
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        body()
        status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)  # not the parent's exit handlers, nor its loop
