"""The task layer's exceptions. Each message names the task, the problem and the fix."""

from __future__ import annotations

from riverbed.errors import RiverbedError
from riverbed.log.errors import BrokerUnavailableError as ServerUnavailableError


class TaskError(RiverbedError):
    """Base class of the task layer's errors."""


class TaskArgumentsError(TaskError, TypeError):
    """``delay`` was given arguments the task's wire format (msgpack) cannot carry."""


class TaskFailed(TaskError):  # noqa: N818 - the name the issue and Celery users know
    """The task ran and failed for good; carries the remote error's type, message and traceback."""

    def __init__(self, task_id: str, name: str, error_type: str, message: str, traceback: str):
        super().__init__(f"task {name}[{task_id}] failed: {error_type}: {message}")
        self.task_id = task_id
        self.name = name
        self.error_type = error_type
        self.message = message
        self.traceback = traceback


class TaskCancelledError(TaskError):
    """The task was cancelled before it finished (``handle.cancel()``)."""


class TaskExpiredError(TaskError):
    """The task was not started before its ``expires`` time, so it never ran."""


class ResultTimeoutError(TaskError, TimeoutError):
    """``result(timeout=)`` ran out before the task finished; the task itself goes on."""


class ResultExpiredError(TaskError, LookupError):
    """The broker has no record of the task: its result expired (TTL) or the id is unknown."""


class SoftTimeLimitExceeded(TaskError):  # noqa: N818 - Celery's name
    """Raised inside a running task when its ``soft_timeout`` passes, so it can clean up."""


class TimeLimitExceeded(TaskError):  # noqa: N818 - Celery's name
    """A task ran past its hard ``timeout``: the process running it was killed and replaced."""


class UnknownTaskError(TaskError, LookupError):
    """A worker fetched a task whose name no task of its app is registered under."""


class BrokerUnavailableError(TaskError, ServerUnavailableError):
    """The task broker cannot be reached (``riverbed.BrokerUnavailableError`` catches it too)."""
