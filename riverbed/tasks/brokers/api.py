"""The broker contract both brokers implement and one conformance suite checks.

Every operation is atomic on the broker (one SQLite transaction, one Redis Lua script or MULTI),
so a crash between two calls loses nothing: a task is always in exactly one place — its queue, the
scheduled set, leased to one worker, finished, or dead. Calls take lists: workers fetch, extend and
finish in batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import msgspec

from riverbed.errors import InvalidUrlError
from riverbed.tasks.messages import (
    ENCODER,
    MESSAGE_DECODER,
    BrokerStats,
    ChordSpec,
    ErrorInfo,
    Heartbeat,
    Outcome,
    TaskInfo,
    TaskMessage,
    TaskState,
)

logger = logging.getLogger(__name__)

DEFAULT_RESULT_TTL_S = 86_400.0
DEFAULT_DEAD_TTL_S = 7 * 86_400.0
# A worker unseen for this long is left out of ``stats``.
WORKER_SEEN_MS = 60_000
CANCELLED_BEFORE_START = ErrorInfo("TaskCancelledError", "cancelled before it started")
PURGED_BEFORE_START = ErrorInfo("TaskPurgedError", "purged from its queue before it started")
CHORD_HEADER_PURGED = ErrorInfo(
    "ChordHeaderFailed", "a header task of the chord was purged before it ran"
)
CANCELLED_BEFORE_RETRY = ErrorInfo("TaskCancelledError", "cancelled while running; not retried")
CANCELLED_AFTER_LEASE = ErrorInfo(
    "TaskCancelledError", "cancelled while running; its worker went away before interrupting it"
)


def chord_failure(header: TaskMessage, state: str, error: ErrorInfo | None) -> ErrorInfo:
    """The error of a chord's callback that cannot run because ``header`` did not succeed."""
    return ErrorInfo(
        "ChordHeaderFailed",
        f"header task {header.name}[{header.id}] of chord {header.chord} ended {state}"
        + (f": {error.message}" if error is not None else ""),
    )


def chain_failure(step: TaskMessage, state: str, error: ErrorInfo | None) -> ErrorInfo:
    """The error of a chain's later step that cannot run because ``step`` did not succeed."""
    return ErrorInfo(
        "ChainStepFailed",
        f"step {step.name}[{step.id}] of its chain ended {state}"
        + (f": {error.message}" if error is not None else ""),
    )


UNDECODABLE_SHOWN = 2000  # bytes of an undecodable message its dead letter keeps


def undecodable(raw: bytes, error: Exception) -> ErrorInfo:
    """The dead letter's error for a stored message that does not decode (written by another
    version of riverbed, say), with its bytes."""
    return ErrorInfo(
        "UndecodableTaskError",
        f"its stored message does not decode: {error}",
        f"stored message: {raw[:UNDECODABLE_SHOWN]!r}",
    )


def stand_in(task_id: str, name: str) -> bytes:
    """A message to store in place of one that does not decode, so the dead letter lists and
    inspects; named so that a requeue runs nothing (no task has that name)."""
    return ENCODER.encode(TaskMessage(id=task_id, name=f"{name} (undecodable)", payload=b""))


def id_and_name(raw: bytes) -> tuple[str, str] | None:
    """The id and task name of a message that does not decode, if that much of it reads."""
    try:
        fields = msgspec.msgpack.decode(raw)
    except msgspec.DecodeError:
        return None
    if not (isinstance(fields, list) and fields and type(fields[0]) is str):
        return None
    return fields[0], fields[1] if len(fields) > 1 and type(fields[1]) is str else "?"


def decoded_messages(
    raws: Iterable[bytes], undecodable: Callable[[bytes, msgspec.DecodeError], None]
) -> list[TaskMessage]:
    """The stored messages that decode; ``undecodable(raw, error)`` hears of each that does not
    (stored by another version of riverbed, say), which is left out."""
    messages = []
    for raw in raws:
        try:
            messages.append(MESSAGE_DECODER.decode(raw))
        except msgspec.DecodeError as error:
            undecodable(raw, error)
    return messages


def purged_messages(raws: Iterable[bytes]) -> list[TaskMessage]:
    """The purged messages that decode, for their chains and chords to be failed. One that does
    not is purged all the same: the chain or chord it was part of cannot be read, so that is
    logged instead of stopping the purge."""
    return decoded_messages(raws, _log_purged)


def _log_purged(raw: bytes, error: msgspec.DecodeError) -> None:
    found = id_and_name(raw)
    logger.warning(
        "purged task %s, whose message does not decode (%s): a chain or chord it was part of "
        "is left waiting", f"{found[0]} ({found[1]})" if found else "?", error,
    )  # fmt: skip


def never_ran_in_chain(error: ErrorInfo | None) -> bool:
    """Whether a dead letter is a chain's later step that never ran: requeued alone, it would
    run without the result of the step before it (that step's requeue runs it)."""
    return error is not None and error.type == "ChainStepFailed"


# Options both brokers accept in their URL (seconds).
COMMON_OPTIONS = {"result_ttl": str(DEFAULT_RESULT_TTL_S), "dead_ttl": str(DEFAULT_DEAD_TTL_S)}


def ttl_options(raw_url: str, options: dict[str, str]) -> tuple[int, int]:
    """``result_ttl`` and ``dead_ttl`` from a broker URL's options, in milliseconds."""
    return tuple(_seconds_option(raw_url, options, name) for name in ("result_ttl", "dead_ttl"))  # type: ignore[return-value]


