"""The SQL the sync and async stores share, and the conversions around it that do not touch a
connection. Names are unqualified: every connection's search_path is the store's schema."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import msgspec

from riverbed.eventsourcing.errors import ConcurrencyError
from riverbed.eventsourcing.records import NewEvent, StoredEvent, StreamAppend, distinct_streams
from riverbed.eventsourcing.stores.batches import (
    Row,
    first_after,
    in_range,
    joined_records,
    rows_decoded,
    runs,
)
from riverbed.eventsourcing.stores.postgres.schema import TABLES

_encoder = msgspec.msgpack.Encoder()

# An append is one transaction, its statements sent together (one round trip): LOCK_APPENDS (or
# LOCK_OWN_APPEND), then a statement per stream (a stream of more than CHUNK_EVENTS events, or of
# versions that do not follow each other, in several: a batch row holds a run of at most
# CHUNK_EVENTS consecutive versions); or APPEND_NUMBERED alone, which takes the lock itself. The
# lock is held until the transaction ends, so appends commit one at a time, and as each statement
# after LOCK_APPENDS starts with the lock held, its snapshot sees every earlier append: the
# version check and the numbering after the highest position are exact. schema.py says why not a
# sequence.
_APPEND_LOCK = "pg_advisory_xact_lock(hashtextextended('riverbed_append/' || current_schema(), 0))"
LOCK_APPENDS = f"SELECT {_APPEND_LOCK}"
# LOCK_APPENDS for an append's own transaction, which also keeps APPEND to its generic plan:
# choosing by cost, the server planned it anew for each append (0.3 ms, three times running it).
LOCK_OWN_APPEND = f"{LOCK_APPENDS}, set_config('plan_cache_mode', 'force_generic_plan', true)"
CHUNK_EVENTS = 32
# And at most this many bytes of payloads: PostgreSQL takes a message (a statement's
# parameters) of up to 1 GiB, so a large save goes in several (an event alone is refused above
# MAX_EVENT_BYTES before it is sent).
CHUNK_BYTES = 256 * 1024 * 1024
# Every append statement's parameters start with $1 the stream and $2 its expected version (null:
# any), then $3 the NOTIFY channel; CHECK has only $1 and $2.

# The highest version of the stream {} and the highest position: each row's last.
_STREAM_VERSION = (
    "coalesce((SELECT version + count - 1 FROM riverbed_batches WHERE stream = {} "
    "ORDER BY version DESC LIMIT 1), 0)"
)
_LAST_POSITION = (
    "coalesce((SELECT position + count - 1 FROM riverbed_batches ORDER BY position DESC LIMIT 1)"
    ", 0)"
)
# Raises schema.CONFLICT unless the stream $1 is at version $2; a conflict is an error so that
# the whole append rolls back, whichever of its statements finds it.
_CHECK = (
    f"WITH actual AS (SELECT {_STREAM_VERSION.format('$1::text')} AS version), "
    "checked AS (SELECT CASE WHEN $2::bigint IS NULL OR "
    "actual.version = $2 THEN true ELSE riverbed_conflict($1, $2, actual.version) END AS ok "
    "FROM actual)"
)


# A batch row's events: $4 the version of the first, $5 their count, $6 their records. A row that
# does not go on from the expected version (appends of no expected version may give any versions
# the stream does not hold) is checked against the stored ones: overlapping one, it raises
# riverbed_stored (a unique violation naming the version).
_UNSTORED = (
    "($4::bigint = $2::bigint + 1 OR NOT EXISTS (SELECT 1 FROM riverbed_batches WHERE "
    f"stream = $1::text AND version > $4::bigint - {CHUNK_EVENTS} AND version < $4::bigint + "
    "$5::integer AND version + count > $4::bigint) OR riverbed_stored($1, $4, $5))"
)
_INSERTED = (
    f"FROM checked, last WHERE checked.ok AND {_UNSTORED} "
    "RETURNING position + count - 1 AS last) "
    # Delivered when the transaction commits: wakes wait_for_events in every process.
    "SELECT last, pg_notify($3, last::text) FROM inserted"
)
_INSERT = "inserted AS (INSERT INTO riverbed_batches (position, stream, version, count, records) "
# The events numbered by the client from $7, the last position its store's appends committed,
# plus one; $6 their records, joined; their versions go on from the expected version $2 (not
# null; other appends go as APPEND). The server only inserts: a 10-event save took about 190 us
# of its time, against 240 with APPEND. It takes the append lock itself, sent alone (a statement
# less: 10 to 25 us of a save).
# Nothing reads the last position: the primary key finds a guess that another writer made
# stale, as on SQLite. Appends commit one at a time, each numbered on from the last position, and
# events are never deleted, so the rows hold positions 1, 2, ... without a gap; a store's guess
# can only be behind, and then a row starts at the guessed position. That holds for an append
# committed while this one waited for the lock too, which its snapshot (taken before the lock)
# would not see. The insert then inserts nothing and returns no row (ON CONFLICT ... DO
# NOTHING), and the client appends with APPEND. A one-time filter reading the last position cost
# the server ~3 us of a save (bench/README.md, "PostgreSQL numbered appends"); the ON CONFLICT
# clause ~1.4 us, against a failed statement, an ERROR line in the server's log for each stale
# guess: with several processes writing, one every 17 saves of each.
# It also holds its lock on the table as it waits: a transaction waiting to have the table alone
# (ALTER TABLE, say) while it holds what the append holding the lock waits for closes a cycle,
# which the server breaks by failing one of them; this one failing, the client appends with
# APPEND too. Only an append of one statement is numbered so: of several, a failed one would
# leave the others to go again.
# One INSERT with its checks as filters, a plan of few nodes: the server starts every node of a
# plan each time it runs it, those of subqueries that do not run too, and with APPEND's CTEs
# (which also took the stream's version twice, once for the conflict's message) a save took
# ~6 us more (bench/README.md, "PostgreSQL numbered appends").
APPEND_NUMBERED = (
    "INSERT INTO riverbed_batches (position, stream, version, count, records) "
    "SELECT $7::bigint, $1::text, $4::bigint, $5::integer, $6::bytea "
    f"FROM (SELECT {_STREAM_VERSION.format('$1::text')} AS version OFFSET 0) AS actual "
    f"WHERE {_APPEND_LOCK} IS NOT NULL "
    "AND (actual.version = $2::bigint OR riverbed_conflict($1, $2, actual.version)) "
    "ON CONFLICT (position) DO NOTHING "
    # Delivered when the transaction commits: wakes wait_for_events in every process.
    "RETURNING position + count - 1, pg_notify($3, (position + count - 1)::text)"
)
# The SQLSTATEs of an APPEND_NUMBERED that failed so (a unique violation: a version another
# writer saved as this one waited for the lock; a deadlock): it appended nothing, and the append
# goes again for the server to number (and to name a conflict), as after a stale guess.
NUMBERED_AGAIN = frozenset({"23505", "40P01"})
# The events numbered by the server: $6 their records without their positions (each event's
# msgpack array of its fields after ``position``, its header cut off), to which the statement
# adds the array header and the position it gives the event.
APPEND = (
    f"{_CHECK}, last AS (SELECT {_LAST_POSITION} AS position), "
    f"{_INSERT}SELECT last.position + 1, $1::text, $4::bigint, $5::integer, (SELECT string_agg("
    "'\\x99d3'::bytea || int8send(last.position + t.n) || t.record, ''::bytea ORDER BY t.n) "
    "FROM unnest($6::bytea[]) WITH ORDINALITY AS t(record, n)) " + _INSERTED
)
# An append of no events: checks the version; the last position.
CHECK = f"{_CHECK} SELECT {_LAST_POSITION} FROM checked WHERE checked.ok"


# An append statement's stream, expected version and events.
Chunk = tuple[str, int | None, Sequence[NewEvent]]


def append_chunks(appends: Sequence[StreamAppend]) -> Iterator[Chunk]:
    """Each statement's stream, expected version and events, in order. A stream's later chunks
    check nothing: the first checked it, and the lock keeps other appends out."""
    if not appends:  # still one statement: it returns the last position
        yield "", None, ()
    elif len(appends) > 1:
        distinct_streams(appends)
    for append in appends:
        expected: int | None = append.expected_version
        for run in runs(append.events, CHUNK_EVENTS, CHUNK_BYTES) if append.events else [()]:
            yield append.stream, expected, run
            expected = None


def numbered_run(appends: Sequence[StreamAppend]) -> Chunk | None:
    """The append's only statement, if it has one, and APPEND_NUMBERED may append it: it
    appends one stream's events, in one batch row, their versions going on from an expected
    version (a save's)."""
    if len(appends) != 1:
        return None
    append = appends[0]
    expected, events = append.expected_version, append.events
    if expected is None or not events or events[0].version != expected + 1:
        return None
    if len(runs(events, CHUNK_EVENTS, CHUNK_BYTES)) != 1:
        return None
    return append.stream, expected, events


def append_params(
    stream: str, expected: int | None, channel: str, events: Sequence[NewEvent]
) -> list[object]:
    """An append statement's parameters (``APPEND``'s, or ``CHECK``'s with no events), for
    psycopg."""
    if not events:
        return [stream, expected]
    return [stream, expected, channel, events[0].version, len(events), records_of(events)]


def numbered_append_params(
    stream: str, expected: int | None, channel: str, events: Sequence[NewEvent], first: int
) -> list[object]:
    """``APPEND_NUMBERED``'s parameters, the events numbered from ``first``, for psycopg."""
    records = joined_records(events, first)
    return [stream, expected, channel, events[0].version, len(events), records, first]


def records_of(events: Sequence[NewEvent]) -> list[bytes]:
    """Each event's msgpack array of its fields after ``position``, without the array header
    (``APPEND`` adds it, with the position)."""
    return [
        _encoder.encode((e.id, e.stream, e.version, e.type, e.schema, e.data, e.metadata,
                         e.timestamp_ms))[1:]
        for e in events
    ]  # fmt: skip


def page(
    rows: list[tuple[int, int, bytes, int]], after: int, limit: int
) -> list[StoredEvent] | None:
    """READ_ALL's page; None when it came empty, or short while later events exist (gaps):
    READ_ALL_AFTER then reads it."""
    if not rows:
        return None
    return in_range(rows_decoded([row[:3] for row in rows]), after, limit, rows[0][3])


def page_after(rows: list[Row], after: int, limit: int) -> list[StoredEvent]:
    """READ_ALL_AFTER's page."""
    return first_after(rows_decoded(rows), after, limit)


def conflict(detail: str | None) -> ConcurrencyError:
    """The ``ConcurrencyError`` that riverbed_conflict's DETAIL describes."""
    stream, expected, actual = _conflict_detail.decode(detail or "")
    return ConcurrencyError(stream, expected, actual)


STREAM_VERSION_OF = f"SELECT {_STREAM_VERSION.format('%s')}"
# Batch rows as batches.Row. The rows holding the versions from $2 + 1 to $3 of stream $1: one
# starts at most CHUNK_EVENTS - 1 versions before the first.
READ_STREAM = (
    "SELECT position, count, records FROM riverbed_batches WHERE stream = %s "
    "AND version > %s - " + str(CHUNK_EVENTS) + " AND version <= %s AND version + count > %s"
)
# The rows holding positions after $1 up to $2, and the last position (to tell a gap from the
# end). One starts at most CHUNK_EVENTS - 1 positions before the first.
READ_ALL = (
    f"SELECT position, count, records, {_LAST_POSITION} FROM riverbed_batches "
    f"WHERE position > %s - {CHUNK_EVENTS} AND position <= %s AND position + count > %s "
    "ORDER BY position"
)
# Rows holding positions after $1, at most $2: a page when positions have gaps (rows deleted by
# hand), or none came in the range.
READ_ALL_AFTER = (
    f"SELECT position, count, records FROM riverbed_batches WHERE position > %s - {CHUNK_EVENTS} "
    "AND position + count > %s ORDER BY position LIMIT %s"
)
# Positions are gap-free and commit in order: the highest visible one is the last (an index probe).
LAST_POSITION = f"SELECT {_LAST_POSITION}"
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
# Rows of each table, events of the batches.
FOOTPRINT = "SELECT " + " + ".join(
    "(SELECT coalesce(sum(count), 0) FROM riverbed_batches)"
    if table == "riverbed_batches"
    else f"(SELECT count(*) FROM {table})"
    for table in TABLES
)

_conflict_detail = msgspec.json.Decoder(tuple[str, int, int])

# No version bound: read_stream's and load_snapshot's ``None``.
NO_LIMIT = 2**62


def subscriber_lock_key(schema: str, name: str) -> str:
    return f"riverbed/{schema}/{name}"
