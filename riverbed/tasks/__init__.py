"""Background tasks: ``@app.task``, ``delay``, results, retries, schedules, canvas, workers."""

from __future__ import annotations

from riverbed.tasks.brokers import DEFAULT_TASKS_URL, TASKS_URL_ENV, Broker, connect_broker
from riverbed.tasks.canvas import Chain, Chord, Group, Signature, chain, chord, group
from riverbed.tasks.errors import (
    ResultExpiredError,
    ResultTimeoutError,
    SoftTimeLimitExceeded,
    TaskArgumentsError,
    TaskCancelledError,
    TaskError,
    TaskExpiredError,
    TaskFailed,
    TimeLimitExceeded,
    UnknownTaskError,
)
from riverbed.tasks.handle import GroupHandle, TaskHandle
from riverbed.tasks.messages import TaskInfo, TaskState
from riverbed.tasks.registry import Tasks
from riverbed.tasks.task import Task
from riverbed.tasks.worker.execution import TaskContext, current_task

__all__ = [
    "DEFAULT_TASKS_URL",
    "TASKS_URL_ENV",
    "Broker",
    "Chain",
    "Chord",
    "Group",
    "GroupHandle",
    "ResultExpiredError",
    "ResultTimeoutError",
    "Signature",
    "SoftTimeLimitExceeded",
    "Task",
    "TaskArgumentsError",
    "TaskCancelledError",
    "TaskContext",
    "TaskError",
    "TaskExpiredError",
    "TaskFailed",
    "TaskHandle",
    "TaskInfo",
    "TaskState",
    "Tasks",
    "TimeLimitExceeded",
    "UnknownTaskError",
    "chain",
    "chord",
    "connect_broker",
    "current_task",
    "group",
]
