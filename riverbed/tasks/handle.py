"""Handles on enqueued tasks: status, result, cancel; ``await handle`` in async code."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from riverbed.tasks.errors import (
    ResultExpiredError,
    ResultTimeoutError,
    TaskCancelledError,
    TaskExpiredError,
    TaskFailed,
)
from riverbed.tasks.messages import TaskInfo, TaskState

if TYPE_CHECKING:
    from riverbed.tasks.brokers.api import Broker
    from riverbed.tasks.calls import CallCodec

R = TypeVar("R")

# ``result()`` without a timeout waits in slices this long, so a long wait stays interruptible.
WAIT_SLICE_S = 60.0


class TaskHandle(Generic[R]):
    """A task that was enqueued: ``.id``, ``.status``, ``.result(timeout=)``, ``.cancel()``."""

    __slots__ = ("_broker", "_codec", "_enqueued_later", "_headers", "_steps_before", "id", "name")

    def __init__(
        self,
        broker: Broker,
        codec: CallCodec,
        task_id: str,
        *,
        enqueued_later: bool = False,
        steps_before: tuple[str, ...] = (),
        headers: tuple[str, ...] = (),
    ) -> None:
        """``enqueued_later``: a chain's later step or a chord's callback, which the broker
        only knows once its turn comes; ``steps_before``: a chain's steps before this, its
        last; ``headers``: a chord's, this being its callback (``cancel`` stops them)."""
        self._broker = broker
        self._codec = codec
        self._enqueued_later = enqueued_later
        self._steps_before = steps_before
        self._headers = headers
        self.id = task_id
        self.name = codec.name

    def __repr__(self) -> str:
        return f"TaskHandle({self.name}[{self.id}])"

    @property
    def status(self) -> TaskState | None:
        """The task's state now; None when the broker has no record (result expired)."""
        info = self.info()
        return None if info is None else info.state

    def info(self) -> TaskInfo | None:
        return self._broker.info([self.id]).get(self.id)

    def done(self) -> bool:
        status = self.status
        return status is None or status.finished

    def result(self, timeout: float | None = None) -> R:
        """The task's return value, waiting up to ``timeout`` seconds (None: as long as it takes).

        Raises ``TaskFailed`` (with the remote error and traceback), ``TaskCancelledError``,
        ``TaskExpiredError``, ``ResultTimeoutError`` or ``ResultExpiredError``."""
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0, got {timeout}")
        while True:
            if not self._enqueued_later and self.info() is None:
                raise ResultExpiredError(
                    f"task {self.name}[{self.id}] is unknown to the broker: its result expired "
                    "(result_ttl) or the id is wrong"
                )
            window = WAIT_SLICE_S if timeout is None else timeout
            done = self._broker.wait([self.id], window)
            if self.id in done:
                return self._outcome(done[self.id])
            if timeout is not None:
                raise ResultTimeoutError(
                    f"task {self.name}[{self.id}] did not finish within {timeout} s; "
                    "it goes on — call result() again to keep waiting"
                )

    def _outcome(self, info: TaskInfo) -> R:
        error = info.error
        if info.state is TaskState.SUCCEEDED:
            value: R = self._codec.decode_result(info.result)
            return value
        if info.state is TaskState.CANCELLED:
            raise TaskCancelledError(f"task {self.name}[{self.id}] was cancelled")
        if info.state is TaskState.EXPIRED:
            raise TaskExpiredError(f"task {self.name}[{self.id}] expired before it started")
        raise TaskFailed(
            self.id,
            info.message.name,
            error.type if error else "Error",
            error.message if error else "unknown error",
            error.traceback if error else "",
        )

    def cancel(self) -> bool:
        """Cancel the task: a queued or scheduled one never runs; a running one is interrupted
        by its worker. False if it had already finished or is unknown. A chain's handle cancels
        its step waiting or running now (the later ones then fail); a chord's, its headers
        (the callback then fails) or its callback."""
        stopping = (TaskState.CANCELLED, TaskState.RUNNING)
        if self._headers:
            states = [self._broker.cancel(task_id) for task_id in (*self._headers, self.id)]
            return any(state in stopping for state in states)
        for task_id in (*self._steps_before, self.id):
            state = self._broker.cancel(task_id)
            if state in stopping:
                return True
            if state not in (TaskState.SUCCEEDED, None):  # the chain ended there
                return False
        return False

    def __await__(self) -> Generator[Any, None, R]:
        return asyncio.to_thread(self.result).__await__()


class GroupHandle(Generic[R]):
    """The handles of a group's tasks; ``result()`` is their results in order."""

    def __init__(self, handles: list[TaskHandle[R]]) -> None:
        self.handles = handles

    def __len__(self) -> int:
        return len(self.handles)

    def result(self, timeout: float | None = None) -> list[R]:
        """Every result in order, waiting up to ``timeout`` seconds in all."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.handles:
            broker = self.handles[0]._broker
            broker.wait([handle.id for handle in self.handles],
                        WAIT_SLICE_S if timeout is None else timeout)  # fmt: skip
        return [
            handle.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
            for handle in self.handles
        ]

    def cancel(self) -> int:
        return sum(handle.cancel() for handle in self.handles)

    def __await__(self) -> Generator[Any, None, list[R]]:
        return asyncio.to_thread(self.result).__await__()
