"""Where tasks run: a thread pool, an asyncio pool, or a pool of child processes.

Each pool takes tasks from ``Inflight`` and hands back what happened. They differ in how a task
is interrupted (soft limit, hard limit, cancel):

- threads: an exception raised in the thread (``PyThreadState_SetAsyncExc``) for soft limits and
  cancels; a thread past its hard limit cannot be killed, so its task is settled as failed, the
  thread abandoned (its late result ignored) and replaced;
- asyncio: the coroutine is cancelled;
- processes: the child raises ``SoftTimeLimitExceeded`` from a SIGALRM timer itself; past the hard
  limit, or on cancel, it is killed and replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import threading
from typing import Any, Protocol

import msgspec

from riverbed.tasks.errors import SoftTimeLimitExceeded, TaskCancelledError
from riverbed.tasks.messages import ENCODER, MESSAGE_DECODER
from riverbed.tasks.task import Task
from riverbed.tasks.worker.execution import Executed, execute, execute_async, failure
from riverbed.tasks.worker.forker import ChildMain, Connection, Forker
from riverbed.tasks.worker.inflight import Inflight, Interrupt, Running

_EXECUTED_DECODER = msgspec.msgpack.Decoder(Executed)


class TaskPool(Protocol):
    def start(self) -> None: ...

    def interrupt(self, running: Running, reason: Interrupt) -> None:
        """Deliver a soft limit, hard limit or cancel to a running task."""
        ...

    def stop(self, timeout: float) -> None:
        """Let slots finish their current task (up to ``timeout``), then end them."""
        ...


class ThreadPool:
    def __init__(self, inflight: Inflight, size: int) -> None:
        self._inflight = inflight
        self._size = size
        self._threads: list[threading.Thread] = []
        self._abandoned: set[int] = set()

    def start(self) -> None:
        for _ in range(self._size):
            self._spawn()

    def _spawn(self) -> None:
        thread = threading.Thread(target=self._serve, name="riverbed-task", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _serve(self) -> None:
        ident = threading.get_ident()
        while ident not in self._abandoned:
            running = self._inflight.take(ident)
            if running is None:
                return
            try:
                executed = execute(running.task, running.message)
            except (SoftTimeLimitExceeded, TaskCancelledError) as error:
                # Raised asynchronously between the task's return and here.
                executed = failure(error, running.task.settings)
            self._inflight.finish(running, executed)

    def interrupt(self, running: Running, reason: Interrupt) -> None:
        ident = running.slot
        assert isinstance(ident, int)
        if reason is Interrupt.HARD:
            self._abandoned.add(ident)
            self._inflight.settle(running, reason)
            self._spawn()
            return
        error = SoftTimeLimitExceeded if reason is Interrupt.SOFT else TaskCancelledError
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(error))

    def stop(self, timeout: float) -> None:
        for thread in self._threads:
            thread.join(timeout)


class AsyncPool:
    """One event loop in its own thread, running up to ``size`` tasks at once."""

    def __init__(self, inflight: Inflight, size: int) -> None:
        self._inflight = inflight
        self._size = size
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="riverbed-async", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        slots = asyncio.Semaphore(self._size)
        active: set[asyncio.Task[None]] = set()
        while True:
            await slots.acquire()
            running = await asyncio.to_thread(self._inflight.take, None, 0.2)
            while running is None and not self._inflight.closed:
                running = await asyncio.to_thread(self._inflight.take, None, 0.2)
            if running is None:
                break
            job = asyncio.create_task(self._one(running, slots))
            active.add(job)
            job.add_done_callback(active.discard)
        if active:
            await asyncio.wait(active)

    async def _one(self, running: Running, slots: asyncio.Semaphore) -> None:
        running.slot = asyncio.current_task()
        try:
            executed = await execute_async(running.task, running.message)
        except asyncio.CancelledError:
            reason = next(iter(running.interrupts), Interrupt.CANCEL)
            error = (
                SoftTimeLimitExceeded(f"task {running.message.name} ran past its soft time limit")
                if reason is Interrupt.SOFT
                else TaskCancelledError("cancelled")
            )
            executed = failure(error, running.task.settings)
            if reason is Interrupt.HARD:
                self._inflight.settle(running, reason)
        finally:
            slots.release()
        self._inflight.finish(running, executed)

    def interrupt(self, running: Running, reason: Interrupt) -> None:
        job = running.slot
        if isinstance(job, asyncio.Task):
            self._loop.call_soon_threadsafe(job.cancel)

    def stop(self, timeout: float) -> None:
        self._thread.join(timeout)


class ProcessPool:
    """Child processes forked from the worker, each running one task at a time.

    A thread per child sends it a task and waits for the result, so a slow task holds only its
    own child (no prefetch starvation). Children are forked (by the forker, forker.py, which
    says why), so they have the app's tasks without importing anything."""

    def __init__(self, inflight: Inflight, size: int, registry: dict[str, Task[Any, Any]]) -> None:
        self._inflight = inflight
        self._size = size
        self._registry = registry
        # Forked now, as the worker is made: before it runs, no thread of its is inside SQLite.
        self._forker = _forked_from_a_new_thread(_child_main, (registry,))
        self._feeders: list[threading.Thread] = []

    def start(self) -> None:
        for index in range(self._size):
            feeder = threading.Thread(
                target=self._feed, name=f"riverbed-child-{index}", daemon=True
            )
            self._feeders.append(feeder)
            feeder.start()

    def _fork(self) -> tuple[Child, Connection] | None:
        forked = self._forker.fork()
        if forked is None:  # the pool stopped
            return None
        pid, pipe = forked
        return Child(pid), pipe

    def _feed(self) -> None:
        forked = self._fork()
        if forked is None:
            return
        child, pipe = forked
        while True:
            running = self._inflight.take(child)
            if running is None:
                break
            try:
                pipe.send_bytes(ENCODER.encode(running.message))
                executed = _EXECUTED_DECODER.decode(pipe.recv_bytes())
            except (EOFError, OSError):
                # The child died: killed for a hard limit or a cancel (settled by the
                # supervisor), or crashed — then the task failed with the exit status.
                pipe.close()
                child.exitcode = self._forker.reap(child.pid)
                if not running.interrupts:
                    error = ChildDiedError(
                        f"the process running it exited with status {child.exitcode}"
                    )
                    self._inflight.finish(running, failure(error, running.task.settings))
                elif Interrupt.HARD not in running.interrupts:
                    self._inflight.settle(running, Interrupt.CANCEL)
                forked = self._fork()
                if forked is None:  # the pool stopped while its task ran on
                    return
                child, pipe = forked
                continue
            self._inflight.finish(running, executed)
        pipe.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)  # idle; it ignores SIGTERM
        child.exitcode = self._forker.reap(child.pid)

    def interrupt(self, running: Running, reason: Interrupt) -> None:
        if reason is Interrupt.SOFT:
            return  # the child's own timer raises it
        child = running.slot
        assert isinstance(child, Child)
        if reason is Interrupt.HARD:
            self._inflight.settle(running, reason)
        if child.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)

    def stop(self, timeout: float) -> None:
        for feeder in self._feeders:
            feeder.join(timeout)
        self._forker.close()  # and the children still running


