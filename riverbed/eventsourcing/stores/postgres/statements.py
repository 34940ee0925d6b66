"""The SQL the sync and async stores share, and the conversions around it that do not touch a
connection. Names are unqualified: every connection's search_path is the store's schema."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from psycopg.types.json import Jsonb

from riverbed.eventsourcing.errors import ConcurrencyError
from riverbed.eventsourcing.records import StreamAppend
from riverbed.eventsourcing.stores.postgres.schema import TABLES

# Columns in the order of StoredEvent's fields, so rows become events with ``args_row``.
EVENT_COLUMNS = "position, id, stream, version, type, schema, data, metadata, timestamp_ms"

# One call appends a whole batch, whatever its size: one statement, one round trip. The sync
# store runs it through libpq (libpq_append.py), with libpq's numbered placeholders.
_APPEND_COLUMNS = "SELECT last_position, conflict_stream, conflict_expected, conflict_actual "
APPEND = _APPEND_COLUMNS + "FROM riverbed_append(%s, %s)"
APPEND_NUMBERED = _APPEND_COLUMNS + "FROM riverbed_append($1, $2)"
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
    "INSERT INTO riverbed_documents (collection, key, document) VALUES (%s, %s, %s) "
    "ON CONFLICT (collection, key) DO UPDATE SET document = excluded.document"
)
DELETE_DOCUMENT = "DELETE FROM riverbed_documents WHERE collection = %s AND key = %s"
DROP_COLLECTION = "DELETE FROM riverbed_documents WHERE collection = %s"
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
    "ORDER BY due_ms, key LIMIT %s"
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

_json_encoder = msgspec.json.Encoder()

# No version bound: read_stream's and load_snapshot's ``None``.
NO_LIMIT = 2**62


def append_params(appends: Sequence[StreamAppend], channel: str) -> tuple[Jsonb, str]:
    """APPEND's parameters: the appends as JSON, encoded by msgspec in one call."""
    return Jsonb(appends, dumps=_json_encoder.encode), channel


def appended(row: tuple[Any, ...] | None) -> int:
    """The last position APPEND returned, or the ``ConcurrencyError`` it reported."""
    assert row is not None
    last_position, stream, expected, actual = row
    if last_position is None:
        raise ConcurrencyError(stream, expected, actual)
    position: int = last_position
    return position


def subscriber_lock_key(schema: str, name: str) -> str:
    return f"riverbed/{schema}/{name}"
