"""What brokers store and move: task messages, their states, and what a worker reports back.

Messages are msgspec Structs encoded as msgpack arrays: compact, and decoded without a schema
lookup. A task's arguments travel as one msgpack blob, ``[args, kwargs]``, encoded once by
``delay`` and decoded once by the worker.
"""

from __future__ import annotations

import time
from enum import StrEnum

import msgspec

from riverbed.ids import random_id

DEFAULT_QUEUE = "default"
MIN_PRIORITY = 0
MAX_PRIORITY = 9


class TaskState(StrEnum):
    QUEUED = "queued"  # waiting in its queue
    SCHEDULED = "scheduled"  # waiting for its eta: a countdown, an eta or a retry's backoff
    RUNNING = "running"  # leased by a worker, which extends the lease while it runs
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # failed for good; kept in the dead-letter queue
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # not started before its ``expires`` time

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset(
    {TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.EXPIRED}
)


class ErrorInfo(msgspec.Struct, array_like=True, frozen=True):
    """The last error of a task: exception type name, message and formatted traceback."""

    type: str
    message: str
    traceback: str = ""


class TaskMessage(msgspec.Struct, array_like=True, frozen=True):
    """One task to run. ``payload`` is the msgpack of ``[args, kwargs]``."""

    id: str
    name: str
    payload: bytes
    queue: str = DEFAULT_QUEUE
    priority: int = MIN_PRIORITY
    eta_ms: int = 0  # not before this epoch ms (0: now)
    expires_ms: int = 0  # not started after this epoch ms (0: never)
    key: str = ""  # idempotency key: a second enqueue within the key's TTL returns this id
    attempt: int = 0  # failures retried so far
    link: tuple[TaskMessage, ...] = ()  # a chain's next steps; each gets the result prepended
    chord: str = ""  # the chord this task is a header of
    gather: tuple[str, ...] = ()  # a chord callback: header ids whose results are prepended
    correlation_id: str = ""
    parent_id: str = ""
    enqueued_ms: int = 0
    # A chain's later step: its countdown and its expiry in seconds, counted from when the step
    # before it succeeds (then made eta_ms and expires_ms).
    countdown_ms: int = 0
    expires_after_ms: int = 0

    @property
    def due(self) -> bool:
        return self.eta_ms <= now_ms()


class ChordSpec(msgspec.Struct, array_like=True, frozen=True):
    """A chord's callback, enqueued by the broker when its last header task succeeds."""

    id: str
    size: int
    callback: TaskMessage


class Outcome(msgspec.Struct, frozen=True):
    """What a worker reports for a task it leased.

    ``state`` SUCCEEDED carries ``result`` (msgpack) and ``follow_ups`` (a chain's next task),
    stored atomically with it; SCHEDULED is a retry, ``message`` being the retried message (attempt
    and eta updated); FAILED, CANCELLED and EXPIRED carry ``error``."""

    message: TaskMessage
    state: TaskState
    result: bytes = b""
    error: ErrorInfo | None = None
    follow_ups: tuple[TaskMessage, ...] = ()


class TaskInfo(msgspec.Struct, frozen=True):
    """What a broker knows of one task (``inspect``, ``list``, results)."""

    message: TaskMessage
    state: TaskState
    worker: str = ""
    started_ms: int = 0
    finished_ms: int = 0
    result: bytes = b""
    error: ErrorInfo | None = None
    cancel_requested: bool = False

    @property
    def id(self) -> str:
        return self.message.id


class Heartbeat(msgspec.Struct, frozen=True):
    """A broker's answer to a lease extension: tasks to interrupt, tasks no longer ours."""

    cancelled: frozenset[str] = frozenset()
    lost: frozenset[str] = frozenset()


class QueueStats(msgspec.Struct, frozen=True):
    queued: int = 0
    scheduled: int = 0
    running: int = 0


class BrokerStats(msgspec.Struct, frozen=True):
    queues: dict[str, QueueStats]
    dead: int
    workers: list[str]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_task_id() -> str:
    return random_id()


ENCODER = msgspec.msgpack.Encoder()
MESSAGE_DECODER = msgspec.msgpack.Decoder(TaskMessage)
