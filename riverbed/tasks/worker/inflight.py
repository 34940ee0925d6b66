"""The tasks a worker holds: fetched and waiting for a slot, or running; and their outcomes.

Pool threads take from here and hand back what happened; the fetch loop waits here for room; the
reporter drains outcomes in batches; the supervisor reads start times (time limits) and ids
(lease extension). One lock guards it all: every operation is a few dict and deque steps.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from riverbed.tasks.errors import TimeLimitExceeded
from riverbed.tasks.messages import Outcome, TaskMessage, TaskState, now_ms
from riverbed.tasks.task import Task
from riverbed.tasks.worker.execution import Executed, ended, expired, failure, outcome_for


class Interrupt(Enum):
    SOFT = "soft time limit"
    HARD = "time limit"
    CANCEL = "cancel"


@dataclass
class Running:
    task: Task[Any, Any]
    message: TaskMessage
    started: float
    slot: object = None  # what runs it: a thread ident, an asyncio task, a child process
    interrupts: set[Interrupt] = field(default_factory=set)


@dataclass
class Counts:
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    cancelled: int = 0


class Inflight:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity  # most tasks held at once: running plus waiting
        self.ready: deque[tuple[Task[Any, Any], TaskMessage]] = deque()
        self.running: dict[str, Running] = {}
        self.outcomes: list[Outcome] = []
        self.unstored = 0  # outcomes the reporter took and the broker has not yet stored
        self.counts = Counts()
        self.closed = False  # no more tasks to take: pool threads leave
        self._lock = threading.Lock()
        self.work = threading.Condition(self._lock)  # ready gained tasks, or closed
        self.room = threading.Condition(self._lock)  # a task finished: room to fetch
        self.reported = threading.Condition(self._lock)  # outcomes to report

    # The fetch loop

    def held(self) -> int:
        with self._lock:
            return self._held_locked()

    def wait_for_room(self, low_water: int, timeout: float) -> int:
        """How many more tasks may be fetched, once fewer than ``low_water`` wait for a slot.

        A task counts until its outcome is stored: a worker killed with outcomes not yet
        reported has them run again, so those are bounded by the capacity too."""
        with self._lock:
            self.room.wait_for(
                lambda: (
                    (len(self.ready) < low_water and self._held_locked() < self.capacity)
                    or self.closed
                ),
                timeout,
            )
            return self.capacity - self._held_locked()

    def _held_locked(self) -> int:
        return len(self.ready) + len(self.running) + len(self.outcomes) + self.unstored

    def wake_fetcher(self) -> None:
        with self._lock:
            self.room.notify_all()

    def add(self, tasks: list[tuple[Task[Any, Any], TaskMessage]]) -> None:
        with self._lock:
            self.ready.extend(tasks)
            self.work.notify(len(tasks))

    def report(self, outcomes: list[Outcome]) -> None:
        """Outcomes decided without running the task (expired, unknown, cancelled early)."""
        with self._lock:
            self._report(outcomes)

    # Pool threads

    def take(self, slot: object, timeout: float | None = None) -> Running | None:
        """The next task to run, marked running in ``slot``; None once closed."""
        with self._lock:
            while True:
                if not self.work.wait_for(lambda: self.ready or self.closed, timeout):
                    return None
                if not self.ready:
                    return None
                task, message = self.ready.popleft()
                # Checked again as it starts: it may have waited here past its expiry.
                if not message.expires_ms or message.expires_ms >= now_ms():
                    break
                self._report([expired(message)])
                self.room.notify()
            running = Running(task, message, time.monotonic(), slot)
            self.running[message.id] = running
            return running

    def finish(self, running: Running, executed: Executed) -> None:
        """Record what running a task produced (ignored once the supervisor already settled it,
        after a hard time limit)."""
        message = running.message
        with self._lock:
            if self.running.get(message.id) is not running:
                return
            del self.running[message.id]
            if Interrupt.CANCEL in running.interrupts:
                outcome = ended(message, TaskState.CANCELLED, "TaskCancelledError", "cancelled")
            else:
                outcome = outcome_for(message, running.task.settings, executed)
            self._report([outcome])
            self.room.notify()

    def settle(self, running: Running, reason: Interrupt) -> None:
        """Decide a running task's outcome without it (hard limit or cancel of a slot that cannot
        be interrupted gently): the slot is being killed or abandoned."""
        message = running.message
        with self._lock:
            if self.running.get(message.id) is not running:
                return
            del self.running[message.id]
            if reason is Interrupt.CANCEL:
                outcome = ended(message, TaskState.CANCELLED, "TaskCancelledError", "cancelled")
            else:
                limit = running.task.settings.timeout
                error = TimeLimitExceeded(f"task {message.name}[{message.id}] ran past {limit} s")
                outcome = outcome_for(
                    message, running.task.settings, failure(error, running.task.settings)
                )
            self._report([outcome])
            self.room.notify()

    def _report(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            state = outcome.state
            if state is TaskState.SUCCEEDED:
                self.counts.succeeded += 1
            elif state is TaskState.SCHEDULED:
                self.counts.retried += 1
            elif state is TaskState.CANCELLED:
                self.counts.cancelled += 1
            else:
                self.counts.failed += 1
        self.outcomes.extend(outcomes)
        self.reported.notify()

    # The reporter

    def drain(self, timeout: float) -> list[Outcome]:
        with self._lock:
            self.reported.wait_for(lambda: self.outcomes, timeout)
            outcomes, self.outcomes = self.outcomes, []
            self.unstored += len(outcomes)
            return outcomes

    def stored(self, count: int) -> None:
        """The broker stored ``count`` drained outcomes: their room is free."""
        with self._lock:
            self.unstored -= count
            self.room.notify()

    def put_back(self, outcomes: list[Outcome]) -> None:
        """Outcomes the broker could not take now; reported again on the next round."""
        with self._lock:
            self.unstored -= len(outcomes)
            self.outcomes[:0] = outcomes

    # The supervisor

    def held_ids(self) -> list[str]:
        with self._lock:
            return [m.id for _, m in self.ready] + list(self.running)

    def snapshot(self) -> list[Running]:
        with self._lock:
            return list(self.running.values())

    def drop(self, ids: set[str]) -> list[TaskMessage]:
        """Remove waiting tasks (lost leases, cancelled, shutdown); return those removed."""
        with self._lock:
            kept: deque[tuple[Task[Any, Any], TaskMessage]] = deque()
            dropped: list[TaskMessage] = []
            for task, message in self.ready:
                if message.id in ids:
                    dropped.append(message)
                else:
                    kept.append((task, message))
            self.ready = kept
            if dropped:
                self.room.notify()
            return dropped

    def drop_all_waiting(self) -> list[TaskMessage]:
        with self._lock:
            dropped = [message for _, message in self.ready]
            self.ready.clear()
            return dropped

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self.work.notify_all()
            self.room.notify_all()

    def idle(self) -> bool:
        with self._lock:
            return not self.running and not self.outcomes and not self.unstored
