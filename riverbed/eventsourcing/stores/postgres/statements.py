"""The SQL the sync and async stores share, and the conversions around it that do not touch a
connection. Names are unqualified: every connection's search_path is the store's schema."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import msgspec

from riverbed.eventsourcing.errors import ConcurrencyError
from riverbed.eventsourcing.records import NewEvent, StreamAppend, distinct_streams
from riverbed.eventsourcing.stores.postgres.schema import TABLES

# Columns in the order of StoredEvent's fields, so rows become events with ``args_row``.
EVENT_COLUMNS = "position, id, stream, version, type, schema, data, metadata, timestamp_ms"

# An append is one transaction, its statements sent together (one round trip): LOCK_APPENDS, then
# append_statement(n) for each stream (a stream of more than CHUNK_EVENTS events in chunks). The
# lock is held until the transaction ends, so appends commit one at a time, and as each statement
# starts after the lock is held, its snapshot sees every earlier append: the version check and
# the numbering after the highest position are exact. schema.py says why not a sequence.
LOCK_APPENDS = (
    "SELECT pg_advisory_xact_lock(hashtextextended('riverbed_append/' || current_schema(), 0))"
)
CHUNK_EVENTS = 32
# And at most this many bytes of payloads: PostgreSQL takes a message (a statement's
# parameters) of up to 1 GiB, so a large save goes in several (an event alone is refused above
# MAX_EVENT_BYTES before it is sent).
CHUNK_BYTES = 256 * 1024 * 1024
# One event's parameters, in this order, with their types.
_EVENT_PARAMETERS = (
    ("id", "text"), ("stream", "text"), ("version", "bigint"), ("type", "text"),
    ("schema", "integer"), ("data", "bytea"), ("metadata", "bytea"), ("timestamp_ms", "bigint"),
)  # fmt: skip
EVENT_PARAMETERS = len(_EVENT_PARAMETERS)
# $1 the stream, $2 its expected version (null: any), $3 the NOTIFY channel, then each event's
# parameters; a statement with no events has only $1 and $2.
FIRST_EVENT_PARAMETER = 4
# Raises schema.CONFLICT unless the stream $1 is at version $2; a conflict is an error so that
# the whole append rolls back, whichever of its statements finds it.
_CHECK = (
    "WITH actual AS (SELECT coalesce(max(version), 0) AS version FROM riverbed_events "
    "WHERE stream = $1::text), checked AS (SELECT CASE WHEN $2::bigint IS NULL OR "
    "actual.version = $2 THEN true ELSE riverbed_conflict($1, $2, actual.version) END AS ok "
    "FROM actual)"
)


@functools.cache  # one text per event count: the async store sends it on every append
def append_statement(events: int) -> str:
    """Checks a stream's version and inserts ``events`` events numbered after the highest
    position, notifying the store's channel; returns the last position. With no events it only
    checks, and returns the highest position."""
    if events == 0:
        return (
            f"{_CHECK} SELECT (SELECT coalesce(max(position), 0) FROM riverbed_events) "
            "FROM checked WHERE checked.ok"
        )
    rows = ", ".join(
        "("
        + ", ".join(
            [str(row + 1)]
            + [
                f"${FIRST_EVENT_PARAMETER + row * EVENT_PARAMETERS + column}::{type_}"
                for column, (_, type_) in enumerate(_EVENT_PARAMETERS)
            ]
        )
        + ")"
        for row in range(events)
    )
    names = ", ".join(name for name, _ in _EVENT_PARAMETERS)
    return (
        f"{_CHECK}, last AS (SELECT coalesce(max(position), 0) AS position FROM riverbed_events), "
        f"inserted AS (INSERT INTO riverbed_events (position, {names}) "
        f"SELECT last.position + e.n, {', '.join(f'e.{name}' for name, _ in _EVENT_PARAMETERS)} "
        f"FROM checked, last, (VALUES {rows}) AS e(n, {names}) WHERE checked.ok "
        "RETURNING position) "
        # Delivered when the transaction commits: wakes wait_for_events in every process.
        "SELECT max(position), pg_notify($3, max(position)::text) FROM inserted"
    )


def append_chunks(
    appends: Sequence[StreamAppend],
) -> Iterator[tuple[str, int | None, Sequence[NewEvent]]]:
    """Each statement's stream, expected version and events, in order. A stream's later chunks
    check nothing: the first checked it, and the lock keeps other appends out."""
    if not appends:  # still one statement: it returns the last position
        yield "", None, ()
    elif len(appends) > 1:
        distinct_streams(appends)
    for append in appends:
        expected: int | None = append.expected_version
        chunk: list[NewEvent] = []
        size = 0
        for event in append.events:
            event_size = len(event.data) + len(event.metadata)
            if chunk and (len(chunk) == CHUNK_EVENTS or size + event_size > CHUNK_BYTES):
                yield append.stream, expected, chunk
                expected, chunk, size = None, [], 0
            chunk.append(event)
            size += event_size
        yield append.stream, expected, chunk


def append_params(
    stream: str, expected: int | None, channel: str, events: Sequence[NewEvent]
) -> list[object]:
    """An append statement's parameters, for psycopg."""
    params: list[object] = [stream, expected]
    if events:  # a check alone notifies nobody
        params.append(channel)
    for e in events:
        params += (e.id, e.stream, e.version, e.type, e.schema, e.data, e.metadata, e.timestamp_ms)
    return params


