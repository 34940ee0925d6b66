"""What a ``postgresql://`` URL may say, as libpq reads it: a unix socket, several hosts, libpq's
parameters; values libpq or the server refuse for good are errors, not outages to wait out; no
error shows a password."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import psycopg
import pytest

import riverbed
from riverbed.errors import InvalidUrlError
from riverbed.eventsourcing import EventSourcing, ReadModel
from riverbed.eventsourcing.errors import EventSourcingError, StoreUnavailableError
from riverbed.eventsourcing.stores import EventStore, connect_store
from riverbed.eventsourcing.stores.postgres import settings as postgres_settings
from riverbed.eventsourcing.stores.postgres.statements import subscriber_lock_key
from tests.eventsourcing.test_store_contract import append_to
from tests.services.postgres import PostgresServer
from tests.support import wait_until


@pytest.fixture
def opened() -> Iterator[list[EventStore]]:
    """Stores the test opened, closed after it."""
    stores: list[EventStore] = []
    yield stores
    for store in stores:
        store.close()


def test_a_unix_socket_several_hosts_and_libpq_parameters_reach_the_server(
    postgres_server: PostgresServer, opened: list[EventStore]
) -> None:
    socket_dir, port = str(postgres_server.home), postgres_server.port
    name = f"order service+{uuid.uuid4().hex[:6]}"  # a space: %20, which libpq reads; + is +
    urls = [
        f"postgresql:///riverbed?host={socket_dir}&port={port}&user=riverbed"
        f"&application_name={quote(name, safe='+')}",  # a literal +
        f"postgresql://riverbed@{quote(socket_dir, safe='')}:{port}/riverbed",
        # The first host refuses: libpq tries the next.
        f"postgresql://riverbed@127.0.0.1:1,127.0.0.1:{port}/riverbed"
        "?target_session_attrs=read-write",
    ]
    for url in urls:
        store = connect_store(url)
        opened.append(store)
        append_to(store, f"s-{uuid.uuid4()}", 0)
    with psycopg.connect(postgres_server.admin_url) as admin:
        (count,) = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,)
        ).fetchone() or (0,)
    assert count >= 1


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("connect_timeout=abc", "connect_timeout='abc' in the event store URL is not a whole"),
        ("sslmode=bogus", 'cannot work: invalid sslmode value: "bogus"'),
        ("keepalives=abc", 'cannot work: invalid integer value "abc" for connection option'),
        ("service=nosuch", 'cannot work: definition of service "nosuch" not found'),
        ("hostaddr=notanip", "cannot work: could not parse network address"),
        ("options=-c%20work_mem%3D1MB", "riverbed sets the connections' options itself"),
    ],
)
def test_values_libpq_refuses_are_url_errors_not_outages(option: str, message: str) -> None:
    with pytest.raises(InvalidUrlError) as raised:
        connect_store(f"postgresql://shop@127.0.0.1:1/shop?{option}")
    assert message in str(raised.value)


@pytest.mark.parametrize(("port", "message"), [("1x", 'value "1x"'), ("65536", "port number")])
def test_a_bad_port_is_a_url_error(port: str, message: str) -> None:
    with pytest.raises(InvalidUrlError, match=message):
        connect_store(f"postgresql://shop@127.0.0.1:{port}/shop")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://shop:50%off-S3cret@127.0.0.1:1/shop",  # a bare %: not percent-encoded
        "postgresql://shop@127.0.0.1:1/shop?password=S3cret&bogus=1",
        "postgresql://shop@127.0.0.1:1/shop?sslpassword=S3cret&sslmode=bogus",
    ],
)
def test_no_url_error_shows_the_password(url: str) -> None:
    with pytest.raises(InvalidUrlError) as raised:
        connect_store(url)
    assert "S3cret" not in str(raised.value)
    assert "***" in str(raised.value) or "sslmode" in str(raised.value)


def test_a_server_that_refuses_the_url_for_good_is_not_an_outage(
    postgres_server: PostgresServer,
) -> None:
    port = postgres_server.port
    for url, reason in [
        (f"postgresql://riverbed@127.0.0.1:{port}/no_such_db", 'database "no_such_db" does not'),
        (f"postgresql://nobody@127.0.0.1:{port}/riverbed", 'role "nobody" does not exist'),
    ]:
        with pytest.raises(EventSourcingError) as raised:
            connect_store(url)
        assert not isinstance(raised.value, StoreUnavailableError)  # a worker would wait
        assert "refused the event store's URL" in str(raised.value)
        assert reason in str(raised.value)


def test_a_read_only_connection_reads_and_refuses_writes_clearly(
    postgres_server: PostgresServer, opened: list[EventStore]
) -> None:
    database = f"ro_{uuid.uuid4().hex[:8]}"
    reader = f"reader_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_server.admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {database}")
        # The writer's rights, as a standby's user has them, but read-only transactions.
        admin.execute(f"CREATE ROLE {reader} LOGIN IN ROLE riverbed")
        admin.execute(f"ALTER ROLE {reader} SET default_transaction_read_only = on")
    base = f"postgresql://{{}}@127.0.0.1:{postgres_server.port}/{database}"
    writer = connect_store(base.format("riverbed"))
    opened.append(writer)
    append_to(writer, "s", 0)
    with psycopg.connect(base.format("riverbed"), autocommit=True) as owner:
        # As an older riverbed left it: a read-only connection cannot set lz4, and opens anyway.
        owner.execute("ALTER TABLE riverbed_batches ALTER COLUMN records SET COMPRESSION pglz")
    store = connect_store(base.format(reader))
    opened.append(store)
    assert [e.stream for e in store.read_all(0, 10)] == ["s"]
    with pytest.raises(EventSourcingError, match="is read-only for this connection"):
        append_to(store, "s", 1)
    with (
        pytest.raises(EventSourcingError, match="is read-only for this connection"),
        store.transaction("view") as tx,
    ):
        tx.set_checkpoint(1)
    assert writer.stream_version("s") == 1


def test_psycopg_pools_warnings_about_riverbeds_pools_are_left_to_riverbed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool_logger = logging.getLogger("psycopg.pool")
    with caplog.at_level(logging.WARNING, logger="psycopg.pool"):
        pool_logger.warning("error connecting in %r: %s", "riverbed-events-public", "refused")
        pool_logger.warning("error connecting in %r: %s", "pool-1", "refused")  # a user's pool
    assert [record.getMessage() for record in caplog.records] == [
        "error connecting in 'pool-1': refused"
    ]


def test_an_outage_message_is_one_line() -> None:
    with pytest.raises(StoreUnavailableError) as raised:
        connect_store("postgresql://shop@127.0.0.1:1/shop")
    assert "\n" not in str(raised.value) and "\t" not in str(raised.value)


def new_role(server: PostgresServer, *settings: str) -> str:
    """A new login role of the riverbed role's rights, with ``settings`` (``ALTER ROLE SET``)."""
    role = f"app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server.admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN IN ROLE riverbed")
        for setting in settings:
            admin.execute(f"ALTER ROLE {role} SET {setting}")
    return role


