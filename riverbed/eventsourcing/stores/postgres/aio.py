"""The event store on PostgreSQL for ``async`` code: psycopg's async connections in a pool, the
same statements as the sync store, and one LISTEN connection read by a background task."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import psycopg
import psycopg_pool
from psycopg import sql
from psycopg.rows import args_row

from riverbed.eventsourcing.errors import EventSourcingError
from riverbed.eventsourcing.records import Snapshot, StoredEvent, StreamAppend
from riverbed.eventsourcing.stores.api import (
    Document,
    check_document_key,
    check_page,
    check_versions,
)
from riverbed.eventsourcing.stores.batches import rows_decoded, versions
from riverbed.eventsourcing.stores.deadlines import connection_wait
from riverbed.eventsourcing.stores.guesses import PositionGuess
from riverbed.eventsourcing.stores.postgres import statements as q
from riverbed.eventsourcing.stores.postgres.liveness import closed_by_server
from riverbed.eventsourcing.stores.postgres.schema import CONFLICT, prepare_schema
from riverbed.eventsourcing.stores.postgres.settings import (
    CANCELLED,
    Settings,
    cancelled,
    closed,
    connection_options,
    forget_connect_error,
    no_connection,
    parse_settings,
    pool_options,
    read_only,
    unanswered,
    unavailable,
)
from riverbed.eventsourcing.stores.postgres.watchdog import Watchdog
from riverbed.urls import BackendUrl


def _connected(name: str) -> Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]:
    async def configure(_: psycopg.AsyncConnection[Any]) -> None:
        forget_connect_error(name)

    return configure


class _Pool(psycopg_pool.AsyncConnectionPool[Any]):
    """psycopg_pool's async pool, whose worker ends when cancelled while it connects. Its
    own catches that cancellation, to keep the pool consistent, and waits for its next task:
    ``asyncio.run`` of a loop that ended without ``close_async`` while the pool grew waited
    for it for ever."""

    async def _add_connection(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super()._add_connection(*args, **kwargs)
        finally:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                task.cancel()  # again: the worker ends at its next wait for a task


class AsyncPostgresEventStore:
    """The ``postgresql://`` store of ``PostgresEventStore`` for ``asyncio``; open it with
    ``await AsyncPostgresEventStore.connect(url)``."""

    def __init__(
        self, url: str, settings: Settings, pool: psycopg_pool.AsyncConnectionPool[Any]
    ) -> None:
        self.url = url
        self._settings = settings
        self._pool = pool
        self._listener: AsyncListener | None = None
        self._listener_lock = asyncio.Lock()
        self._guess = PositionGuess()
        self._watchdog = Watchdog(settings.command_timeout, pool.name)

    @classmethod
    async def connect(cls, url: BackendUrl) -> AsyncPostgresEventStore:
        settings = parse_settings(url)
        # Once per store, with the sync driver in a thread: the same code as the sync store's.
        await asyncio.to_thread(prepare_schema, settings)
        options = pool_options(settings)
        pool: psycopg_pool.AsyncConnectionPool[Any] = _Pool(
            **options,
            configure=_connected(options["name"]),
            # Calls already waiting for a connection get a new try, not only the next call.
            reconnect_failed=psycopg_pool.AsyncConnectionPool.check,
        )
        try:
            await pool.open(wait=True, timeout=settings.pool_timeout)
        except psycopg_pool.PoolTimeout as error:
            await pool.close()
            raise unavailable(settings, error) from None
        except BaseException:  # cancelled: its tasks would run on, and its connections stay
            await asyncio.shield(pool.close())
            raise
        return cls(url.raw, settings, pool)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection. A lost server raises ``StoreUnavailableError`` (the pool
        replaces the broken connection)."""
        conn: psycopg.AsyncConnection[Any] | None = None
        wait = connection_wait(self._settings.pool_timeout)
        try:
            conn = await self._pool.getconn(wait)
            for _ in range(self._settings.pool_size):  # after a restart, every one it had
                if not closed_by_server(conn):
                    break
                # Closed while it sat in the pool: the pool replaces it, and the call goes on
                # another.
                await self._pool.putconn(conn)
                conn = await self._pool.getconn(wait)
            try:
                # Commits, or rolls back, as the pool's connection() does.
                with self._watchdog.watching(conn):
                    async with conn:
                        yield conn
            finally:
                # Shielded: a task cancelled while the pool took the connection back lost it
                # to the pool for good, which kept counting it as lent.
                await asyncio.shield(self._pool.putconn(conn))
        except psycopg_pool.PoolClosed:
            raise closed(self._settings) from None
        except psycopg_pool.PoolTimeout as error:
            stats = self._pool.get_stats()
            raise no_connection(self._settings, error, stats, self._pool.name, wait) from None
        except psycopg.errors.ReadOnlySqlTransaction as error:
            raise read_only(self._settings, error) from None
        except CANCELLED as error:
            raise cancelled(self._settings, error) from None
        except psycopg.OperationalError as error:
            if conn is None or not conn.broken:
                raise
            if self._watchdog.timed_out(conn):
                # Not the pool's check, whose statements would wait as this one did.
                raise unanswered(self._settings) from None
            # The server restarted or dropped us: replace every dead connection now, so that
            # one call fails, not one per pooled connection.
            await self._pool.check()
            raise unavailable(self._settings, error) from None

    async def append(self, appends: Sequence[StreamAppend]) -> int:
        """The same statements as the sync store's append (statements.py), pipelined by
        psycopg in one transaction: an append of one statement numbered on from the last
        position this store's appends committed, unless another writer appended since."""
        only = q.numbered_run(appends)
        last = None if only is None else self._guess.take()
        position = None
        if only is not None and last is not None:
            position = await self._appended([only], last)
            if position is None:  # refused: nothing was appended
                self._guess.stale()
        if position is None:
            position = await self._appended(list(q.append_chunks(appends)), None)
            assert position is not None  # APPEND and CHECK return a row, or raise
        self._guess.committed(position)
        return position

    async def _appended(self, chunks: list[q.Chunk], last: int | None) -> int | None:
        """The last position of the append of ``chunks``: of one numbered on from ``last``,
        None when it appended nothing (a stale guess, or statements.NUMBERED_AGAIN); else
        numbered by the server."""
        async with self._connection() as conn:
            try:
                row = await _pipelined(conn, chunks, last, self._settings.channel)
            except psycopg.DatabaseError as error:
                if last is not None and error.sqlstate in q.NUMBERED_AGAIN:
                    return None  # a version saved as it waited for the lock, or a deadlock
                if isinstance(error, psycopg.errors.UniqueViolation):
                    raise EventSourcingError(f"cannot append: {str(error).strip()}") from None
                if error.sqlstate == CONFLICT:
                    raise q.conflict(error.diag.message_detail) from None
                raise
        if row is None:  # APPEND_NUMBERED inserted nothing: a stale guess
            assert last is not None  # APPEND and CHECK return a row, or raise
            return None
        return int(row[0])

    async def read_stream(
        self, stream: str, from_version: int = 1, to_version: int | None = None
    ) -> list[StoredEvent]:
        check_versions(from_version, to_version)
        upto = q.NO_LIMIT if to_version is None else to_version
        async with self._connection() as conn:
            cur = conn.cursor(binary=True)
            await cur.execute(q.READ_STREAM, (stream, from_version, upto, from_version))
            rows = await cur.fetchall()
        return versions(rows_decoded(rows), from_version, upto)

    async def read_all(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        check_page(after, limit)
        async with self._connection() as conn:
            cur = conn.cursor(binary=True)
            await cur.execute(q.READ_ALL, (after + 1, after + limit, after + 1))
            found = q.page(await cur.fetchall(), after, limit)
            if found is None:
                await cur.execute(q.READ_ALL_AFTER, (after + 1, after + 1, limit))
                found = q.page_after(await cur.fetchall(), after, limit)
            return found

    async def last_position(self) -> int:
        return int(await self._value(q.LAST_POSITION))

    async def load_snapshot(self, stream: str, max_version: int | None = None) -> Snapshot | None:
        upto = q.NO_LIMIT if max_version is None else max_version
        async with self._connection() as conn:
            cur = conn.cursor(binary=True, row_factory=args_row(Snapshot))
            await cur.execute(q.LOAD_SNAPSHOT, (stream, upto))
            return await cur.fetchone()

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        s = snapshot
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                q.SAVE_SNAPSHOT, (s.stream, s.version, s.type, s.schema, s.data, s.timestamp_ms)
            )
            await conn.execute(q.PRUNE_SNAPSHOTS, (s.stream, s.version))

    async def stream_key(self, stream: str, create: bool) -> bytes | None:
        key: bytes | None = await self._value(q.STREAM_KEY, (stream,))
        if key is not None or not create:
            return key
        created: bytes = await self._value(q.CREATE_STREAM_KEY, (stream, os.urandom(q.KEY_BYTES)))
        return created

    async def wait_for_events(self, after: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        listener = await self._listening()
        # LISTEN is on before this read, so no append after it goes unnoticed.
        listener.saw(await self.last_position())
        return await listener.wait(after, deadline)

    async def _listening(self) -> AsyncListener:
        async with self._listener_lock:
            if self._listener is not None and self._listener.lost is not None:
                # Its connection broke: listen on a new one.
                await self._listener.close()
                self._listener = None
            if self._listener is None:
                self._listener = await AsyncListener.start(self._settings)
            return self._listener

    async def get_document(self, collection: str, key: str) -> Document | None:
        check_document_key(collection, key)
        document: Document | None = await self._value(q.GET_DOCUMENT, (collection, key))
        return document

    async def documents(self, collection: str, limit: int | None = None) -> dict[str, Document]:
        check_document_key(collection, "")
        async with self._connection() as conn:
            cur = await conn.execute(q.DOCUMENTS, (collection, limit))
            return dict(await cur.fetchall())

    async def checkpoint(self, name: str) -> int:
        return int(await self._value(q.CHECKPOINT, (name,), 0))

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()
        await self._pool.close()
        self._watchdog.close()
        forget_connect_error(self._pool.name)

    async def _value(self, query: str, params: Sequence[Any] = (), default: Any = None) -> Any:
        """The first column of the query's one row, or ``default`` when it finds none."""
        async with self._connection() as conn:
            cur = await conn.execute(query, params)
            row = await cur.fetchone()
        return default if row is None else row[0]


async def _pipelined(
    conn: psycopg.AsyncConnection[Any],
    chunks: list[q.Chunk],
    last: int | None,
    channel: str,
) -> tuple[Any, ...] | None:
    """The append's statements, pipelined in one transaction; the last one's row. A statement's
    error can reach the loop that sends the next ones (psycopg reads results as it sends); it is
    raised once the pipeline has ended: raised inside, psycopg logged the pipeline's end as an
    error ignored."""
    failed: psycopg.DatabaseError | None = None
    try:
        # Fetched once the pipeline has sent COMMIT too: in the transaction, a fetch waited for
        # a round trip holding the lock, and then for its task's next turn on the loop, while
        # every other append waited for the lock.
        async with conn.pipeline(), conn.transaction():
            cur = psycopg.AsyncRawCursor(conn)
            try:
                if last is None:  # APPEND_NUMBERED takes the lock itself
                    await cur.execute(q.LOCK_OWN_APPEND, prepare=True)
                for stream, expected, events in chunks:
                    if last is None:
                        params = q.append_params(stream, expected, channel, events)
                        await cur.execute(q.APPEND if events else q.CHECK, params, prepare=True)
                    else:
                        params = q.numbered_append_params(
                            stream, expected, channel, events, last + 1
                        )
                        await cur.execute(q.APPEND_NUMBERED, params, prepare=True)
            except psycopg.DatabaseError as error:
                failed = error
        if failed is None:
            return await cur.fetchone()
    except psycopg.DatabaseError:
        if failed is None:
            raise
    raise failed


class AsyncListener:
    """The store's LISTEN connection: a task reads its notifications (each carries an append's
    last position) and wakes the waiters."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], settings: Settings) -> None:
        self._conn = conn
        self._settings = settings
        self._newest = 0
        self._changed = asyncio.Condition()
        self.lost: psycopg.OperationalError | None = None  # why the connection broke
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, settings: Settings) -> AsyncListener:
        try:
            conn = await psycopg.AsyncConnection.connect(
                settings.conninfo, autocommit=True, options=connection_options(settings)
            )
        except psycopg.OperationalError as error:
            raise unavailable(settings, error) from None
        try:
            await conn.execute(sql.SQL(q.LISTEN).format(sql.Identifier(settings.channel)))
        except psycopg.OperationalError as error:  # dropped already (a server restarting)
            await conn.close()
            raise unavailable(settings, error) from None
        return cls(conn, settings)

    async def _read(self) -> None:
        try:
            async for notify in self._conn.notifies():
                async with self._changed:
                    self._newest = max(self._newest, int(notify.payload))
                    self._changed.notify_all()
        except psycopg.OperationalError as error:
            async with self._changed:
                self.lost = error
                self._changed.notify_all()

    def saw(self, position: int) -> None:
        self._newest = max(self._newest, position)

    async def wait(self, after: int, deadline: float) -> bool:
        """Whether a position above ``after`` is known by ``deadline``."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._newest > after or self.lost is not None),
                    max(0.0, deadline - time.monotonic()),
                )
            if self._newest <= after and self.lost is not None:
                raise unavailable(self._settings, self.lost) from None
            return self._newest > after

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._conn.close()
