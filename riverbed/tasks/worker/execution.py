"""Running one task and turning what happened into the outcome the broker stores.

``execute`` runs where the task runs (a pool thread, the event loop, a child process) and returns
a picklable ``Executed``; ``outcome_for`` runs in the worker and decides success, retry or
dead letter, and builds a chain's next step.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import traceback
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import msgspec

from riverbed.tasks.calls import encode_value, prepend
from riverbed.tasks.messages import ErrorInfo, Outcome, TaskMessage, TaskState, now_ms
from riverbed.tasks.task import Task, TaskOptions


@dataclass(frozen=True)
class TaskContext:
    """What a running task can know about itself: ``riverbed.current_task()``."""

    id: str
    name: str
    attempt: int  # failures retried so far
    scheduled_ms: int  # its eta (for periodic tasks, the tick), or 0 if it had none


_current: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar(
    "riverbed_current_task", default=None
)


def current_task() -> TaskContext | None:
    """The task running in this thread or coroutine, or None outside tasks."""
    return _current.get()


class Executed(msgspec.Struct, array_like=True, frozen=True):
    """What running a task produced: its result (msgpack), or its error and whether the task's
    ``retry_on`` covers it."""

    ok: bool
    result: bytes = b""
    error: ErrorInfo | None = None
    retryable: bool = False


_loops = threading.local()


def _run_coroutine(awaitable: Awaitable[Any]) -> Any:
    """Run a coroutine on this thread's own event loop, kept between tasks."""
    loop: asyncio.AbstractEventLoop | None = getattr(_loops, "loop", None)
    if loop is None:
        loop = _loops.loop = asyncio.new_event_loop()
    return loop.run_until_complete(_awaited(awaitable))


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def execute(task: Task[Any, Any], message: TaskMessage) -> Executed:
    """Run ``task`` on ``message``'s arguments here and now; async tasks on this thread's loop."""
    token = _current.set(_context(message))
    try:
        try:
            args, kwargs = task.codec.decode(message.payload)
        except msgspec.MsgspecError as error:
            return undecodable(task, error)
        value = task.fn(*args, **kwargs)
        if task.is_async:
            value = _run_coroutine(value)
        return Executed(True, encode_value(f"the result of task {task.name}", value))
    except BaseException as error:
        if isinstance(error, KeyboardInterrupt | SystemExit):
            raise
        return failure(error, task.settings)
    finally:
        _current.reset(token)


async def execute_async(task: Task[Any, Any], message: TaskMessage) -> Executed:
    """Run ``task`` in the running event loop; a plain ``def`` runs in a thread."""
    token = _current.set(_context(message))
    try:
        try:
            args, kwargs = task.codec.decode(message.payload)
        except msgspec.MsgspecError as error:
            return undecodable(task, error)
        if task.is_async:
            value = await task.fn(*args, **kwargs)
        else:
            value = await asyncio.to_thread(
                contextvars.copy_context().run, task.fn, *args, **kwargs
            )
        return Executed(True, encode_value(f"the result of task {task.name}", value))
    except Exception as error:
        return failure(error, task.settings)
    finally:
        _current.reset(token)


def _context(message: TaskMessage) -> TaskContext:
    return TaskContext(message.id, message.name, message.attempt, message.eta_ms)


def undecodable(task: Task[Any, Any], error: msgspec.MsgspecError) -> Executed:
    """Arguments that do not fit the task's signature: no retry makes them fit."""
    return Executed(
        False,
        error=ErrorInfo(
            "TaskArgumentsError",
            f"the arguments do not match task {task.name}'s signature: {error}; fix the caller, "
            "then requeue the task from the dead-letter queue",
        ),
    )


def failure(error: BaseException, options: TaskOptions | None) -> Executed:
    info = ErrorInfo(
        type(error).__qualname__,
        str(error),
        "".join(traceback.format_exception(error)),
    )
    retryable = options is not None and isinstance(error, options.retry_on)
    return Executed(False, error=info, retryable=retryable)


def outcome_for(message: TaskMessage, options: TaskOptions, executed: Executed) -> Outcome:
    """Success (with a chain's next step), a retry after backoff, or failure for good."""
    if executed.ok:
        follow_ups: tuple[TaskMessage, ...] = ()
        if message.link:
            step, *later = message.link
            now = now_ms()
            follow_ups = (
                msgspec.structs.replace(
                    step,
                    payload=prepend(step.payload, executed.result),
                    link=tuple(later),
                    correlation_id=message.correlation_id or message.id,
                    parent_id=message.id,
                    enqueued_ms=now,
                    eta_ms=now + step.countdown_ms if step.countdown_ms else step.eta_ms,
                    expires_ms=(
                        now + step.expires_after_ms if step.expires_after_ms else step.expires_ms
                    ),
                    countdown_ms=0,
                    expires_after_ms=0,
                ),
            )
        return Outcome(message, TaskState.SUCCEEDED, executed.result, follow_ups=follow_ups)
    if executed.retryable and message.attempt < options.retries:
        attempt = message.attempt + 1
        retried = msgspec.structs.replace(
            message,
            attempt=attempt,
            eta_ms=now_ms() + int(options.backoff.delay(attempt) * 1000),
        )
        return Outcome(retried, TaskState.SCHEDULED, error=executed.error)
    return Outcome(message, TaskState.FAILED, error=executed.error)


def expired(message: TaskMessage) -> Outcome:
    return ended(message, TaskState.EXPIRED, "TaskExpiredError", "expired before it started")


def ended(message: TaskMessage, state: TaskState, error_type: str, text: str) -> Outcome:
    """An outcome decided by the worker, not by running the task: cancelled, expired, unknown."""
    return Outcome(message, state, error=ErrorInfo(error_type, text))
