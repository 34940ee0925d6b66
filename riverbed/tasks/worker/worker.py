"""``Worker``: fetch leased tasks in batches, run them in a pool, report outcomes in batches.

Four loops share one ``Inflight``:

- the fetch loop (the thread calling ``run``) leases tasks when fewer than ``prefetch`` wait for
  a slot, so a worker never holds more than it can start soon (no prefetch starvation);
- pool slots run tasks;
- the reporter stores outcomes with one ``finish`` call per batch;
- the supervisor extends leases, delivers time limits and cancels, and — while this worker holds
  the broker's leader lease — enqueues periodic tasks and clears expired results.

A broker outage pauses the loops, which retry with backoff and keep outcomes not yet stored, so
a worker rides out a Redis restart. ``stop`` (SIGTERM) stops fetching, gives back tasks not
started, lets running ones finish up to ``shutdown_timeout``, reports, and leaves.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgspec

from riverbed.errors import RiverbedError
from riverbed.signals import handling
from riverbed.tasks.calls import prepend
from riverbed.tasks.errors import BrokerUnavailableError
from riverbed.tasks.messages import Outcome, TaskMessage, TaskState, now_ms
from riverbed.tasks.task import CallOptions, RateLimit, Task
from riverbed.tasks.worker.execution import ended, expired
from riverbed.tasks.worker.inflight import Inflight, Interrupt
from riverbed.tasks.worker.pools import AsyncPool, ProcessPool, TaskPool, ThreadPool

if TYPE_CHECKING:
    from riverbed.tasks.brokers.api import Broker
    from riverbed.tasks.registry import Tasks
    from riverbed.tasks.worker.metrics import WorkerMetrics

Pool = Literal["thread", "async", "process"]
POOLS: tuple[Pool, ...] = ("thread", "async", "process")

log = logging.getLogger("riverbed.tasks")

T = TypeVar("T")

SUPERVISOR_TICK_S = 0.05
# A chord callback whose headers are still running waits this long before it looks again.
GATHER_WAIT_MS = 1000
CANCEL_CHECK_S = 0.5  # how soon a running task hears it was cancelled
LEADER_EVERY_S = 0.25
HOUSEKEEP_EVERY_S = 1.0
FETCH_WAIT_S = 0.5
MAX_BACKOFF_S = 5.0
# Of the ticks a periodic task missed (no worker ran, or a leader handover), the latest this
# many run.
MISSED_TICKS_RUN = 10
_NO_OPTIONS = CallOptions()


class Worker:
    def __init__(
        self,
        tasks: Tasks,
        *,
        concurrency: int | None = None,
        pool: Pool = "thread",
        queues: list[str] | None = None,
        lease: float = 30.0,
        shutdown_timeout: float = 30.0,
        prefetch: int | None = None,
    ) -> None:
        if pool not in POOLS:
            raise RiverbedError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
        if lease < 0.3:
            raise RiverbedError(f"lease must be at least 0.3 s, got {lease}")
        self.tasks = tasks
        self.concurrency = concurrency or (os.cpu_count() or 1) * (1 if pool == "process" else 4)
        if self.concurrency < 1:
            raise RiverbedError(f"concurrency must be >= 1, got {self.concurrency}")
        self.pool_kind = pool
        self.queues = queues or sorted({task.settings.queue for task in tasks.registry.values()})
        self.lease_ms = int(lease * 1000)
        self.shutdown_timeout = shutdown_timeout
        self.prefetch = prefetch if prefetch is not None else self.concurrency
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.inflight = Inflight(self.concurrency + self.prefetch)
        self.metrics: WorkerMetrics | None = None
        self._stopping = threading.Event()
        self._failures: list[BaseException] = []  # of the reporter's and supervisor's loops
        self._drained = threading.Event()  # no task runs or will: the reporter may leave
        self._supervisor_done = threading.Event()
        self._pool: TaskPool = self._make_pool()
        self._leading = False
        self._ticked: dict[str, int] = {}

    def _make_pool(self) -> TaskPool:
        if self.pool_kind == "process":
            return ProcessPool(self.inflight, self.concurrency, self.tasks.registry)
        if self.pool_kind == "async":
            return AsyncPool(self.inflight, self.concurrency)
        return ThreadPool(self.inflight, self.concurrency)

    @property
    def broker(self) -> Broker:
        return self.tasks.broker

    # Running

    def run(self) -> None:
        """Work until ``stop()`` or SIGTERM/SIGINT (when called from the main thread)."""
        if not self.queues:
            raise RiverbedError(f"app '{self.tasks.app_name}' has no tasks and no queues to serve")
        # Connect first: an unreachable broker fails here, before any thread starts.
        self.broker.stats()
        with self._signals():
            self._pool.start()
            threads = [
                threading.Thread(target=self._stopping_on_error(self._report_loop),
                                 name="riverbed-reporter", daemon=True),
                threading.Thread(target=self._stopping_on_error(self._supervise),
                                 name="riverbed-supervisor", daemon=True),
            ]  # fmt: skip
            for thread in threads:
                thread.start()
            log.info("worker %s serving queues %s", self.id, ", ".join(self.queues))
            try:
                self._fetch_loop()
            finally:
                self._shut_down(threads)
        if self._failures:
            raise self._failures[0]

    def _stopping_on_error(self, loop: Callable[[], None]) -> Callable[[], None]:
        """``loop``, which stops the worker if it fails (its error then ends ``run``): a worker
        whose heartbeats or results had stopped would go on fetching tasks it cannot finish.
        An outage is not a failure: the loops wait it out."""

        def run() -> None:
            try:
                loop()
            except BaseException as error:
                log.exception("worker %s stops: its %s failed", self.id,
                              threading.current_thread().name)  # fmt: skip
                self._failures.append(error)
                self.stop()

        return run

    def stop(self) -> None:
        self._stopping.set()
        self.inflight.wake_fetcher()

    @contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        with handling((signal.SIGTERM, signal.SIGINT), lambda *_: self.stop()):
            yield

    def _fetch_loop(self) -> None:
        low_water = max(1, self.prefetch // 2 + (self.prefetch == 0))
        while not self._stopping.is_set():
            room = self.inflight.wait_for_room(low_water, FETCH_WAIT_S)
            if room <= 0 or self._stopping.is_set():
                continue
            messages = self._retrying(
                lambda room=room: self.broker.fetch(  # type: ignore[misc]
                    self.id, self.queues, room, self.lease_ms, FETCH_WAIT_S
                )
            )
            if messages:
                self._admit(messages)

    def _admit(self, messages: list[TaskMessage]) -> None:
        """Hand fetched tasks to the pool, first settling those that must not run now."""
        registry = self.tasks.registry
        now = now_ms()
        runnable: list[tuple[Task[Any, Any], TaskMessage]] = []
        settled = []
        for message in messages:
            task = registry.get(message.name)
            if task is None:
                known = ", ".join(sorted(registry)) or "none"
                settled.append(
                    ended(
                        message,
                        TaskState.FAILED,
                        "UnknownTaskError",
                        f"no task named {message.name!r} is registered on app "
                        f"'{self.tasks.app_name}' (registered: {known}); deploy it, then "
                        "requeue this task from the dead-letter queue",
                    )
                )
            elif message.expires_ms and message.expires_ms < now:
                settled.append(expired(message))
            else:
                runnable.append((task, message))
        if settled:
            self.inflight.report(settled)
        ready: list[tuple[Task[Any, Any], TaskMessage]] = []
        waiting: list[Outcome] = []
        for task, message in self._rate_limited(runnable):
            gathered = self._gathered(message)
            if isinstance(gathered, Outcome):
                waiting.append(gathered)
            else:
                ready.append((task, gathered))
        if waiting:
            self.inflight.report(waiting)
        if ready:
            self.inflight.add(ready)

    def _rate_limited(
        self, runnable: list[tuple[Task[Any, Any], TaskMessage]]
    ) -> list[tuple[Task[Any, Any], TaskMessage]]:
        """Keep the tasks the broker's token buckets allow now; give the rest back for later."""
        limited: dict[str, list[tuple[Task[Any, Any], TaskMessage]]] = {}
        for task, message in runnable:
            if task.settings.rate_limit is not None:
                limited.setdefault(task.name, []).append((task, message))
        if not limited:
            return runnable
        deferred: set[str] = set()
        for name, entries in limited.items():
            rate = entries[0][0].settings.rate_limit
            assert rate is not None
            granted, wait_s = self._take_tokens(name, rate, len(entries))
            later = [message.id for _, message in entries[granted:]]
            if later:
                eta = now_ms() + max(1, int(wait_s * 1000))
                self._release(later, eta)
                deferred.update(later)
        return [(task, message) for task, message in runnable if message.id not in deferred]

    def _release(self, ids: list[str], eta_ms: int = 0) -> None:
        self._retrying(lambda: self.broker.release(self.id, ids, eta_ms))

    def _take_tokens(self, name: str, rate: RateLimit, wanted: int) -> tuple[int, float]:
        def take() -> tuple[int, float]:
            granted: tuple[int, float] = self.broker.take_tokens(
                f"task:{name}", rate.per_second, rate.capacity, wanted
            )
            return granted

        return self._retrying(take)

    def _gathered(self, message: TaskMessage) -> TaskMessage | Outcome:
        """A chord callback with the list of its headers' results as its first argument; or,
        when a header has not succeeded (a callback requeued from the dead letters with its
        headers), the callback put off until they end, or failed if one cannot succeed."""
        if not message.gather:
            return message
        infos = self._retrying(lambda: self.broker.info(list(message.gather)))
        for header in message.gather:
            info = infos.get(header)
            state = None if info is None else info.state
            if state in (TaskState.QUEUED, TaskState.SCHEDULED, TaskState.RUNNING):
                later = msgspec.structs.replace(message, eta_ms=now_ms() + GATHER_WAIT_MS)
                return Outcome(later, TaskState.SCHEDULED)
            if state is not TaskState.SUCCEEDED:
                reason = "its result expired" if info is None else f"it ended {state}"
                return ended(
                    message,
                    TaskState.FAILED,
                    "ChordHeaderFailed",
                    f"header task [{header}] of the chord has no result: {reason}; requeue the "
                    "header, then this callback",
                )
        results = [infos[header].result for header in message.gather]
        return msgspec.structs.replace(
            message, payload=prepend(message.payload, results), gather=()
        )

    # Reporting

    def _report_loop(self) -> None:
        while True:
            outcomes = self.inflight.drain(0.2)
            if outcomes:
                try:
                    self.broker.finish(self.id, outcomes)
                except BrokerUnavailableError as error:
                    self.inflight.put_back(outcomes)
                    log.warning("cannot store %d outcomes, retrying: %s", len(outcomes), error)
                    time.sleep(0.5)
                    continue
                self.inflight.stored(len(outcomes))
                if self.metrics is not None:
                    self.metrics.observe(outcomes)
            elif self._stopping.is_set() and self.inflight.idle() and self._drained.is_set():
                return

    # Supervising

    def _supervise(self) -> None:
        last_extend = last_lead = last_housekeep = 0.0
        extend_every = self.lease_ms / 3000
        while not self._supervisor_done.is_set():
            now = time.monotonic()
            running = self._enforce_limits(now)
            try:
                # While tasks run, the heartbeat is also how cancels reach them: soon, then.
                every = min(extend_every, CANCEL_CHECK_S) if running else extend_every
                if now - last_extend >= every:
                    last_extend = now
                    self._extend()
                if now - last_lead >= LEADER_EVERY_S and not self._stopping.is_set():
                    last_lead = now
                    self._lead()
                if self._leading and now - last_housekeep >= HOUSEKEEP_EVERY_S:
                    last_housekeep = now
                    self.broker.housekeep()
            except BrokerUnavailableError as error:
                log.warning("broker unavailable: %s", error)
                self._supervisor_done.wait(0.5)
            self._supervisor_done.wait(SUPERVISOR_TICK_S)

    def _enforce_limits(self, now: float) -> bool:
        """Interrupt the running tasks past their time limits; whether any task runs."""
        snapshot = self.inflight.snapshot()
        for running in snapshot:
            options = running.task.settings
            elapsed = now - running.started
            if options.timeout and elapsed > options.timeout:
                if Interrupt.HARD not in running.interrupts:
                    running.interrupts.add(Interrupt.HARD)
                    self._pool.interrupt(running, Interrupt.HARD)
            elif (
                options.soft_timeout
                and elapsed > options.soft_timeout
                and Interrupt.SOFT not in running.interrupts
            ):
                running.interrupts.add(Interrupt.SOFT)
                self._pool.interrupt(running, Interrupt.SOFT)
        return bool(snapshot)

    def _extend(self) -> None:
        ids = self.inflight.held_ids()
        beat = self.broker.extend(self.id, ids, self.lease_ms)
        if beat.lost:
            dropped = self.inflight.drop(set(beat.lost))
            if dropped:
                log.warning(
                    "lost the lease of %d waiting tasks; another worker has them", len(dropped)
                )
        if beat.cancelled:
            waiting = self.inflight.drop(set(beat.cancelled))
            self.inflight.report(
                [ended(m, TaskState.CANCELLED, "TaskCancelledError", "cancelled") for m in waiting]
            )
            for running in self.inflight.snapshot():
                if (
                    running.message.id in beat.cancelled
                    and Interrupt.CANCEL not in running.interrupts
                ):
                    running.interrupts.add(Interrupt.CANCEL)
                    self._pool.interrupt(running, Interrupt.CANCEL)

    def _lead(self) -> None:
        periodic = self.tasks.schedules
        was_leading = self._leading
        self._leading = self.broker.lead(self.id, self.lease_ms)
        if not self._leading:
            return
        now = now_ms()
        if not was_leading:
            # Start from the ticks recorded by earlier leaders, or from now.
            self._ticked = {name: self.broker.last_tick(name) or now for name in periodic}
        for name, entry in periodic.items():
            for tick in entry.schedule.due_ticks(self._ticked[name], now, MISSED_TICKS_RUN):
                message = msgspec.structs.replace(
                    entry.task.message((), {}, _NO_OPTIONS),
                    eta_ms=tick,
                    key=f"periodic:{name}:{tick}",
                )
                self.broker.claim_tick(name, tick, message)
                self._ticked[name] = tick

    # Leaving

    def _shut_down(self, threads: list[threading.Thread]) -> None:
        waiting = self.inflight.drop_all_waiting()
        if waiting:
            self._release([m.id for m in waiting])
        deadline = time.monotonic() + self.shutdown_timeout
        while self.inflight.snapshot() and time.monotonic() < deadline:
            time.sleep(0.02)
        leftover = self.inflight.snapshot()
        self.inflight.close()
        if leftover:
            log.warning(
                "%d tasks still running at shutdown; giving their leases back", len(leftover)
            )
            self._release([r.message.id for r in leftover])
        self._pool.stop(1.0 if leftover else self.shutdown_timeout)
        self._drained.set()
        threads[0].join()
        self._supervisor_done.set()
        threads[1].join()
        self._retrying(lambda: self.broker.leave(self.id))

    def _retrying(self, call: Callable[[], T]) -> T:
        """Call the broker until it answers, backing off while it is unreachable."""
        delay = 0.05
        while True:
            try:
                return call()
            except BrokerUnavailableError as error:
                log.warning("broker unavailable, retrying in %.2f s: %s", delay, error)
                time.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