def conflict(detail: str | None) -> ConcurrencyError:
    """The ``ConcurrencyError`` that riverbed_conflict's DETAIL describes."""
    stream, expected, actual = _conflict_detail.decode(detail or "")
    return ConcurrencyError(stream, expected, actual)


STREAM_VERSION_OF = "SELECT coalesce(max(version), 0) FROM riverbed_events WHERE stream = %s"
READ_STREAM = (
    f"SELECT {EVENT_COLUMNS} FROM riverbed_events "
    "WHERE stream = %s AND version >= %s AND version <= %s ORDER BY version"
)
READ_ALL = (
    f"SELECT {EVENT_COLUMNS} FROM riverbed_events WHERE position > %s ORDER BY position LIMIT %s"
)
# Positions are gap-free and commit in order: the highest visible one is the last (an index probe).
LAST_POSITION = "SELECT coalesce(max(position), 0) FROM riverbed_events"
LISTEN = "LISTEN {}"

SAVE_SNAPSHOT = (
    "INSERT INTO riverbed_snapshots (stream, version, type, schema, data, timestamp_ms) "
    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (stream, version) DO UPDATE SET "
    "type = excluded.type, schema = excluded.schema, data = excluded.data, "
    "timestamp_ms = excluded.timestamp_ms"
)
# Only the latest snapshot matters for loading; older ones would only grow the table.
PRUNE_SNAPSHOTS = "DELETE FROM riverbed_snapshots WHERE stream = %s AND version < %s"
LOAD_SNAPSHOT = (
    "SELECT stream, version, type, schema, data, timestamp_ms FROM riverbed_snapshots "
    "WHERE stream = %s AND version <= %s ORDER BY version DESC LIMIT 1"
)

KEY_BYTES = 32  # AES-256
STREAM_KEY = "SELECT key FROM riverbed_stream_keys WHERE stream = %s"
# Two stores creating one stream's key at once both get the one inserted first: the no-op update
# waits for it and returns it (a DO NOTHING would return no row, and a second SELECT in the same
# statement would not see it, its snapshot being older).
CREATE_STREAM_KEY = (
    "INSERT INTO riverbed_stream_keys (stream, key) VALUES (%s, %s) ON CONFLICT (stream) "
    "DO UPDATE SET key = riverbed_stream_keys.key RETURNING key"
)
DELETE_STREAM_KEY = "DELETE FROM riverbed_stream_keys WHERE stream = %s"

