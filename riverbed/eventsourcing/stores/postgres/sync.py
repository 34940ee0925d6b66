"""The event store on PostgreSQL for sync code: a pool of autocommit connections (a read is one
round trip; a write opens its own transaction), and one LISTEN connection for the waiters.

While a thread holds a subscriber's transaction, the store's calls on that thread run in it, as
they do on SQLite (whose connections are per thread): a handler that appended through the
transaction sees its append when it reads through the store, and an append through the store
joins the transaction instead of waiting forever for the append lock that transaction holds."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar

import psycopg
import psycopg_pool
from psycopg import pq, sql
from psycopg.rows import args_row
from psycopg.sql import Composable

from riverbed.eventsourcing.errors import HandlerAbortedTransactionError
from riverbed.eventsourcing.records import (
    ParkedEvent,
    Snapshot,
    StoredEvent,
    StreamAppend,
    Timer,
)
from riverbed.eventsourcing.stores.api import (
    Document,
    check_document_key,
    check_page,
    check_statement,
    check_versions,
    document_text,
)
from riverbed.eventsourcing.stores.batches import rows_decoded, versions
from riverbed.eventsourcing.stores.deadlines import connection_wait
from riverbed.eventsourcing.stores.guesses import PositionGuess
from riverbed.eventsourcing.stores.postgres import libpq_append
from riverbed.eventsourcing.stores.postgres import statements as q
from riverbed.eventsourcing.stores.postgres.liveness import closed_by_server
from riverbed.eventsourcing.stores.postgres.schema import prepare_schema
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
from riverbed.eventsourcing.stores.postgres.spinning import AnswerWait
from riverbed.eventsourcing.stores.postgres.watchdog import Watchdog
from riverbed.urls import BackendUrl

P = ParamSpec("P")
R = TypeVar("R")


class _ThreadState(threading.local):
    transaction: psycopg.Connection[Any] | None = None  # the thread's open transaction's


class _KeptAppender:
    """The pooled connection kept for appends, with what its appends use each time: its
    session (the statements prepared there, a poller of its socket) and its watchdog block."""

    __slots__ = ("conn", "session", "watching")

    def __init__(self, conn: psycopg.Connection[Any], watchdog: Watchdog) -> None:
        self.conn = conn
        self.session = libpq_append.session_of(conn)
        self.watching = watchdog.watching(conn)


class PostgresEventStore:
    """``postgresql://user[:password]@host:5432/db?schema=public&pool_size=10&spin_us=200&
    command_timeout=60``, plus libpq's ``connect_timeout`` (3 s), ``sslmode`` and the like."""

    def __init__(self, url: BackendUrl) -> None:
        self.url = url.raw
        self._settings = parse_settings(url)
        prepare_schema(self._settings)
        options = pool_options(self._settings)
        self._pool = psycopg_pool.ConnectionPool(
            **options,
            configure=lambda _: forget_connect_error(options["name"]),
            # Calls already waiting for a connection get a new try, not only the next call.
            reconnect_failed=psycopg_pool.ConnectionPool.check,
        )
        try:
            self._pool.open(wait=True, timeout=self._settings.pool_timeout)
        except psycopg_pool.PoolTimeout as error:
            self._pool.close()
            raise unavailable(self._settings, error) from None
        self._listener: Listener | None = None
        self._listener_lock = threading.Lock()
        self._local = _ThreadState()
        # A pooled connection kept for appends, used by whichever thread finds it free: a save
        # per command then skips the pool's checkout and return (a tenth of its time). Appends
        # take turns on the server anyway; concurrent ones use the pool. Not with a pool of
        # one, whose only connection every other call needs too.
        self._appender: _KeptAppender | None = None
        self._appender_free = threading.Lock()
        self._keeps_appender = self._settings.pool_size > 1
        self._guess = PositionGuess()
        self._answers = AnswerWait(self._settings.spin_us)
        self._watchdog = Watchdog(self._settings.command_timeout, options["name"])

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """This thread's open transaction's connection, else a pooled one. A lost server raises
        ``StoreUnavailableError`` (the pool replaces the broken connection)."""
        conn = self._local.transaction
        try:
            if conn is not None:  # the thread's transaction's, between its own statements
                with self._watchdog.watching(conn):
                    yield conn
                return
            conn = self._pooled()
            try:
                # Commits, or rolls back, as the pool's connection() does.
                with self._watchdog.watching(conn), conn:
                    yield conn
            finally:
                self._pool.putconn(conn)
        except psycopg.OperationalError as error:
            raise self._failure(conn, error) from None
        except psycopg.errors.ReadOnlySqlTransaction as error:
            raise read_only(self._settings, error) from None

    def _pooled(self) -> psycopg.Connection[Any]:
        """A connection of the pool's, not one the server closed while it sat there: the pool
        replaces that one, and the call goes on another."""
        wait = connection_wait(self._settings.pool_timeout)
        try:
            conn: psycopg.Connection[Any] = self._pool.getconn(wait)
            for _ in range(self._settings.pool_size):  # after a restart, every one it had
                if not closed_by_server(conn):
                    break
                self._pool.putconn(conn)
                conn = self._pool.getconn(wait)
        except psycopg_pool.PoolTimeout as error:
            stats = self._pool.get_stats()
            raise no_connection(self._settings, error, stats, self._pool.name, wait) from None
        return conn

    def _failure(
        self, conn: psycopg.Connection[Any] | None, error: psycopg.OperationalError
    ) -> Exception:
        """What to raise for an ``OperationalError`` of the pool or on ``conn``: the store is
        closed; or ``StoreUnavailableError`` if the server restarted or dropped us, after every
        dead connection is replaced now, so that one call fails, not one per pooled
        connection."""
        if isinstance(error, psycopg_pool.PoolClosed):
            return closed(self._settings)
        if isinstance(error, CANCELLED):
            return cancelled(self._settings, error)
        if conn is None or not conn.broken:
            return error
        if self._watchdog.timed_out(conn):
            # Not the pool's check: its statements would wait for the server as this one did.
            # The pooled connections are given up one by one, each when a call waits too long.
            return unanswered(self._settings)
        if self._appender_free.acquire(blocking=False):  # else it is conn, or in use
            try:
                if self._appender is not None:  # the pool checks it with the others
                    self._pool.putconn(self._appender.conn)
                    self._appender = None
            finally:
                self._appender_free.release()
        self._pool.check()
        return unavailable(self._settings, error)

    # Appending

    def append(self, appends: Sequence[StreamAppend]) -> int:
        if (
            self._keeps_appender
            and self._local.transaction is None
            and self._appender_free.acquire(blocking=False)
        ):
            try:
                return self._append_on_kept(appends)
            finally:
                self._appender_free.release()
        with self._connection() as conn:
            channel = self._settings.channel
            return libpq_append.append(conn, appends, channel, self._guess, self._answers)

    def _append_on_kept(self, appends: Sequence[StreamAppend]) -> int:
        kept = self._appender
        if kept is not None and closed_by_server(kept.conn, kept.session.poller):
            # The server restarted since: the pool replaces it, and the append goes on another.
            self._appender = None
            self._pool.putconn(kept.conn)
            kept = None
        conn = None if kept is None else kept.conn
        try:
            if kept is None:
                conn = self._pooled()
                kept = self._appender = _KeptAppender(conn, self._watchdog)
            with kept.watching:
                return libpq_append.append(
                    kept.conn, appends, self._settings.channel, self._guess, self._answers,
                    kept.session,
                )  # fmt: skip
        except psycopg.OperationalError as error:
            raise self._failure(conn, error) from None
        except psycopg.errors.ReadOnlySqlTransaction as error:
            raise read_only(self._settings, error) from None
        finally:
            # Interrupted mid-call, or broken: the pool resets or replaces it.
            if conn is not None and conn.pgconn.transaction_status != pq.TransactionStatus.IDLE:
                self._appender = None
                self._pool.putconn(conn)

    # Reading

    def read_stream(
        self, stream: str, from_version: int = 1, to_version: int | None = None
    ) -> list[StoredEvent]:
        with self._connection() as conn:
            return _read_stream(conn, stream, from_version, to_version)

    def stream_version(self, stream: str) -> int:
        return int(self._value(q.STREAM_VERSION_OF, (stream,)))

    def read_all(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        check_page(after, limit)
        with self._connection() as conn, conn.cursor(binary=True) as cur:
            rows = cur.execute(q.READ_ALL, (after + 1, after + limit, after + 1)).fetchall()
            found = q.page(rows, after, limit)
            if found is None:
                rows = cur.execute(q.READ_ALL_AFTER, (after + 1, after + 1, limit)).fetchall()
                found = q.page_after(rows, after, limit)
            return found

    def last_position(self) -> int:
        return int(self._value(q.LAST_POSITION))

    def holds_write_lock(self) -> bool:
        return False  # other transactions commit beside an open one

    def wait_for_events(self, after: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        listener = self._listening()
        # LISTEN is on before this read, so no append after it goes unnoticed.
        listener.saw(self.last_position())
        try:
            return listener.wait(after, deadline)
        except psycopg.OperationalError as error:
            # The next wait listens on a new connection.
            with self._listener_lock:
                if self._listener is listener:
                    self._listener = None
            listener.close()
            raise unavailable(self._settings, error) from None

    def _listening(self) -> Listener:
        with self._listener_lock:
            if self._listener is None:
                self._listener = Listener(self._settings)
            return self._listener

    # Snapshots and keys

    def save_snapshot(self, snapshot: Snapshot) -> None:
        s = snapshot
        with self._connection() as conn, conn.transaction():
            conn.execute(
                q.SAVE_SNAPSHOT, (s.stream, s.version, s.type, s.schema, s.data, s.timestamp_ms)
            )
            conn.execute(q.PRUNE_SNAPSHOTS, (s.stream, s.version))

    def load_snapshot(self, stream: str, max_version: int | None = None) -> Snapshot | None:
        upto = q.NO_LIMIT if max_version is None else max_version
        with self._connection() as conn:
            cur = conn.cursor(binary=True, row_factory=args_row(Snapshot))
            return cur.execute(q.LOAD_SNAPSHOT, (stream, upto)).fetchone()

    def stream_key(self, stream: str, create: bool) -> bytes | None:
        key: bytes | None = self._value(q.STREAM_KEY, (stream,))
        if key is not None or not create:
            return key
        created: bytes = self._value(q.CREATE_STREAM_KEY, (stream, os.urandom(q.KEY_BYTES)))
        return created

    def delete_stream_key(self, stream: str) -> bool:
        with self._connection() as conn:
            return conn.execute(q.DELETE_STREAM_KEY, (stream,)).rowcount > 0

    # The read side

    @contextmanager
    def transaction(self, name: str) -> Iterator[PostgresTransaction]:
        lock = q.subscriber_lock_key(self._settings.schema, name)
        with self._connection() as conn, conn.transaction():
            conn.execute(q.LOCK_SUBSCRIBER, (lock,))
            outer, self._local.transaction = self._local.transaction, conn
            try:
                tx = PostgresTransaction(conn, name, self._settings, self._watchdog)
                with self._watchdog.paused(conn):  # the subscriber's code, between statements
                    yield tx
                tx.check_open()
            finally:
                self._local.transaction = outer

    def checkpoint(self, name: str) -> int:
        return int(self._value(q.CHECKPOINT, (name,), 0))

    def get_document(self, collection: str, key: str) -> Document | None:
        check_document_key(collection, key)
        document: Document | None = self._value(q.GET_DOCUMENT, (collection, key))
        return document

    def documents(self, collection: str, limit: int | None = None) -> dict[str, Document]:
        check_document_key(collection, "")
        with self._connection() as conn:
            rows = conn.execute(q.DOCUMENTS, (collection, limit)).fetchall()
        return dict(rows)

    def parked(self, projection: str) -> list[ParkedEvent]:
        with self._connection() as conn:
            cur = conn.cursor(row_factory=args_row(ParkedEvent))
            return cur.execute(q.PARKED, (projection,)).fetchall()

    def parked_count(self, projection: str) -> int:
        return int(self._value(q.PARKED_COUNT, (projection,)))

    def unpark(self, projection: str, position: int) -> bool:
        with self._connection() as conn:
            return conn.execute(q.UNPARK, (projection, position)).rowcount > 0

    def acquire_lease(self, name: str, owner: str, ttl_ms: int) -> bool:
        return self._value(q.ACQUIRE_LEASE, (name, owner, ttl_ms)) is not None

    def release_lease(self, name: str, owner: str) -> None:
        with self._connection() as conn:
            conn.execute(q.RELEASE_LEASE, (name, owner))

    def footprint(self) -> int:
        return int(self._value(q.FOOTPRINT))

    def close(self) -> None:
        with self._listener_lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._appender_free:
            if self._appender is not None:
                self._pool.putconn(self._appender.conn)
                self._appender = None
        self._pool.close()
        self._watchdog.close()
        forget_connect_error(self._pool.name)

    def _value(self, query: str, params: Sequence[Any] = (), default: Any = None) -> Any:
        """The first column of the query's one row, or ``default`` when it finds none."""
        with self._connection() as conn:
            row = conn.execute(query, params).fetchone()
        return default if row is None else row[0]


def _waited_out(
    method: Callable[Concatenate[PostgresTransaction, P], R],
) -> Callable[Concatenate[PostgresTransaction, P], R]:
    """A statement of a subscriber's transaction that the server cancelled (a ``lock_timeout``
    or ``statement_timeout`` of the role, ``pg_cancel_backend``) or lost with the connection
    raises ``StoreUnavailableError``: the runner waits it out and handles the events again, as
    in an outage, instead of parking the event as if its handler had failed."""

    @functools.wraps(method)
    def run(tx: PostgresTransaction, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            with tx._watchdog.watching(tx._conn):
                return method(tx, *args, **kwargs)
        except CANCELLED as error:
            raise cancelled(tx._settings, error) from None
        except psycopg.OperationalError as error:
            if not tx._conn.broken:
                raise
            if tx._watchdog.timed_out(tx._conn):
                raise unanswered(tx._settings) from None
            raise unavailable(tx._settings, error) from None

    return run


class PostgresTransaction:
    """A subscriber's transaction on one pooled connection (``Transaction`` in the contract);
    ``PostgresEventStore.transaction`` holds the subscriber's advisory lock for its length."""

    def __init__(
        self, conn: psycopg.Connection[Any], name: str, settings: Settings, watchdog: Watchdog
    ) -> None:
        self._conn = conn
        self._settings = settings
        self._watchdog = watchdog
        self._channel = settings.channel
        self.name = name
        self._checkpoint: int | None = None

    @property
    @_waited_out
    def checkpoint(self) -> int:
        if self._checkpoint is None:
            row = self._conn.execute(q.CHECKPOINT, (self.name,)).fetchone()
            self._checkpoint = 0 if row is None else int(row[0])
        return self._checkpoint

    @_waited_out
    def set_checkpoint(self, position: int) -> None:
        self._conn.execute(q.SET_CHECKPOINT, (self.name, position))
        self._checkpoint = position

    @_waited_out
    def get(self, collection: str, key: str) -> Document | None:
        check_document_key(collection, key)
        row = self._conn.execute(q.GET_DOCUMENT, (collection, key)).fetchone()
        document: Document | None = None if row is None else row[0]
        return document

    @_waited_out
    def put(self, collection: str, key: str, document: Document) -> None:
        text = document_text(collection, key, document)  # refused as on SQLite, named
        self._conn.execute(q.PUT_DOCUMENT, (collection, key, text))

    @_waited_out
    def delete(self, collection: str, key: str) -> None:
        check_document_key(collection, key)
        self._conn.execute(q.DELETE_DOCUMENT, (collection, key))

    @_waited_out
    def drop(self, collection: str) -> None:
        self._conn.execute(q.DROP_COLLECTION, (collection,))

    @_waited_out
    def drop_prefixed(self, prefix: str) -> None:
        self._conn.execute(q.DROP_PREFIXED, (len(prefix), prefix))

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        with self._watchdog.watching(self._conn):
            self._conn.execute("SAVEPOINT riverbed_handler")
        try:
            yield
        except BaseException:
            self._roll_back_to_savepoint()
            raise
        try:
            with self._watchdog.watching(self._conn):
                self._conn.execute("RELEASE SAVEPOINT riverbed_handler")
        except psycopg.errors.InFailedSqlTransaction:
            self._roll_back_to_savepoint()
            raise HandlerAbortedTransactionError(
                "the handler caught the error of a failed statement, which aborts the "
                "transaction on PostgreSQL all the same: what it did is rolled back"
            ) from None

    def check_open(self) -> None:
        """Raise if a statement failed in the transaction and the block caught its error:
        PostgreSQL aborted the transaction all the same, and its COMMIT would roll it back."""
        if self._conn.info.transaction_status == pq.TransactionStatus.INERROR:
            raise HandlerAbortedTransactionError(
                "a statement failed in the store's transaction and its error was caught, which "
                "aborts the transaction on PostgreSQL all the same: nothing of it is committed"
            )

    def _roll_back_to_savepoint(self) -> None:
        # Unless the connection broke: then the whole transaction fails, as it should.
        with contextlib.suppress(psycopg.OperationalError), self._watchdog.watching(self._conn):
            self._conn.execute("ROLLBACK TO SAVEPOINT riverbed_handler")
            self._conn.execute("RELEASE SAVEPOINT riverbed_handler")
        self._checkpoint = None  # the block may have moved it

    @_waited_out
    def park(self, parked: ParkedEvent) -> None:
        p = parked
        self._conn.execute(
            q.PARK, (p.projection, p.position, p.event_id, p.type, p.error, p.parked_ms)
        )

    @_waited_out
    def unpark(self, projection: str, position: int) -> bool:
        return self._conn.execute(q.UNPARK, (projection, position)).rowcount > 0

    @_waited_out
    def seen(self, event_id: str) -> bool:
        return self._conn.execute(q.SEEN, (self.name, event_id)).rowcount == 0

    @_waited_out
    def append(self, appends: Sequence[StreamAppend]) -> int:
        return libpq_append.append_in_transaction(self._conn, appends, self._channel)

    @_waited_out
    def read_stream(
        self, stream: str, from_version: int = 1, to_version: int | None = None
    ) -> list[StoredEvent]:
        return _read_stream(self._conn, stream, from_version, to_version)

    @_waited_out
    def set_timer(self, key: str, due_ms: int, data: bytes) -> None:
        self._conn.execute(q.SET_TIMER, (self.name, key, due_ms, data))

    @_waited_out
    def cancel_timer(self, key: str) -> None:
        self._conn.execute(q.CANCEL_TIMER, (self.name, key))

    @_waited_out
    def due_timers(self, now_ms: int, limit: int = 100) -> list[Timer]:
        cur = self._conn.cursor(row_factory=args_row(Timer))
        return cur.execute(q.DUE_TIMERS, (self.name, now_ms, limit)).fetchall()

    @_waited_out
    def execute(self, sql: str | Composable, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """``sql``: text, or psycopg's ``sql.SQL(...).format(...)`` (a table named after
        ``self.version``, say)."""
        text = sql if isinstance(sql, str) else sql.as_string(self._conn)
        check_statement(text)
        # In a pipeline, through the extended protocol, which takes one statement, as SQLite
        # does: the simple one would run a COMMIT after it. Without parameters, psycopg reads
        # no placeholders: `LIKE 'a%'` stays as it is.
        with self._conn.pipeline() as pipeline:
            cur = self._conn.execute(text.encode(), params or None)
            pipeline.sync()
            return cur.fetchall() if cur.description is not None else []

    @_waited_out
    def renew_lease(self, name: str, owner: str, ttl_ms: int) -> bool:
        return self._conn.execute(q.RENEW_LEASE, (ttl_ms, name, owner)).rowcount == 1


class Listener:
    """The store's LISTEN connection, shared by its waiting threads: whichever finds it free
    reads the notifications (each carries an append's last position) while the others wait to
    be told the newest position seen."""

    def __init__(self, settings: Settings) -> None:
        try:
            self._conn = psycopg.connect(
                settings.conninfo, autocommit=True, options=connection_options(settings)
            )
        except psycopg.OperationalError as error:
            raise unavailable(settings, error) from None
        try:
            self._conn.execute(sql.SQL(q.LISTEN).format(sql.Identifier(settings.channel)))
        except psycopg.OperationalError as error:  # dropped already (a server restarting)
            self._conn.close()
            raise unavailable(settings, error) from None
        self._newest = 0
        self._reading = False
        self._changed = threading.Condition()

    def saw(self, position: int) -> None:
        with self._changed:
            self._newest = max(self._newest, position)

    def wait(self, after: int, deadline: float) -> bool:
        """Whether a position above ``after`` is known by ``deadline``."""
        with self._changed:
            while self._newest <= after:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if self._reading:
                    self._changed.wait(remaining)
                    continue
                self._reading = True
                newest = 0
                self._changed.release()
                try:
                    newest = self._read(remaining)
                finally:
                    self._changed.acquire()
                    self._reading = False
                    self._newest = max(self._newest, newest)
                    self._changed.notify_all()
            return True

    def _read(self, timeout: float) -> int:
        return max(
            (int(n.payload) for n in self._conn.notifies(timeout=timeout, stop_after=1)),
            default=0,
        )

    def close(self) -> None:
        self._conn.close()


def _read_stream(
    conn: psycopg.Connection[Any], stream: str, from_version: int, to_version: int | None
) -> list[StoredEvent]:
    check_versions(from_version, to_version)
    upto = q.NO_LIMIT if to_version is None else to_version
    with conn.cursor(binary=True) as cur:
        rows = cur.execute(q.READ_STREAM, (stream, from_version, upto, from_version)).fetchall()
    return versions(rows_decoded(rows), from_version, upto)