# A TTL's bounds: a millisecond (less would expire a result as it is stored), and a century
# (longer overflows Redis's expiry times).
MIN_TTL_S = 0.001
MAX_TTL_S = 100 * 365 * 86_400


def _seconds_option(raw_url: str, options: dict[str, str], name: str) -> int:
    try:
        seconds = float(options[name])
    except ValueError:
        seconds = -1.0
    if not MIN_TTL_S <= seconds <= MAX_TTL_S:
        raise InvalidUrlError(
            f"{name}={options[name]!r} in {raw_url!r}: give a number of seconds from "
            f"{MIN_TTL_S} to {MAX_TTL_S:,} (a century)"
        )
    return int(seconds * 1000)


class Broker(Protocol):
    url: str
    result_ttl_ms: int  # finished tasks and idempotency keys are kept this long
    dead_ttl_ms: int  # dead letters are kept this long

    def enqueue(self, messages: Sequence[TaskMessage], chord: ChordSpec | None = None) -> list[str]:
        """Store the tasks (queued, or scheduled when their eta is ahead); return their ids in
        order. A message whose idempotency key is taken is not stored: its entry is the id
        that holds the key. ``chord``: the callback to enqueue when these (its headers) all
        succeed."""
        ...

    def fetch(
        self, worker: str, queues: Sequence[str], limit: int, lease_ms: int, timeout: float = 0.0
    ) -> list[TaskMessage]:
        """Lease up to ``limit`` queued tasks of ``queues``, highest priority first, then oldest.

        First moves due scheduled tasks to their queues and requeues tasks whose lease ran out.
        When none is ready, blocks up to ``timeout`` seconds for one (woken by the enqueue, or by
        the next scheduled task falling due — not by sleeping in fixed steps on Redis; SQLite
        watches ``PRAGMA data_version``). On Redis, an enqueue wakes one blocked fetcher, and a
        fetch that leaves tasks behind wakes the next, so idle workers join in turn."""
        ...

    def extend(self, worker: str, ids: Sequence[str], lease_ms: int) -> Heartbeat:
        """Extend this worker's leases; say which tasks were cancelled, and which it lost."""
        ...

    def finish(self, worker: str, outcomes: Sequence[Outcome]) -> None:
        """Store outcomes of tasks this worker leases; an outcome for a lost lease is ignored."""
        ...

    def release(self, worker: str, ids: Sequence[str], eta_ms: int = 0) -> None:
        """Give leased, unstarted tasks back: to their queue, or scheduled at ``eta_ms``."""
        ...

    def info(self, ids: Sequence[str]) -> dict[str, TaskInfo]:
        """What the broker knows of these ids; unknown or expired ids are absent."""
        ...

    def wait(self, ids: Sequence[str], timeout: float) -> dict[str, TaskInfo]:
        """Block until every id is finished, or ``timeout`` seconds pass; return the finished
        ones. An unknown id is waited for too: a chain's later step or a chord's callback is
        enqueued only when its turn comes. Wakes on the broker's notification, not by sleeping
        in fixed steps (SQLite watches ``PRAGMA data_version``)."""
        ...

    def cancel(self, task_id: str) -> TaskState | None:
        """Cancel a queued or scheduled task (-> CANCELLED), or ask a running one's worker to
        interrupt it (-> RUNNING, cancel requested). None: unknown id; a finished state: too
        late."""
        ...

    def list_tasks(
        self, state: TaskState | None = None, queue: str | None = None, limit: int = 100
    ) -> list[TaskInfo]: ...

    def dead(self, limit: int = 100) -> list[TaskInfo]:
        """The dead-letter queue: failed tasks with their args, last error and traceback."""
        ...

    def requeue(self, ids: Sequence[str] | None = None) -> list[str]:
        """Move dead tasks (all when ``ids`` is None) back to their queues with attempts reset."""
        ...

    def purge(self, queue: str) -> int:
        """Delete the queue's queued and scheduled tasks; return how many."""
        ...

    def stats(self) -> BrokerStats: ...

    def take_tokens(
        self, name: str, rate: float, capacity: float, wanted: int
    ) -> tuple[int, float]:
        """Take up to ``wanted`` tokens from the bucket ``name`` (refilled at ``rate`` per second,
        holding at most ``capacity``); return how many were granted and the seconds until the
        next token."""
        ...

    def lead(self, worker: str, ttl_ms: int) -> bool:
        """Take or renew the leader lease; True while ``worker`` holds it."""
        ...

    def leave(self, worker: str) -> None:
        """The worker stops: it gives the leader lease up if it holds it, and ``stats`` lists it
        no longer."""
        ...

    def claim_tick(self, schedule: str, tick_ms: int, message: TaskMessage) -> bool:
        """Enqueue ``message`` if ``tick_ms`` is later than the schedule's last tick, and record
        it as the last tick, atomically: one run per tick whoever leads."""
        ...

    def last_tick(self, schedule: str) -> int: ...

    def housekeep(self) -> None:
        """Drop what has outlived its TTL (a no-op where the store expires keys itself)."""
        ...

    def footprint(self) -> int:
        """How many rows (SQLite) or keys (Redis) the broker holds: tests check it returns to
        its baseline once results expire."""
        ...

    def close(self) -> None: ...
