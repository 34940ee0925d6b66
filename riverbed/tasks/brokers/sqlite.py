"""The embedded task broker: one SQLite file in WAL mode, shared by every process on the machine.

Each broker call is one ``BEGIN IMMEDIATE`` transaction, so a task is in exactly one state at any
moment and a crash loses nothing. One ``tasks`` row per task; ``due_ms`` is the time that matters
in its state — the eta while scheduled, the lease deadline while running, the expiry once finished —
so one index finds due tasks, lapsed leases and expired results alike. Waiting (for work, for
results) watches ``PRAGMA data_version``, which changes when another connection commits and costs a
few microseconds to read.
"""

from __future__ import annotations

import heapq
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import msgspec

from riverbed.errors import RiverbedError
from riverbed.log.sqlite.store import write_transaction
from riverbed.sqlite_file import SqliteFile, synchronous_option
from riverbed.tasks.brokers.api import (
    CANCELLED_AFTER_LEASE,
    CANCELLED_BEFORE_RETRY,
    CANCELLED_BEFORE_START,
    CHORD_HEADER_PURGED,
    COMMON_OPTIONS,
    PURGED_BEFORE_START,
    WORKER_SEEN_MS,
    chain_failure,
    chord_failure,
    never_ran_in_chain,
    purged_messages,
    stand_in,
    ttl_options,
    undecodable,
)
from riverbed.tasks.errors import BrokerUnavailableError
from riverbed.tasks.messages import (
    ENCODER,
    FINISHED,
    MESSAGE_DECODER,
    BrokerStats,
    ChordSpec,
    ErrorInfo,
    Heartbeat,
    Outcome,
    QueueStats,
    TaskInfo,
    TaskMessage,
    TaskState,
    now_ms,
)
from riverbed.urls import BackendUrl

SCHEMA_VERSION = 1
# How often a waiting call looks for commits by other processes.
POLL_S = 0.0005
LEADER_LEASE = "leader"
# An idempotency key's expiry while its task has not finished: it holds until then, and for the
# result's TTL after.
KEY_HELD = 2**62

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    due_ms INTEGER NOT NULL,
    message BLOB NOT NULL,
    worker TEXT,
    started_ms INTEGER NOT NULL DEFAULT 0,
    finished_ms INTEGER NOT NULL DEFAULT 0,
    result BLOB,
    error BLOB,
    cancel INTEGER NOT NULL DEFAULT 0
)
    """,
    # A fetch reads one queue's head in order straight off this index.
    """
CREATE INDEX IF NOT EXISTS tasks_ready ON tasks (queue, priority DESC, seq) WHERE state = 'queued'
    """,
    """
CREATE INDEX IF NOT EXISTS tasks_due ON tasks (state, due_ms)
    """,
    """
CREATE TABLE IF NOT EXISTS task_keys (
    key TEXT PRIMARY KEY,
    task_id TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID
    """,
    """
CREATE TABLE IF NOT EXISTS chords (
    chord_id TEXT PRIMARY KEY,
    remaining INTEGER NOT NULL,
    callback BLOB NOT NULL
) WITHOUT ROWID
    """,
    """
CREATE TABLE IF NOT EXISTS buckets (
    name TEXT PRIMARY KEY,
    tokens REAL NOT NULL,
    updated_ms INTEGER NOT NULL
) WITHOUT ROWID
    """,
    """
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until_ms INTEGER NOT NULL
) WITHOUT ROWID
    """,
    """
CREATE TABLE IF NOT EXISTS ticks (
    schedule TEXT PRIMARY KEY,
    tick_ms INTEGER NOT NULL
) WITHOUT ROWID
    """,
    """
