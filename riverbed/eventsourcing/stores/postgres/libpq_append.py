"""The sync store's append, through libpq (``psycopg.pq``) directly: the append's statements go
out together in pipeline mode and come back in one round trip (a statement alone goes without
the pipeline, which spared a save 2-3 us).

Sent as one pipeline, the statements up to the sync form one implicit transaction: the lock, then
a statement per stream (statements.py; a stream of many events takes several). An append of one
statement (a save's) is numbered by the client, on from the last position its store's appends
committed, and its records go ready to store (APPEND_NUMBERED, which takes the lock itself); the
primary key finds a guess another writer made stale, and nothing is inserted. The append then
goes again for the server to number (APPEND), and the store stops guessing for a while
(guesses.py), as writers taking turns would spoil most guesses.

A save per command is one round trip of two short statements, where the plpgsql function of
schema version 2 spent 30 us more of the server's time per call (its jsonb argument parsed and
unpacked, each statement run through SPI). psycopg's cursor around the call would cost the
client as much time again, so each statement is an ``exec``-style prepared statement with its
parameters as bytes. Every connection prepares the statements it needs the first time it needs
them; a connection that breaks is replaced by the pool, and the new one prepares them again. An
append in a subscriber's open transaction checks the versions first, in round trips of their
own (``append_in_transaction`` says why), and lets the server number its events.

libpq's ``PQgetResult`` would wait for the server holding the GIL (psycopg releases it only
around the ``PQexec`` calls), so the wait is a ``poll`` on the socket instead, spinning briefly
first (spinning.py).
"""

from __future__ import annotations

import contextlib
import select
import struct
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import pq

from riverbed.eventsourcing.errors import ConcurrencyError, EventSourcingError
from riverbed.eventsourcing.records import StreamAppend
from riverbed.eventsourcing.stores.batches import joined_records
from riverbed.eventsourcing.stores.guesses import PositionGuess
from riverbed.eventsourcing.stores.postgres import schema
from riverbed.eventsourcing.stores.postgres import statements as q
from riverbed.eventsourcing.stores.postgres.spinning import AnswerWait

R = TypeVar("R")

LOCK = b"riverbed_lock_appends"
UNIQUE_VIOLATION = b"23505"
_NUMBERED_AGAIN = frozenset(sqlstate.encode() for sqlstate in q.NUMBERED_AGAIN)
CONFLICT = schema.CONFLICT.encode()

# An append statement's kind and parameters.
Statement = tuple[int, list[bytes | None]]
CHECKING, SERVER_NUMBERED, CLIENT_NUMBERED = 0, 1, 2  # CHECK, APPEND, APPEND_NUMBERED
_LOCKING = -1  # LOCK's place in a connection's prepared kinds
_names = (b"riverbed_check", b"riverbed_append", b"riverbed_append_numbered")
_texts = (q.CHECK, q.APPEND, q.APPEND_NUMBERED)
# Parameter formats by kind: the records go as binary (APPEND's as a bytea[]).
_formats = ([0, 0], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1, 0])
_NUMBERED, _NUMBERED_FORMATS = _names[CLIENT_NUMBERED], _formats[CLIENT_NUMBERED]
# PostgreSQL's binary array header (dimensions, has NULLs, element type: bytea, length, lower
# bound), and each element's length.
_ARRAY_HEAD = struct.Struct("!iiIii")
_BYTEA = 17
_LENGTH = struct.Struct("!i")


def append(
    conn: psycopg.Connection[Any],
    appends: Sequence[StreamAppend],
    channel: str,
    guess: PositionGuess,
    answers: AnswerWait,
    session: Session | None = None,
) -> int:
    """The position of the last event appended; ``ConcurrencyError`` when a stream is not at
    its expected version (nothing is appended then). An append of one statement is numbered on
    from ``guess`` (the last position the store's appends committed), any other by the server;
    ``answers`` waits for the server's answer. ``session``: the connection's, if the caller
    keeps it (else looked up).
    On a connection in a transaction (a subscriber's), the append joins it, and the transaction
    stays usable if the append fails."""
    if conn.pgconn.transaction_status == pq.TransactionStatus.INTRANS:
        return append_in_transaction(conn, appends, channel)
    if session is None:
        session = session_of(conn)
    only = q.numbered_run(appends)
    last = None if only is None else guess.take()
    position = None
    if only is not None and last is not None:
        params = _numbered_params(only, channel, last)
        position = _prepared_again(session, lambda: _numbered(conn, session, params, answers))
        if position is None:  # refused: nothing was appended
            guess.stale()
    if position is None:
        statements = _server_numbered(list(q.append_chunks(appends)), channel)
        position = _prepared_again(session, lambda: _pipelined(conn, session, statements, answers))
    guess.committed(position)
    return position