def test_a_login_refused_while_a_store_runs_is_an_error_naming_why_not_an_outage(
    postgres_server: PostgresServer, opened: list[EventStore]
) -> None:
    role = new_role(postgres_server)
    url = f"postgresql://{role}@127.0.0.1:{postgres_server.port}/riverbed"
    store = connect_store(f"{url}?pool_timeout=2&schema=s_{role}")
    opened.append(store)
    append_to(store, "s", 0)
    with psycopg.connect(postgres_server.admin_url, autocommit=True) as admin:
        admin.execute(f"ALTER ROLE {role} NOLOGIN")  # as an operator revoking it
    with psycopg.connect(postgres_server.admin_url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
    with pytest.raises(EventSourcingError) as raised:
        for _ in range(3):  # the first call may meet the broken connection
            with contextlib.suppress(StoreUnavailableError):
                store.last_position()
    assert not isinstance(raised.value, StoreUnavailableError)
    assert f'role "{role}" is not permitted to log in' in str(raised.value)
    with psycopg.connect(postgres_server.admin_url, autocommit=True) as admin:
        admin.execute(f"ALTER ROLE {role} LOGIN")  # granted again
    wait_until(lambda: _works(store), 30, "the store to log in again")
    # Logged in again: a later outage is not reported as the refusal that was.
    assert store._pool.name not in postgres_settings._last_connect_error  # type: ignore[attr-defined]


def test_a_statement_the_server_cancels_is_waited_out_by_runners_and_named_to_callers(
    postgres_server: PostgresServer, opened: list[EventStore]
) -> None:
    role = new_role(postgres_server, "statement_timeout = '500ms'")  # an operator's setting
    url = f"postgresql://{role}@127.0.0.1:{postgres_server.port}/riverbed?schema=s_{role}"
    events = EventSourcing("timed", url)
    try:
        events.projection(Counted())
        events.save(Turnstile("a"))
        with psycopg.connect(url.split("?", maxsplit=1)[0]) as rival:
            # Another process holds the appends' lock, then the projection's turn, for 1.5 s.
            rival.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                (f"riverbed_append/s_{role}",),
            )
            cancelled = r"cancelled a statement: cancel.*SET statement_timeout = 0"
            with pytest.raises(StoreUnavailableError, match=cancelled):
                events.save(Turnstile("b"))
            rival.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                (subscriber_lock_key(f"s_{role}", "projection:counted@v1"),),
            )
            stop = threading.Event()
            threads = events.run(stop)
            time.sleep(1.5)  # its waits for its turn are cancelled meanwhile
        try:
            position = events.save(Turnstile("c"))
            assert events.projections.get("counted", "tallies", "c", wait_for=position)
            assert events.failures == [] and all(thread.is_alive() for thread in threads)
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)
    finally:
        events.close()