CREATE TABLE IF NOT EXISTS workers (
    worker TEXT PRIMARY KEY,
    seen_ms INTEGER NOT NULL
) WITHOUT ROWID
    """,
)

_ERROR_DECODER = msgspec.msgpack.Decoder(ErrorInfo)
# A chain's later step recorded as failed without running: forgotten when its step before runs
# again (requeued), and so that step can enqueue it (succeeded).
_FORGET_NEVER_RUN = "DELETE FROM tasks WHERE id = ? AND state = 'failed' AND started_ms = 0"
_FINISHED_STATES = tuple(state.value for state in FINISHED)
_INFO_COLUMNS = "message, state, worker, started_ms, finished_ms, result, error, cancel"


class SqliteBroker:
    """``sqlite:///path/tasks.db?result_ttl=86400&dead_ttl=604800&fsync=normal``."""

    def __init__(self, url: BackendUrl, create: bool = True) -> None:
        options = url.pop_options({**COMMON_OPTIONS, "fsync": "normal"})
        self.url = url.raw
        self.result_ttl_ms, self.dead_ttl_ms = ttl_options(url.shown, options)
        self.path = Path(url.location)
        if not create and not self.path.exists():
            raise RiverbedError(
                f"no task database at {str(self.path)!r}: the file does not exist; check the "
                "tasks URL (a worker or the first enqueue makes it)"
            )
        self._file = SqliteFile(self.path, synchronous_option(url, options), "task database")
        try:
            self._file.create_schema(SCHEMA, SCHEMA_VERSION)
        except (sqlite3.DatabaseError, OSError) as error:
            raise BrokerUnavailableError(
                f"cannot open the task database {str(self.path)!r}: {error}"
            ) from error

    @property
    def _conn(self) -> sqlite3.Connection:
        """This thread's connection: workers call from their pool threads."""
        return self._file.conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with write_transaction(self._conn) as conn:
            yield conn

    def _data_version(self) -> int:
        version: int = self._conn.execute("PRAGMA data_version").fetchone()[0]
        return version

    # Enqueueing

    def enqueue(self, messages: Sequence[TaskMessage], chord: ChordSpec | None = None) -> list[str]:
        now = now_ms()
        with self._write() as conn:
            ids = self._insert(conn, messages, now)
            if chord is not None:
                conn.execute(
                    "INSERT INTO chords (chord_id, remaining, callback) VALUES (?, ?, ?)",
                    (chord.id, chord.size, ENCODER.encode(chord.callback)),
                )
        return ids

    def _insert(
        self, conn: sqlite3.Connection, messages: Iterable[TaskMessage], now: int
    ) -> list[str]:
        ids: list[str] = []
        rows: list[tuple[object, ...]] = []
        for message in messages:
            if message.key:
                held = conn.execute(
                    "SELECT task_id FROM task_keys WHERE key = ? AND expires_ms > ?",
                    (message.key, now),
                ).fetchone()
                if held is not None:
                    ids.append(held[0])
                    continue
                conn.execute(
                    "INSERT OR REPLACE INTO task_keys (key, task_id, expires_ms) VALUES (?, ?, ?)",
                    (message.key, message.id, KEY_HELD),  # until the task finishes
                )
            ids.append(message.id)
            scheduled = message.eta_ms > now
            rows.append(
                (
                    message.id,
                    message.name,
                    message.queue,
                    message.priority,
                    TaskState.SCHEDULED if scheduled else TaskState.QUEUED,
                    message.eta_ms if scheduled else 0,
                    ENCODER.encode(message),
                )
            )
        # An id already stored is a retried call: left as it is.
        conn.executemany(
            "INSERT OR IGNORE INTO tasks (id, name, queue, priority, state, due_ms, message) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        return ids

    # Leasing

    def fetch(
        self, worker: str, queues: Sequence[str], limit: int, lease_ms: int, timeout: float = 0.0
    ) -> list[TaskMessage]:
        deadline = time.monotonic() + timeout
        while True:
            version = self._data_version()
            leased = self._lease(worker, queues, limit, lease_ms)
            if leased or time.monotonic() >= deadline:
                return leased
            next_due = self._next_due_ms()
            while self._data_version() == version:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (next_due and now_ms() >= next_due):
                    break
                time.sleep(min(POLL_S, remaining))

    def _next_due_ms(self) -> int:
        row = self._conn.execute(
            "SELECT MIN(due_ms) FROM tasks WHERE state IN ('scheduled', 'running')"
        ).fetchone()
        return int(row[0] or 0)

    def _lease(
        self, worker: str, queues: Sequence[str], limit: int, lease_ms: int
    ) -> list[TaskMessage]:
        now = now_ms()
        with self._write() as conn:
            self._promote_due(conn, now)
            heads: list[list[tuple[int, int, bytes]]] = [
                conn.execute(
                    "SELECT -priority, seq, message FROM tasks "
                    "WHERE state = 'queued' AND queue = ? ORDER BY priority DESC, seq LIMIT ?",
                    (queue, limit),
                ).fetchall()
                for queue in queues
            ]
            chosen = heads[0] if len(heads) == 1 else list(heapq.merge(*heads))[:limit]
            if not chosen:
                return []
            conn.executemany(
                "UPDATE tasks SET state = 'running', worker = ?, due_ms = ?, started_ms = ? "
                "WHERE seq = ?",
                [(worker, now + lease_ms, now, seq) for _, seq, _ in chosen],
            )
            leased = []
            for _, seq, message in chosen:
                try:
                    leased.append(MESSAGE_DECODER.decode(message))
                except msgspec.DecodeError as error:  # dead-lettered, not handed to a worker
                    task_id, name = conn.execute(
                        "SELECT id, name FROM tasks WHERE seq = ?", (seq,)
                    ).fetchone()
                    conn.execute(
                        "UPDATE tasks SET state = 'failed', worker = NULL, due_ms = ?, "
                        "finished_ms = ?, error = ?, message = ? WHERE seq = ?",
                        (now + self.dead_ttl_ms, now, ENCODER.encode(undecodable(message, error)),
                         stand_in(task_id, name), seq),
                    )  # fmt: skip
        return leased

    def _promote_due(self, conn: sqlite3.Connection, now: int) -> None:
        """Due scheduled tasks join their queues; tasks whose lease lapsed go back to theirs
        (same seq, so they keep their place)."""
        conn.execute(
            "UPDATE tasks SET state = 'queued', due_ms = 0, worker = NULL "
            "WHERE state = 'scheduled' AND due_ms <= ?",
            (now,),
        )
        # A cancel asked of a task whose worker went away holds: it is not run again.
        for (message,) in conn.execute(
            "SELECT message FROM tasks WHERE state = 'running' AND due_ms < ? AND cancel = 1",
            (now,),
        ).fetchall():
            self._cancelled(conn, MESSAGE_DECODER.decode(message), CANCELLED_AFTER_LEASE, now)
        conn.execute(
            "UPDATE tasks SET state = 'queued', due_ms = 0, worker = NULL "
            "WHERE state = 'running' AND due_ms < ?",
            (now,),
        )

    def extend(self, worker: str, ids: Sequence[str], lease_ms: int) -> Heartbeat:
        now = now_ms()
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO workers (worker, seen_ms) VALUES (?, ?)", (worker, now)
            )
            held: dict[str, int] = {}
            for chunk in _chunks(ids):
                held.update(
                    conn.execute(
                        f"SELECT id, cancel FROM tasks WHERE id IN ({_marks(chunk)}) "
                        "AND state = 'running' AND worker = ?",
                        (*chunk, worker),
                    ).fetchall()
                )
            conn.executemany(
                "UPDATE tasks SET due_ms = ? WHERE id = ?",
                [(now + lease_ms, task_id) for task_id in held],
            )
        return Heartbeat(
            cancelled=frozenset(task_id for task_id, cancel in held.items() if cancel),
            lost=frozenset(ids) - held.keys(),
        )

    def release(self, worker: str, ids: Sequence[str], eta_ms: int = 0) -> None:
        state, due = (TaskState.SCHEDULED, eta_ms) if eta_ms > now_ms() else (TaskState.QUEUED, 0)
        with self._write() as conn:
            conn.executemany(
                "UPDATE tasks SET state = ?, due_ms = ?, worker = NULL, started_ms = 0 "
                "WHERE id = ? AND state = 'running' AND worker = ?",
                [(state, due, task_id, worker) for task_id in ids],
            )

    # Finishing

    def finish(self, worker: str, outcomes: Sequence[Outcome]) -> None:
        now = now_ms()
        with self._write() as conn:
            held = self._held(conn, worker, [outcome.message.id for outcome in outcomes])
            for outcome in outcomes:
                if outcome.message.id in held:
                    self._apply(conn, outcome, now)

    def _held(self, conn: sqlite3.Connection, worker: str, ids: Sequence[str]) -> set[str]:
        held: set[str] = set()
        for chunk in _chunks(ids):
            held.update(
                row[0]
                for row in conn.execute(
                    f"SELECT id FROM tasks WHERE id IN ({_marks(chunk)}) "
                    "AND state = 'running' AND worker = ?",
                    (*chunk, worker),
                )
            )
        return held

    def _apply(self, conn: sqlite3.Connection, outcome: Outcome, now: int) -> None:
        message = outcome.message
        error = ENCODER.encode(outcome.error) if outcome.error is not None else None
        if outcome.state is TaskState.SCHEDULED:
            if conn.execute("SELECT cancel FROM tasks WHERE id = ?", (message.id,)).fetchone()[0]:
                # Cancelled while it ran, and it failed before its worker heard of it.
                self._cancelled(conn, message, CANCELLED_BEFORE_RETRY, now)
                return
            conn.execute(
                "UPDATE tasks SET state = ?, due_ms = ?, message = ?, error = ?, worker = NULL, "
                "started_ms = 0 WHERE id = ?",
                (
                    TaskState.SCHEDULED,
                    message.eta_ms,
                    ENCODER.encode(message),
                    error,
                    message.id,
                ),
            )
            return
        self._finished(conn, message, outcome.state, outcome.result, error, now)
        if outcome.state is TaskState.SUCCEEDED:
            # A chain step requeued from the dead letters succeeded: its next step, recorded
            # as failed without running, runs now.
            conn.executemany(_FORGET_NEVER_RUN, [(step.id,) for step in outcome.follow_ups])
            self._insert(conn, outcome.follow_ups, now)
        elif message.link:
            self._chain_broken(conn, message, outcome.state, outcome.error, now)
        if message.chord:
            self._chord_progress(conn, message, outcome.state, error, now)

    def _finished(
        self,
        conn: sqlite3.Connection,
        message: TaskMessage,
        state: TaskState,
        result: bytes,
        error: bytes | None,
        now: int,
    ) -> None:
        """The task ended: kept (with its idempotency key) for its TTL from now."""
        ttl = self.dead_ttl_ms if state is TaskState.FAILED else self.result_ttl_ms
        conn.execute(
            "UPDATE tasks SET state = ?, due_ms = ?, finished_ms = ?, result = ?, error = ?, "
            "cancel = 0 WHERE id = ?",
            (state, now + ttl, now, result, error, message.id),
        )
        if message.key:
            conn.execute(
                "UPDATE task_keys SET expires_ms = ? WHERE key = ? AND task_id = ?",
                (now + ttl, message.key, message.id),
            )

    def _chord_progress(
        self,
        conn: sqlite3.Connection,
        header: TaskMessage,
        state: TaskState,
        error: bytes | None,
        now: int,
    ) -> None:
        row = conn.execute(
            "SELECT remaining, callback FROM chords WHERE chord_id = ?", (header.chord,)
        ).fetchone()
        if row is None:
            return  # an earlier header failed and settled the chord
        remaining, encoded = row
        callback = MESSAGE_DECODER.decode(encoded)
        if state is TaskState.SUCCEEDED and remaining > 1:
            conn.execute(
                "UPDATE chords SET remaining = remaining - 1 WHERE chord_id = ?", (header.chord,)
            )
            return
        conn.execute("DELETE FROM chords WHERE chord_id = ?", (header.chord,))
        if state is TaskState.SUCCEEDED:
            self._insert(conn, [callback], now)
            return
        # The callback can never run: record it as failed, naming the header that failed.
        reason = chord_failure(header, state, _ERROR_DECODER.decode(error) if error else None)
        self._never_run(conn, callback, reason, now)

    def _chain_broken(
        self,
        conn: sqlite3.Connection,
        step: TaskMessage,
        state: TaskState,
        error: ErrorInfo | None,
        now: int,
    ) -> None:
        """A chain's step did not succeed: its later steps, never to run, are recorded as failed
        (the chain's handle waits for the last one)."""
        reason = chain_failure(step, state, error)
        for later in step.link:
            self._never_run(conn, msgspec.structs.replace(later, link=()), reason, now)

    def _never_run(
        self, conn: sqlite3.Connection, message: TaskMessage, reason: ErrorInfo, now: int
    ) -> None:
        """Record a task that can never run as failed, for ``reason``."""
        conn.execute(
            "INSERT OR IGNORE INTO tasks (id, name, queue, priority, state, due_ms, message) "
            "VALUES (?, ?, ?, ?, ?, 0, ?)",
            (
                message.id,
                message.name,
                message.queue,
                message.priority,
                TaskState.FAILED,
                ENCODER.encode(message),
            ),
        )
        self._finished(conn, message, TaskState.FAILED, b"", ENCODER.encode(reason), now)

    # Reading

    def info(self, ids: Sequence[str]) -> dict[str, TaskInfo]:
        found: dict[str, TaskInfo] = {}
        for chunk in _chunks(ids):
            for row in self._conn.execute(
                f"SELECT id, {_INFO_COLUMNS} FROM tasks WHERE id IN ({_marks(chunk)})", chunk
            ):
                found[row[0]] = _info(row[1:])
        return found

    def wait(self, ids: Sequence[str], timeout: float) -> dict[str, TaskInfo]:
        deadline = time.monotonic() + timeout
        pending = list(dict.fromkeys(ids))
        done: dict[str, TaskInfo] = {}
        while True:
            version = self._data_version()
            known = self.info(pending)
            done.update((i, info) for i, info in known.items() if info.state.finished)
            pending = [i for i in pending if i not in done]
            if not pending or time.monotonic() >= deadline:
                return done
            while self._data_version() == version:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                time.sleep(min(POLL_S, remaining))

    def list_tasks(
        self, state: TaskState | None = None, queue: str | None = None, limit: int = 100
    ) -> list[TaskInfo]:
        clauses, params = [], []
        if state is not None:
            clauses.append("state = ?")
            params.append(str(state))
        if queue is not None:
            clauses.append("queue = ?")
            params.append(queue)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._conn.execute(
            f"SELECT {_INFO_COLUMNS} FROM tasks {where} ORDER BY seq LIMIT ?", (*params, limit)
        ).fetchall()
        return [_info(row) for row in rows]

    def dead(self, limit: int = 100) -> list[TaskInfo]:
        return self.list_tasks(TaskState.FAILED, limit=limit)

    def stats(self) -> BrokerStats:
        counts: dict[str, dict[str, int]] = {}
        dead = 0
        for queue, state, n in self._conn.execute(
            "SELECT queue, state, COUNT(*) FROM tasks "
            "WHERE state IN ('queued', 'scheduled', 'running', 'failed') GROUP BY queue, state"
        ):
            if state == TaskState.FAILED:
                dead += n
            else:
                counts.setdefault(queue, {})[state] = n
        workers = [
            row[0]
            for row in self._conn.execute(
                "SELECT worker FROM workers WHERE seen_ms > ? ORDER BY worker",
                (now_ms() - WORKER_SEEN_MS,),
            )
        ]
        return BrokerStats(
            queues={queue: QueueStats(**by_state) for queue, by_state in sorted(counts.items())},
            dead=dead,
            workers=workers,
        )

    # Control

    def cancel(self, task_id: str) -> TaskState | None:
        now = now_ms()
        with self._write() as conn:
            row = conn.execute(
                "SELECT state, message FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()
            if row is None:
                return None
            state = TaskState(row[0])
            if state in (TaskState.QUEUED, TaskState.SCHEDULED):
                self._cancelled(conn, MESSAGE_DECODER.decode(row[1]), CANCELLED_BEFORE_START, now)
                return TaskState.CANCELLED
            if state is TaskState.RUNNING:
                conn.execute("UPDATE tasks SET cancel = 1 WHERE id = ?", (task_id,))
            return state

    def _cancelled(
        self, conn: sqlite3.Connection, message: TaskMessage, reason: ErrorInfo, now: int
    ) -> None:
        error = ENCODER.encode(reason)
        self._finished(conn, message, TaskState.CANCELLED, b"", error, now)
        if message.link:
            self._chain_broken(conn, message, TaskState.CANCELLED, reason, now)
        if message.chord:
            self._chord_progress(conn, message, TaskState.CANCELLED, error, now)

    def requeue(self, ids: Sequence[str] | None = None) -> list[str]:
        with self._write() as conn:
            if ids is None:
                found = conn.execute(
                    "SELECT id, message, error FROM tasks WHERE state = 'failed' ORDER BY seq"
                ).fetchall()
            else:
                found = [
                    row
                    for chunk in _chunks(ids)
                    for row in conn.execute(
                        f"SELECT id, message, error FROM tasks WHERE state = 'failed' "
                        f"AND id IN ({_marks(chunk)}) ORDER BY seq",
                        chunk,
                    )
                ]
            rows = [
                (task_id, message)
                for task_id, message, error in found
                if not never_ran_in_chain(_ERROR_DECODER.decode(error) if error else None)
            ]
            conn.executemany(
                "UPDATE tasks SET state = 'queued', due_ms = 0, worker = NULL, started_ms = 0, "
                "finished_ms = 0, error = NULL, message = ? WHERE id = ?",
                [
                    (
                        ENCODER.encode(
                            msgspec.structs.replace(
                                MESSAGE_DECODER.decode(message), attempt=0, eta_ms=0
                            )
                        ),
                        task_id,
                    )
                    for task_id, message in rows
                ],
            )
            # Their idempotency keys are held again until they finish, as when first enqueued.
            conn.executemany(
                "UPDATE task_keys SET expires_ms = ? WHERE task_id = ?",
                [(KEY_HELD, task_id) for task_id, _ in rows],
            )
            # Their chains' later steps, recorded as failed when they failed, wait for them again.
            conn.executemany(
                _FORGET_NEVER_RUN,
                [
                    (later.id,)
                    for _, message in rows
                    for later in MESSAGE_DECODER.decode(message).link
                ],
            )
        return [task_id for task_id, _ in rows]

    def purge(self, queue: str) -> int:
        """Also drops the purged tasks' idempotency keys, and fails the callbacks of chords
        and the later steps of chains waiting on them."""
        now = now_ms()
        with self._write() as conn:
            rows = conn.execute(
                "SELECT id, message FROM tasks "
                "WHERE queue = ? AND state IN ('queued', 'scheduled')",
                (queue,),
            ).fetchall()
            ids = [task_id for task_id, _ in rows]
            messages = purged_messages(message for _, message in rows)
            chords = {message.chord for message in messages} - {""}
            for chunk in _chunks(ids):
                marks = _marks(chunk)
                conn.execute(f"DELETE FROM tasks WHERE id IN ({marks})", chunk)
                conn.execute(f"DELETE FROM task_keys WHERE task_id IN ({marks})", chunk)
            for message in messages:  # a chain's step: its later steps can never run
                if message.link:
                    self._chain_broken(conn, message, TaskState.CANCELLED, PURGED_BEFORE_START, now)
            for chord_id in chords:  # its callback can never run: it fails
                row = conn.execute(
                    "DELETE FROM chords WHERE chord_id = ? RETURNING callback", (chord_id,)
                ).fetchone()
                if row is not None:
                    self._never_run(conn, MESSAGE_DECODER.decode(row[0]), CHORD_HEADER_PURGED, now)
        return len(ids)

    def take_tokens(
        self, name: str, rate: float, capacity: float, wanted: int
    ) -> tuple[int, float]:
        now = now_ms()
        with self._write() as conn:
            row = conn.execute(
                "SELECT tokens, updated_ms FROM buckets WHERE name = ?", (name,)
            ).fetchone()
            tokens = (
                capacity if row is None else min(capacity, row[0] + (now - row[1]) * rate / 1e3)
            )
            granted = min(wanted, int(tokens))
            tokens -= granted
            conn.execute(
                "INSERT OR REPLACE INTO buckets (name, tokens, updated_ms) VALUES (?, ?, ?)",
                (name, tokens, now),
            )
        return granted, max(0.0, (1 - tokens) / rate)

    def lead(self, worker: str, ttl_ms: int) -> bool:
        now = now_ms()
        with self._write() as conn:
            row = conn.execute(
                "SELECT holder, until_ms FROM leases WHERE name = ?", (LEADER_LEASE,)
            ).fetchone()
            if row is not None and row[0] != worker and row[1] > now:
                return False
            conn.execute(
                "INSERT OR REPLACE INTO leases (name, holder, until_ms) VALUES (?, ?, ?)",
                (LEADER_LEASE, worker, now + ttl_ms),
            )
        return True

    def leave(self, worker: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (LEADER_LEASE, worker))
            conn.execute("DELETE FROM workers WHERE worker = ?", (worker,))

    def claim_tick(self, schedule: str, tick_ms: int, message: TaskMessage) -> bool:
        now = now_ms()
        with self._write() as conn:
            row = conn.execute(
                "SELECT tick_ms FROM ticks WHERE schedule = ?", (schedule,)
            ).fetchone()
            if row is not None and row[0] >= tick_ms:
                return False
            conn.execute(
                "INSERT OR REPLACE INTO ticks (schedule, tick_ms) VALUES (?, ?)",
                (schedule, tick_ms),
            )
            self._insert(conn, [message], now)
        return True

    def last_tick(self, schedule: str) -> int:
        row = self._conn.execute(
            "SELECT tick_ms FROM ticks WHERE schedule = ?", (schedule,)
        ).fetchone()
        return int(row[0]) if row is not None else 0

    def housekeep(self) -> None:
        now = now_ms()
        with self._write() as conn:
            conn.execute(
                f"DELETE FROM tasks WHERE state IN ({_marks(_FINISHED_STATES)}) AND due_ms <= ?",
                (*_FINISHED_STATES, now),
            )
            conn.execute("DELETE FROM task_keys WHERE expires_ms <= ?", (now,))
            conn.execute("DELETE FROM workers WHERE seen_ms <= ?", (now - WORKER_SEEN_MS,))
            conn.execute("DELETE FROM leases WHERE until_ms <= ?", (now,))

    def footprint(self) -> int:
        tables = ("tasks", "task_keys", "chords", "buckets", "leases", "ticks", "workers")
        return sum(
            self._conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in tables
        )

    def close(self) -> None:
        self._file.close()


def _info(row: Sequence[object]) -> TaskInfo:
    message, state, worker, started, finished, result, error, cancel = row
    assert isinstance(message, bytes)
    return TaskInfo(
        message=MESSAGE_DECODER.decode(message),
        state=TaskState(str(state)),
        worker=str(worker or ""),
        started_ms=int(started),  # type: ignore[call-overload]
        finished_ms=int(finished),  # type: ignore[call-overload]
        result=result if isinstance(result, bytes) else b"",
        error=_ERROR_DECODER.decode(error) if isinstance(error, bytes) else None,
        cancel_requested=bool(cancel),
    )


def _chunks(ids: Sequence[str], size: int = 500) -> Iterator[Sequence[str]]:
    """Slices small enough for SQLite's bound-parameter limit."""
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" * len(values))
