"""The sync store's append, through libpq's prepared statements (``psycopg.pq``) directly.

A save per command is one round trip, and psycopg's cursor around it (query conversion,
adapters, its own prepared-statement bookkeeping, a result object per call) cost the client as
much time as the round trip waited for the server. Here a call is one ``exec_prepared`` with the
parameters already encoded (the appends' JSON from one msgspec call) and four text columns read
back. Every connection prepares the statement once, the first time it appends; a connection
that breaks is replaced by the pool, and the new one prepares it again.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import msgspec
import psycopg
from psycopg import pq

from riverbed.eventsourcing.errors import ConcurrencyError, EventSourcingError
from riverbed.eventsourcing.records import StreamAppend
from riverbed.eventsourcing.stores.postgres.statements import APPEND_NUMBERED

STATEMENT = b"riverbed_append"
UNIQUE_VIOLATION = b"23505"

_encode = msgspec.json.Encoder().encode
# Connections that have STATEMENT; one dies with its connection.
_prepared: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()


def append(conn: psycopg.Connection[Any], appends: Sequence[StreamAppend], channel: str) -> int:
    """The position of the last event appended; ``ConcurrencyError`` when a stream is not at
    its expected version (nothing is appended then)."""
    params = [_encode(appends), channel.encode()]
    pgconn = conn.pgconn
    with conn.lock:
        if conn not in _prepared:
            _check(pgconn.prepare(STATEMENT, APPEND_NUMBERED.encode()))
            _prepared.add(conn)
        result = pgconn.exec_prepared(STATEMENT, params)
    _check(result)
    last_position = result.get_value(0, 0)
    if last_position is None:
        stream, expected, actual = (result.get_value(0, column) for column in (1, 2, 3))
        assert stream is not None and expected is not None and actual is not None
        raise ConcurrencyError(stream.decode(), int(expected), int(actual))
    return int(last_position)


def _check(result: pq.abc.PGresult) -> None:
    """Raise the server's error as psycopg would (``OperationalError`` for a lost connection,
    which the store turns into ``StoreUnavailableError``)."""
    if result.status in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
        return
    message = result.get_error_message() or "the server sent no error message"
    sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE)
    if sqlstate == UNIQUE_VIOLATION:
        # Two events for one version in this append (the caller's bug), or an id used twice.
        raise EventSourcingError(f"cannot append: {message.strip()}")
    if sqlstate is None:
        raise psycopg.OperationalError(message)
    raise psycopg.errors.lookup(sqlstate.decode())(message)