# A subscriber's transactions take turns on a transaction-scoped advisory lock named after the
# store's schema and the subscriber, which needs no checkpoint row to exist yet.
LOCK_SUBSCRIBER = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
CHECKPOINT = "SELECT position FROM riverbed_checkpoints WHERE name = %s"
SET_CHECKPOINT = (
    "INSERT INTO riverbed_checkpoints (name, position) VALUES (%s, %s) "
    "ON CONFLICT (name) DO UPDATE SET position = excluded.position"
)
GET_DOCUMENT = "SELECT document FROM riverbed_documents WHERE collection = %s AND key = %s"
PUT_DOCUMENT = (
    "INSERT INTO riverbed_documents (collection, key, document) VALUES (%s, %s, %s::json) "
    "ON CONFLICT (collection, key) DO UPDATE SET document = excluded.document"
)
DELETE_DOCUMENT = "DELETE FROM riverbed_documents WHERE collection = %s AND key = %s"
DROP_COLLECTION = "DELETE FROM riverbed_documents WHERE collection = %s"
DROP_PREFIXED = "DELETE FROM riverbed_documents WHERE left(collection, %s) = %s"
DOCUMENTS = (
    "SELECT key, document FROM riverbed_documents WHERE collection = %s ORDER BY key LIMIT %s"
)
PARK = (
    "INSERT INTO riverbed_parked (projection, position, event_id, type, error, parked_ms) "
    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (projection, position) DO UPDATE SET "
    "event_id = excluded.event_id, type = excluded.type, error = excluded.error, "
    "parked_ms = excluded.parked_ms"
)
PARKED = (
    "SELECT projection, position, event_id, type, error, parked_ms FROM riverbed_parked "
    "WHERE projection = %s ORDER BY position"
)
PARKED_COUNT = "SELECT count(*) FROM riverbed_parked WHERE projection = %s"
UNPARK = "DELETE FROM riverbed_parked WHERE projection = %s AND position = %s"
SEEN = (
    "INSERT INTO riverbed_inbox (name, event_id) VALUES (%s, %s) "
    "ON CONFLICT (name, event_id) DO NOTHING"
)
SET_TIMER = (
    "INSERT INTO riverbed_timers (name, key, due_ms, data) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (name, key) DO UPDATE SET due_ms = excluded.due_ms, data = excluded.data"
)
CANCEL_TIMER = "DELETE FROM riverbed_timers WHERE name = %s AND key = %s"
DUE_TIMERS = (
    "SELECT name, key, due_ms, data FROM riverbed_timers WHERE name = %s AND due_ms <= %s "
    # Timers due together fire in their keys' code-point order, as on SQLite, whatever the
    # database's collation.
    'ORDER BY due_ms, key COLLATE "C" LIMIT %s'
)
# Leases expire by the server's clock, which every process of the store shares.
NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
# Takes the lease when it is free, already ours or expired. The upsert locks the row, so of two
# owners racing for it, the second re-checks the first's lease and gets no row back.
ACQUIRE_LEASE = (
    f"INSERT INTO riverbed_leases (name, owner, expires_ms) VALUES (%s, %s, {NOW_MS} + %s) "
    "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_ms = excluded.expires_ms "
    f"WHERE riverbed_leases.owner = excluded.owner OR riverbed_leases.expires_ms <= {NOW_MS} "
    "RETURNING owner"
)
# Locks the row until the transaction ends: an owner trying to take the lease waits, then finds
# it extended.
RENEW_LEASE = (
    f"UPDATE riverbed_leases SET expires_ms = {NOW_MS} + %s WHERE name = %s AND owner = %s"
)
RELEASE_LEASE = "DELETE FROM riverbed_leases WHERE name = %s AND owner = %s"
FOOTPRINT = "SELECT " + " + ".join(f"(SELECT count(*) FROM {table})" for table in TABLES)

_conflict_detail = msgspec.json.Decoder(tuple[str, int, int])

# No version bound: read_stream's and load_snapshot's ``None``.
NO_LIMIT = 2**62


def subscriber_lock_key(schema: str, name: str) -> str:
    return f"riverbed/{schema}/{name}"