def _forked_from_a_new_thread(target: ChildMain, args: tuple[Any, ...]) -> Forker:
    """The forker, forked by a thread of its own: the children's one thread is a copy of that
    one, whose thread-local connections (SQLite's, which a fork must not share) are none of the
    worker's."""
    made: list[Forker | BaseException] = []

    def make() -> None:
        try:
            made.append(Forker(target, args))
        except BaseException as error:
            made.append(error)

    maker = threading.Thread(target=make, name="riverbed-forker-start")
    maker.start()
    maker.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


class Child:
    """A child process of the pool: its pid, and its exit status once it is reaped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.exitcode: int | None = None


class ChildDiedError(RuntimeError):
    """The child process running a task exited (a crash, the OOM killer, ``os._exit``)."""


def _child_main(pipe: Any, registry: dict[str, Task[Any, Any]]) -> None:
    # The worker decides when children stop: a stop signal sent to its whole process group
    # (systemd's default, a terminal's Ctrl-C) leaves the running task its shutdown timeout.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _soft_limit)
    while True:
        try:
            message = MESSAGE_DECODER.decode(pipe.recv_bytes())
        except EOFError:
            return
        task = registry[message.name]
        soft = task.settings.soft_timeout
        if soft:
            signal.setitimer(signal.ITIMER_REAL, soft)
        try:
            executed = execute(task, message)
        except SoftTimeLimitExceeded as error:  # the alarm rang just after the task returned
            executed = failure(error, task.settings)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        pipe.send_bytes(ENCODER.encode(executed))


def _soft_limit(signum: int, frame: object) -> None:
    raise SoftTimeLimitExceeded("the task ran past its soft time limit")