class Turnstile(riverbed.Aggregate):
    @riverbed.event("Turned")
    def __init__(self, name: str) -> None:
        self.name = name


class Counted(riverbed.Projection):
    name = "counted"

    def handle(self, event: riverbed.Envelope, tx: ReadModel) -> None:
        tx.put("tallies", event.event.name, {"seen": True})


def _works(store: EventStore) -> bool:
    try:
        store.last_position()
    except EventSourcingError:
        return False
    return True


@pytest.mark.parametrize(
    "url", ["postgresql://shop@[::1/shop", "postgresql://shop@db:5432]/shop", "kafka://[::1:9092"]
)
def test_a_url_with_a_bracket_typo_is_a_url_error(url: str) -> None:
    with pytest.raises(InvalidUrlError, match="Invalid IPv6 URL"):
        connect_store(url) if url.startswith("postgresql") else riverbed.connect(url)


def test_a_projections_statement_the_server_cancels_is_waited_out_not_parked(
    postgres_server: PostgresServer,
) -> None:
    role = new_role(postgres_server, "lock_timeout = '300ms'")  # an operator's setting
    url = f"postgresql://{role}@127.0.0.1:{postgres_server.port}/riverbed?schema=s_{role}"
    events = EventSourcing("locked", url)
    events.projection(Counted())
    stop = threading.Event()
    threads = events.run(stop)
    try:
        events.projections.get("counted", "tallies", "a", wait_for=events.save(Turnstile("a")))
        with psycopg.connect(url.split("?", maxsplit=1)[0]) as rival:
            # Another session's uncommitted row where the projection's next put writes, for
            # 1.5 s: the put's waits for it are cancelled meanwhile.
            rival.execute(
                f"INSERT INTO s_{role}.riverbed_documents (collection, key, document) "
                f"SELECT collection, 'b', document FROM s_{role}.riverbed_documents "
                "WHERE key = 'a'"
            )
            position = events.save(Turnstile("b"))
            time.sleep(1.5)
            rival.rollback()
        assert events.projections.get("counted", "tallies", "b", wait_for=position) == {
            "seen": True
        }
        assert events.projections.parked("counted") == [] and events.failures == []
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        events.close()


@pytest.mark.parametrize("calls", ["sync", "async"])
def test_connections_the_server_closed_while_idle_are_replaced_without_an_error(
    postgres_server: PostgresServer, calls: str
) -> None:
    # As a proxy's or NAT's idle timeout would: every pooled connection is gone by the next call.
    role = new_role(postgres_server, "idle_session_timeout = '300ms'")
    url = f"postgresql://{role}@127.0.0.1:{postgres_server.port}/riverbed?schema=s_{role}"
    events = EventSourcing("idle", url)

    async def save_and_get_async() -> None:
        for name in ("a", "b", "c"):
            turnstile = Turnstile(name)
            await events.save_async(turnstile)
            await asyncio.sleep(0.6)
            assert (await events.get_async(Turnstile, turnstile.id)).name == name

    try:
        if calls == "sync":
            for name in ("a", "b", "c"):
                turnstile = Turnstile(name)
                events.save(turnstile)
                time.sleep(0.6)
                assert events.get(Turnstile, turnstile.id).name == name
        else:
            asyncio.run(save_and_get_async())
    finally:
        events.close()