class Session:
    """What the appender keeps of a connection: the statements it prepared there (LOCK and
    the kinds), and a poller of its socket for the answers."""

    __slots__ = ("poller", "prepared", "socket")

    def __init__(self, socket: int) -> None:
        self.prepared: set[int] = set()
        self.socket = socket
        self.poller = select.poll()
        self.poller.register(socket, select.POLLIN)


_sessions: weakref.WeakKeyDictionary[psycopg.Connection[Any], Session] = weakref.WeakKeyDictionary()


def session_of(conn: psycopg.Connection[Any]) -> Session:
    """The connection's session: kept with it (a new one for a socket it did not have)."""
    socket = conn.pgconn.socket
    session = _sessions.get(conn)
    if session is None or session.socket != socket:
        session = _sessions[conn] = Session(socket)
    return session


def _prepared_again(session: Session, run: Callable[[], R]) -> R:
    """``run()``, and again if psycopg deallocated the statements it prepared: after a rollback
    psycopg deallocates every prepared statement of the connection, ours too (DEALLOCATE ALL).
    Nothing was appended then, so the statements are prepared anew and the append goes."""
    try:
        return run()
    except psycopg.errors.InvalidSqlStatementName:
        session.prepared.clear()
        return run()


def append_in_transaction(
    conn: psycopg.Connection[Any], appends: Sequence[StreamAppend], channel: str
) -> int:
    """The append in the connection's open transaction. The versions are checked before
    anything is inserted, so that a conflict raises with the transaction still usable (a saga
    retries its command in it). The conflict error of the pipelined check would abort the
    transaction; a savepoint around each append would avoid that but give each one a
    subtransaction, and past 64 in one transaction every snapshot on the server slows down.
    The statements go through psycopg, which prepares them again after it deallocated them
    (see ``_prepared_again``): a failed statement would abort the transaction, so it could not
    retry."""
    conn.execute(q.LOCK_APPENDS)
    for stream_append in appends:
        stream, expected = stream_append.stream, stream_append.expected_version
        if expected is not None:
            row = conn.execute(q.STREAM_VERSION_OF, (stream,)).fetchone()
            actual = 0 if row is None else int(row[0])
            if actual != expected:
                raise ConcurrencyError(stream, expected, actual)
    cur = psycopg.RawCursor(conn)
    try:
        for stream, _, events in q.append_chunks(appends):
            params = q.append_params(stream, None, channel, events)
            cur.execute(q.APPEND if events else q.CHECK, params, prepare=True)
    except psycopg.errors.UniqueViolation as error:
        raise EventSourcingError(f"cannot append: {str(error).strip()}") from None
    row = cur.fetchone()
    assert row is not None
    last_position: int = row[0]
    return last_position


def _pipelined(
    conn: psycopg.Connection[Any],
    session: Session,
    statements: list[Statement],
    answers: AnswerWait,
) -> int:
    """Send the lock and the append statements in one pipeline; the last position the last
    statement returns."""
    pgconn = conn.pgconn
    with conn.lock:
        _prepare(conn, session, [kind for kind, _ in statements], locking=True)
        pgconn.enter_pipeline_mode()
        try:
            pgconn.send_query_prepared(LOCK, None)
            for kind, params in statements:
                pgconn.send_query_prepared(_names[kind], params, param_formats=_formats[kind])
            pgconn.pipeline_sync()
            results = _results(pgconn, session.poller, answers, pipelined=True)
        finally:
            # Left in pipeline mode (interrupted, or the connection broke), the connection is
            # not idle, and the store gives it back to the pool, which discards it.
            with contextlib.suppress(psycopg.OperationalError):
                pgconn.exit_pipeline_mode()
    for result in results:
        _check(result)
    return _last_position(results[-1])


