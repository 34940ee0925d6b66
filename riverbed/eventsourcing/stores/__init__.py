"""Event stores: ``sqlite:///.riverbed/events.db`` (default) and ``postgresql://user@host/db``."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from riverbed.errors import MissingExtraError
from riverbed.eventsourcing.stores.api import AsyncEventStore, EventStore, Transaction
from riverbed.log.sqlite.kinds import file_kind
from riverbed.urls import parse_url, resolve_url

EVENTS_URL_ENV = "RIVERBED_EVENTS_URL"
DEFAULT_EVENTS_URL = "sqlite:///.riverbed/events.db"
SCHEMES = ("sqlite", "postgresql", "postgres")


def connect_store(url: str | None = None) -> EventStore:
    """The store at ``url``, else ``$RIVERBED_EVENTS_URL``, else the SQLite default. A server
    that cannot be reached fails fast with ``StoreUnavailableError``."""
    resolved = resolve_url(url, EVENTS_URL_ENV, DEFAULT_EVENTS_URL)
    parsed = parse_url(resolved, SCHEMES)
    if parsed.scheme == "sqlite":
        from riverbed.eventsourcing.stores.sqlite import SqliteEventStore

        return SqliteEventStore(parsed)
    _require_psycopg()
    from riverbed.eventsourcing.stores.postgres import PostgresEventStore

    return PostgresEventStore(parsed)


async def connect_async_store(url: str | None = None) -> AsyncEventStore:
    """The async face of the store at ``url``: native (psycopg's async connections) on
    PostgreSQL; on SQLite the sync store's calls run in a worker thread."""
    resolved = resolve_url(url, EVENTS_URL_ENV, DEFAULT_EVENTS_URL)
    parsed = parse_url(resolved, SCHEMES)
    if parsed.scheme == "sqlite":
        from riverbed.eventsourcing.stores.threaded import ThreadedAsyncStore

        return ThreadedAsyncStore(connect_store(resolved))
    _require_psycopg()
    from riverbed.eventsourcing.stores.postgres import AsyncPostgresEventStore

    return await AsyncPostgresEventStore.connect(parsed)


def missing_store(url: str | None = None) -> str | None:
    """Why there is no event store at ``url`` yet (nothing is created to find out), or None
    if there is one. An unreachable server raises ``StoreUnavailableError``."""
    resolved = resolve_url(url, EVENTS_URL_ENV, DEFAULT_EVENTS_URL)
    parsed = parse_url(resolved, SCHEMES)
    if parsed.scheme == "sqlite":
        return _missing_sqlite_store(Path(parsed.location))
    _require_psycopg()
    from riverbed.eventsourcing.stores.postgres.schema import schema_missing
    from riverbed.eventsourcing.stores.postgres.settings import parse_settings

    return schema_missing(parse_settings(parsed))


def _missing_sqlite_store(path: Path) -> str | None:
    if not path.exists():
        return f"no event store at {str(path)!r} (no such file)"
    if path.is_dir():
        return f"{str(path)!r} is a directory; name a file (in it, say) in the URL"
    try:
        kind = file_kind(path)
    except sqlite3.DatabaseError as error:
        return f"{str(path)!r} is not an event store ({error})"
    if kind == "event store":
        return None
    if kind == "":
        return f"no event store at {str(path)!r} (the file is an empty database)"
    what = f"a riverbed {kind}" if kind is not None else "a database riverbed did not create"
    return f"{str(path)!r} is {what}, not an event store"


def runs_in_threads(url: str | None = None) -> bool:
    """Whether the async face of the store at ``url`` is its sync store's calls run in worker
    threads (SQLite's), which any event loop can share."""
    resolved = resolve_url(url, EVENTS_URL_ENV, DEFAULT_EVENTS_URL)
    return parse_url(resolved, SCHEMES).scheme == "sqlite"


def _require_psycopg() -> None:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise MissingExtraError("the postgresql:// event store", "postgres", "psycopg") from None


__all__ = [
    "DEFAULT_EVENTS_URL",
    "EVENTS_URL_ENV",
    "AsyncEventStore",
    "EventStore",
    "Transaction",
    "connect_async_store",
    "connect_store",
    "missing_store",
    "runs_in_threads",
]
