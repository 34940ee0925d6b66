"""The event store on PostgreSQL (psycopg 3): ``postgresql://user@host:5432/db?schema=public``.

- ``schema``: the schema holding the store's tables (created if missing; default ``public``),
  so several stores can share one database; ``pool_size``: connections per store (10);
  ``pool_timeout``: seconds a call waits for one (30), which is how long calls take to fail
  while the server is down.
- ``settings`` turns the URL into libpq's conninfo, ``schema`` creates the tables and the append
  function (and explains the gap-free global order), ``statements`` holds the SQL the sync store
  (``sync``) and the async one (``aio``) share.
"""

from __future__ import annotations

from riverbed.eventsourcing.stores.postgres.aio import AsyncPostgresEventStore
from riverbed.eventsourcing.stores.postgres.sync import PostgresEventStore, PostgresTransaction

__all__ = ["AsyncPostgresEventStore", "PostgresEventStore", "PostgresTransaction"]