def _numbered(
    conn: psycopg.Connection[Any], session: Session, params: list[bytes | None], answers: AnswerWait
) -> int | None:
    """Send APPEND_NUMBERED alone (it takes the lock itself: one statement, no pipeline
    needed); the last position it returns, or None when it appended nothing: the guess was
    stale, or it failed as NUMBERED_AGAIN says. A save's path: it goes straight to its one
    result."""
    pgconn = conn.pgconn
    with conn.lock:
        if CLIENT_NUMBERED not in session.prepared:
            _prepare(conn, session, [CLIENT_NUMBERED], locking=False)
        pgconn.send_query_prepared(_NUMBERED, params, param_formats=_NUMBERED_FORMATS)
        (result,) = _results(pgconn, session.poller, answers, pipelined=False)
    if result.status != pq.ExecStatus.TUPLES_OK:
        if (
            result.status == pq.ExecStatus.FATAL_ERROR
            and result.error_field(pq.DiagnosticField.SQLSTATE) in _NUMBERED_AGAIN
        ):
            return None  # a conflict, or a deadlock (statements.py)
        _check(result)
    if not result.ntuples:
        return None  # a stale guess
    return _last_position(result)


def _last_position(result: pq.abc.PGresult) -> int:
    value = result.get_value(0, 0)
    assert value is not None  # each append statement returns a row, or raises
    return int(value)


def _server_numbered(chunks: list[q.Chunk], channel: str) -> list[Statement]:
    """Each append statement's kind and parameters, the server numbering the events."""
    channel_param = channel.encode()
    statements: list[Statement] = []
    for stream, expected, events in chunks:
        params = _params(stream, expected)
        if events:  # a check alone notifies nobody
            records = q.records_of(events)
            array = [_ARRAY_HEAD.pack(1, 0, _BYTEA, len(records), 1)]
            for record in records:
                array += (_LENGTH.pack(len(record)), record)
            params += (channel_param, b"%d" % events[0].version, b"%d" % len(events))
            params.append(b"".join(array))
        statements.append((SERVER_NUMBERED if events else CHECKING, params))
    return statements


def _numbered_params(chunk: q.Chunk, channel: str, last: int) -> list[bytes | None]:
    """APPEND_NUMBERED's parameters, the events numbered on from ``last``."""
    stream, expected, events = chunk
    params = _params(stream, expected)
    params += (channel.encode(), b"%d" % events[0].version, b"%d" % len(events))
    params += (joined_records(events, last + 1), b"%d" % (last + 1))
    return params


def _params(stream: str, expected: int | None) -> list[bytes | None]:
    return [stream.encode(), None if expected is None else b"%d" % expected]


def _prepare(
    conn: psycopg.Connection[Any], session: Session, kinds: list[int], locking: bool
) -> None:
    """Prepare what the connection has not yet: the statements' kinds, and LOCK if
    ``locking``."""
    prepared = session.prepared
    if locking and _LOCKING not in prepared:
        _check(conn.pgconn.prepare(LOCK, q.LOCK_OWN_APPEND.encode()))
        prepared.add(_LOCKING)
    for kind in kinds:
        if kind not in prepared:
            _check(conn.pgconn.prepare(_names[kind], _texts[kind].encode()))
            prepared.add(kind)


def _results(
    pgconn: pq.abc.PGconn, poller: select.poll, answers: AnswerWait, pipelined: bool
) -> list[pq.abc.PGresult]:
    """Every statement's result: up to the pipeline's sync, or the one statement's."""
    if pgconn.flush():  # the connection is non-blocking: a large append goes out in parts
        sending = select.poll()
        sending.register(pgconn.socket, select.POLLIN | select.POLLOUT)
        while pgconn.flush():
            sending.poll()
            pgconn.consume_input()
    results: list[pq.abc.PGresult] = []
    while True:
        while pgconn.is_busy():  # reads the socket only when what it holds is not enough
            answers.wait(poller)
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:  # between two statements' results, or after the only one's
            if pgconn.status != pq.ConnStatus.OK:
                raise psycopg.OperationalError("the connection to the server was lost")
            if not pipelined:
                return results
            continue
        if result.status == pq.ExecStatus.PIPELINE_SYNC:
            return results
        results.append(result)


def _check(result: pq.abc.PGresult) -> None:
    """Raise the server's error: ``ConcurrencyError`` for a conflict, or as psycopg would
    (``OperationalError`` for a lost connection, which the store turns into
    ``StoreUnavailableError``)."""
    if result.status in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
        return
    sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE)
    if sqlstate == CONFLICT:
        detail = result.error_field(pq.DiagnosticField.MESSAGE_DETAIL)
        raise q.conflict(None if detail is None else detail.decode())
    message = result.get_error_message() or "the server sent no error message"
    if sqlstate == UNIQUE_VIOLATION:
        # Two events for one version in this append, or, appending with no expected version, a
        # version already stored: the caller's bug.
        raise EventSourcingError(f"cannot append: {message.strip()}")
    if sqlstate is None:
        raise psycopg.OperationalError(message)
    raise psycopg.errors.lookup(sqlstate.decode())(message)
