"""The store's tables, created in the URL's schema when a store opens.

An append takes a transaction-scoped advisory lock named after the store's schema, checks the
streams' versions, numbers its events after the highest stored position, inserts them and
commits; the lock is released only after the commit is visible, so the next append numbers after
it. Positions are thus handed out in commit order with no gaps, and a reader that sees position N
sees every position below it. A sequence (``bigserial``) would not do: transactions commit in
another order than they drew their numbers, so a reader could pass a number whose transaction
commits later, and a rolled-back append would leave a hole for ever. The pyeventsourcing library
gets the first property with ``LOCK TABLE ... IN EXCLUSIVE MODE`` around a sequence (holes stay).
Schema version 1 locked and updated a one-row head table instead: an advisory lock writes no
WAL, and dropping that row update made an append 15 us (7%) cheaper.

The lock is a statement of its own, before the statements that check and insert
(statements.py): in READ COMMITTED each statement sees what committed before it started, so they
see every earlier append. One statement could not lock and then read: its snapshot is taken
before it waits for the lock. Versions 1 and 2 ran the statements in a plpgsql function, for one
round trip; version 3 pipelines them instead, which is one round trip too and cheaper.

``riverbed_head`` holds the schema version. Version 2 added ``riverbed_leases``; version 3
replaced the append function by ``riverbed_conflict``; version 4 keeps read-model documents as
``json`` (as written: ``jsonb`` wrote 1e16 back as an integer, -0.0 as 0, and reordered keys) and
their collections and keys in code-point order (``COLLATE "C"``), as SQLite orders them.

Version 5 keeps a save's events in one row of ``riverbed_batches``, as the SQLite store does: a
run of a stream's consecutive versions, with the position and version of its first event, its
event count and its events' records (each a ``StoredEvent`` msgpack array) joined. A row per
event put 10 heap tuples and 20 index entries in a 10-event save, most of the server's work for
it; a read decodes a page's records in one call. ``riverbed_events`` was the table of a row per
event, its rows moved into batch rows of one event when a store is upgraded.

A store of an older version is brought up to date when it opens, the DDL being idempotent.

A batch row's records are compressed with lz4 where the server has it (PostgreSQL 14 or later
built with lz4, as Debian's and the PGDG packages are), set when a store opens, whatever its
version: a 10-event save's row (~2 KB) is just over the size from which the server compresses a
value, and its default, pglz, took ~7 us of such a save's ~88 (bench/README.md, "lz4 records");
lz4 stores the rows as small (~660 bytes), and reads decompress them faster. Rows written before
stay as they are; the server reads both.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg import sql

from riverbed.eventsourcing.errors import EventSourcingError
from riverbed.eventsourcing.stores.postgres.settings import (
    Settings,
    connection_options,
    read_only,
    unavailable,
)

SCHEMA_VERSION = 5
log = logging.getLogger("riverbed.events")
# Several processes opening a new store at once would race on the catalogs (CREATE ... IF NOT
# EXISTS is not safe against a concurrent CREATE); they take turns on this advisory lock.
SETUP_LOCK = 0x72697665_72626564  # "riverbed"
# Whether the server has lz4 and the batch rows' records are not compressed with it yet.
RECORDS_NOT_LZ4 = (
    "SELECT attcompression <> 'l' FROM pg_attribute WHERE attrelid = 'riverbed_batches'::regclass "
    "AND attname = 'records' AND EXISTS (SELECT FROM pg_settings "
    "WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals))"
)
COMPRESS_RECORDS = "ALTER TABLE riverbed_batches ALTER COLUMN records SET COMPRESSION lz4"
LZ4_LOCK_TIMEOUT = "200ms"
# Why COMPRESS_RECORDS may fail, the store opening all the same: not the tables' owner, a
# read-only transaction (a standby's: its primary's store sets it), a wait for the table's lock
# cut short.
_NOT_COMPRESSING = (
    psycopg.errors.InsufficientPrivilege,
    psycopg.errors.ReadOnlySqlTransaction,
    psycopg.errors.LockNotAvailable,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.QueryCanceled,
)
# The SQLSTATE riverbed_conflict raises, its DETAIL being [stream, expected, actual] as JSON.
CONFLICT = "RB409"

TABLES = (
    "riverbed_batches",
    "riverbed_snapshots",
    "riverbed_stream_keys",
    "riverbed_checkpoints",
    "riverbed_documents",
    "riverbed_parked",
    "riverbed_inbox",
    "riverbed_timers",
    "riverbed_leases",
)

DDL = f"""
CREATE TABLE IF NOT EXISTS riverbed_head (
    id smallint PRIMARY KEY CHECK (id = 1),
    schema_version integer NOT NULL
);
-- Version 1 kept the last position here; it is max(position) of the events now.
ALTER TABLE riverbed_head DROP COLUMN IF EXISTS position;
INSERT INTO riverbed_head (id, schema_version) VALUES (1, {SCHEMA_VERSION})
    ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS riverbed_batches (
    position bigint PRIMARY KEY,
    stream text NOT NULL,
    version bigint NOT NULL,
    count integer NOT NULL,
    records bytea NOT NULL,
    UNIQUE (stream, version)
);
CREATE TABLE IF NOT EXISTS riverbed_snapshots (
    stream text NOT NULL,
    version bigint NOT NULL,
    type text NOT NULL,
    schema integer NOT NULL,
    data bytea NOT NULL,
    timestamp_ms bigint NOT NULL,
    PRIMARY KEY (stream, version)
);
CREATE TABLE IF NOT EXISTS riverbed_stream_keys (stream text PRIMARY KEY, key bytea NOT NULL);
CREATE TABLE IF NOT EXISTS riverbed_checkpoints (name text PRIMARY KEY, position bigint NOT NULL);
CREATE TABLE IF NOT EXISTS riverbed_documents (
    collection text COLLATE "C" NOT NULL,
    key text COLLATE "C" NOT NULL,
    document json NOT NULL,
    PRIMARY KEY (collection, key)
);
-- Version 4: what version 3 made (jsonb, the database's collation) as version 4 makes it.
ALTER TABLE riverbed_documents
    ALTER COLUMN collection TYPE text COLLATE "C",
    ALTER COLUMN key TYPE text COLLATE "C",
    ALTER COLUMN document TYPE json;
CREATE TABLE IF NOT EXISTS riverbed_parked (
    projection text NOT NULL,
    position bigint NOT NULL,
    event_id text NOT NULL,
    type text NOT NULL,
    error text NOT NULL,
    parked_ms bigint NOT NULL,
    PRIMARY KEY (projection, position)
);
CREATE TABLE IF NOT EXISTS riverbed_inbox (
    name text NOT NULL,
    event_id text NOT NULL,
    PRIMARY KEY (name, event_id)
);
CREATE TABLE IF NOT EXISTS riverbed_timers (
    name text NOT NULL,
    key text NOT NULL,
    due_ms bigint NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (name, key)
);
CREATE INDEX IF NOT EXISTS riverbed_timers_due ON riverbed_timers (name, due_ms);
CREATE TABLE IF NOT EXISTS riverbed_leases (
    name text PRIMARY KEY,
    owner text NOT NULL,
    expires_ms bigint NOT NULL
);

-- Schema version 2 appended through a function; the statements of statements.py do it now.
DROP FUNCTION IF EXISTS riverbed_append(jsonb, text);
DROP FUNCTION IF EXISTS riverbed_append(json, text);
-- An append's version check calls this when a stream is not at the version expected: the error
-- rolls the whole append back, and its DETAIL tells the client the stream and both versions.
CREATE OR REPLACE FUNCTION riverbed_conflict(p_stream text, p_expected bigint, p_actual bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = '{CONFLICT}',
        MESSAGE = format('stream %L is at version %s, not the expected %s',
                         p_stream, p_actual, p_expected),
        DETAIL = json_build_array(p_stream, p_expected, p_actual)::text;
END
$$;

-- An append of no expected version calls this when it gives versions from p_version on, p_count
-- of them, of which the stream holds one: the error names the first held.
CREATE OR REPLACE FUNCTION riverbed_stored(p_stream text, p_version bigint, p_count integer)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    held bigint;
BEGIN
    SELECT min(greatest(version, p_version)) INTO held FROM riverbed_batches
        WHERE stream = p_stream AND version < p_version + p_count AND version + count > p_version;
    RAISE EXCEPTION USING
        ERRCODE = 'unique_violation',
        MESSAGE = format('version %s of stream %L is stored already', held, p_stream);
END
$$;

-- Last: an older store is now this version (prepare_schema refused a newer one).
UPDATE riverbed_head SET schema_version = {SCHEMA_VERSION} WHERE id = 1;
"""

# Version 5 keeps a save's events in one row: each event of an older store becomes a row of its
# own, its record the StoredEvent msgpack array riverbed decodes (ints as int64, texts as str32,
# bytes as bin32). A text's length is that of its UTF-8 bytes, which a database of another
# encoding (LATIN1, say) stores in fewer.
MOVE_EVENTS = """
INSERT INTO riverbed_batches (position, stream, version, count, records)
SELECT position, stream, version, 1,
    '\\x99d3'::bytea || int8send(position)
    || '\\xdb'::bytea || int4send(length(utf8.id_bytes)) || utf8.id_bytes
    || '\\xdb'::bytea || int4send(length(utf8.stream_bytes)) || utf8.stream_bytes
    || '\\xd3'::bytea || int8send(version)
    || '\\xdb'::bytea || int4send(length(utf8.type_bytes)) || utf8.type_bytes
    || '\\xd2'::bytea || int4send(schema)
    || '\\xc6'::bytea || int4send(length(data)) || data
    || '\\xc6'::bytea || int4send(length(metadata)) || metadata
    || '\\xd3'::bytea || int8send(timestamp_ms)
FROM riverbed_events, LATERAL (
    SELECT convert_to(id, 'UTF8') AS id_bytes, convert_to(stream, 'UTF8') AS stream_bytes,
        convert_to(type, 'UTF8') AS type_bytes
) AS utf8
"""


def prepare_schema(settings: Settings) -> None:
    """Create the schema, tables and function if missing; refuse a store a newer riverbed made.
    An unreachable server raises ``StoreUnavailableError``."""
    try:
        conn = psycopg.connect(settings.conninfo, options=connection_options(settings))
    except psycopg.OperationalError as error:
        raise unavailable(settings, error) from None
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SETUP_LOCK,))
            found = conn.execute("SELECT to_regclass('riverbed_head') IS NOT NULL").fetchone()
            if found is not None and found[0]:
                version = conn.execute(
                    "SELECT schema_version FROM riverbed_head WHERE id = 1"
                ).fetchone()
                if version is not None and version[0] > SCHEMA_VERSION:
                    raise EventSourcingError(
                        f"the event store at {settings.where} (schema {settings.schema!r}) has "
                        f"schema version {version[0]}, newer than this riverbed's "
                        f"{SCHEMA_VERSION}; upgrade riverbed"
                    )
                if version is not None and version[0] == SCHEMA_VERSION:
                    _compress_records(conn, settings)
                    return
                # An older version: the DDL below adds what it lacks.
            # Only when missing: CREATE SCHEMA checks the CREATE privilege on the database even
            # with IF NOT EXISTS, which a user of an existing schema may lack.
            missing = conn.execute("SELECT to_regnamespace(%s) IS NULL", (settings.schema,))
            if (row := missing.fetchone()) is not None and row[0]:
                conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(settings.schema)))
            conn.execute(DDL.encode())
            _move_events(conn, settings)
            _compress_records(conn, settings)
    except psycopg.OperationalError as error:
        raise unavailable(settings, error) from None
    except psycopg.errors.ReadOnlySqlTransaction as error:
        raise read_only(settings, error) from None
    except psycopg.errors.InsufficientPrivilege as error:
        raise EventSourcingError(
            f"cannot create the event store's tables at {settings.where} (schema "
            f"{settings.schema!r}): {str(error).strip()}; the URL's user needs the CREATE "
            "privilege there"
        ) from None
    except psycopg.Error as error:  # a view of the user's on a table an upgrade alters, say
        raise EventSourcingError(
            f"cannot create or upgrade the event store's tables at {settings.where} (schema "
            f"{settings.schema!r}) to schema version {SCHEMA_VERSION}: "
            f"{' '.join(str(error).split())}"
        ) from None
    finally:
        conn.close()


def _move_events(conn: psycopg.Connection[Any], settings: Settings) -> None:
    """A store of schema version 4 or older (a row per event) as version 5: each event a batch
    row. Appends and reads wait for the transaction meanwhile: a large store takes a while."""
    found = conn.execute("SELECT to_regclass('riverbed_events') IS NOT NULL").fetchone()
    if found is not None and found[0]:
        moved = conn.execute(MOVE_EVENTS.encode()).rowcount
        conn.execute("DROP TABLE riverbed_events")
        log.info("event store upgraded to schema version %d: %d events moved (%s, schema %r)",
                 SCHEMA_VERSION, moved, settings.where, settings.schema)  # fmt: skip


def _compress_records(conn: psycopg.Connection[Any], settings: Settings) -> None:
    """Have the server compress the records of the batch rows written from now on with lz4, if
    it can and does not yet: once per store, a change of the catalog alone. It waits for the
    transactions using the table, and appends and reads wait for it meanwhile, so for at most
    LZ4_LOCK_TIMEOUT: a long transaction (a ``pg_dump``, say) would hold them all up. A wait
    cut short, a user of the store who does not own its tables, or a read-only connection (a
    standby's) leaves them as they are (logged; the next store to open tries again): the store
    works the same, its appends a little slower."""
    if conn.info.server_version < 140000:  # before COMPRESSION, and its catalog column
        return
    row = conn.execute(RECORDS_NOT_LZ4).fetchone()
    if row is None or not row[0]:
        return
    try:
        with conn.transaction():  # a savepoint: refused, the store's set-up goes on
            conn.execute(f"SET LOCAL lock_timeout = '{LZ4_LOCK_TIMEOUT}'")
            conn.execute(COMPRESS_RECORDS)
    except _NOT_COMPRESSING as error:
        log.info("event store records stay compressed with the server's default, not lz4 "
                 "(%s, schema %r): %s", settings.where, settings.schema,
                 " ".join(str(error).split()))  # fmt: skip


def schema_missing(settings: Settings) -> str | None:
    """Why the store's tables are not there (its schema or riverbed's tables missing), or None
    if they are; nothing is created."""
    try:
        with psycopg.connect(settings.conninfo, options=connection_options(settings)) as conn:
            row = conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL", (f"{settings.schema}.riverbed_head",)
            ).fetchone()
    except psycopg.OperationalError as error:
        raise unavailable(settings, error) from None
    if row is not None and row[0]:
        return None
    return f"no event store at {settings.where} (schema {settings.schema!r} has no riverbed tables)"
