"""A PostgreSQL server that stops answering with its connections open (stopped by SIGSTOP, or a
stalled host whose kernel still acknowledges TCP): the sync store's calls give their connection
up after ``command_timeout`` and raise ``StoreUnavailableError``, and the store works again once
the server does."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import riverbed
from riverbed.eventsourcing import EventSourcing
from riverbed.eventsourcing.errors import StoreUnavailableError
from riverbed.eventsourcing.records import StreamAppend
from riverbed.eventsourcing.stores import EventStore, connect_async_store, connect_store
from riverbed.eventsourcing.stores.postgres import watchdog
from tests.eventsourcing.shop import OrderTotals
from tests.eventsourcing.test_runners import TOPIC, place
from tests.eventsourcing.test_store_contract import append_to, events_for, positions
from tests.services import unavailable
from tests.services.postgres import PostgresServer, postgres_missing, start_postgres
from tests.support import published, wait_until

TIMEOUT_S = 1
UNANSWERED = f"did not answer within {TIMEOUT_S} s"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PostgresServer]:
    """A server of the test's own, which it freezes."""
    reason = postgres_missing()
    if reason is not None:
        unavailable("PostgreSQL", reason)
    started = start_postgres(tmp_path)
    try:
        yield started
    finally:
        started.stop()


POOL_TIMEOUT_S = 2


@pytest.fixture
def store(server: PostgresServer) -> Iterator[EventStore]:
    url = f"{server.url}?command_timeout={TIMEOUT_S}&pool_timeout={POOL_TIMEOUT_S}"
    opened = connect_store(url)
    try:
        yield opened
    finally:
        opened.close()


def gives_up(call: Callable[[], object], within: float = TIMEOUT_S) -> StoreUnavailableError:
    """The error ``call()`` raised, checked to have come after ``within`` seconds, not long
    after."""
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as raised:
        call()
    took = time.monotonic() - started
    assert within - 0.1 <= took < within + 2 * watchdog.CHECK_INTERVAL_S + 1
    return raised.value


def works_again(call: Callable[[], object]) -> None:
    """``call()`` succeeds within a few seconds of the server's return."""
    ends = time.monotonic() + 10
    while True:
        try:
            call()
            return
        except StoreUnavailableError:
            if time.monotonic() > ends:
                raise
            time.sleep(0.2)


def test_calls_to_a_frozen_server_give_up_after_command_timeout(
    server: PostgresServer, store: EventStore
) -> None:
    assert append_to(store, "s", 0) == 1
    with server.frozen():
        error = gives_up(lambda: append_to(store, "s", 1))
        assert UNANSWERED in str(error) and "command_timeout" in str(error)
        # The pool cannot replace the connection given up (the server takes no new ones): the
        # next call waits pool_timeout for one, as while a server is down.
        gives_up(store.read_all, within=POOL_TIMEOUT_S)
    works_again(store.read_all)
    assert positions(store.read_all()) == [1]  # the append that gave up left nothing
    assert append_to(store, "s", 1) == 2


def test_a_read_on_an_idle_pooled_connection_gives_up_too(
    server: PostgresServer, store: EventStore
) -> None:
    with store.transaction("holding"):  # two connections in the pool: this one and the next
        assert store.stream_version("s") == 0
    with server.frozen():
        assert UNANSWERED in str(gives_up(lambda: store.stream_version("s")))
    works_again(lambda: store.stream_version("s"))


def test_a_subscribers_statement_gives_up_but_not_its_code_between_statements(
    server: PostgresServer, store: EventStore
) -> None:
    """The subscriber's own code may take longer than command_timeout between statements."""
    with store.transaction("reader") as tx:
        tx.set_checkpoint(1)
        time.sleep(TIMEOUT_S + 0.5)
        tx.put("docs", "a", {"n": 1})
    assert store.checkpoint("reader") == 1
    with store.transaction("reader") as tx, server.frozen():
        assert UNANSWERED in str(gives_up(lambda: tx.put("docs", "b", {"n": 2})))
    with store.transaction("reader") as tx:
        assert tx.get("docs", "b") is None and tx.checkpoint == 1


def test_a_call_that_answers_in_time_is_not_given_up(
    server: PostgresServer, store: EventStore
) -> None:
    """The deadline is each statement's: one that waits less than it, here for the append lock
    a subscriber's transaction holds, gets its answer."""
    appended: list[int] = []
    with store.transaction("reader") as tx:
        tx.append([])  # takes the append lock for the transaction
        waiting = threading.Thread(target=lambda: appended.append(append_to(store, "s", 0)))
        waiting.start()
        time.sleep(TIMEOUT_S / 2)
    waiting.join(10)
    assert appended == [1]


def test_no_command_timeout_waits_for_the_server(server: PostgresServer) -> None:
    unlimited = connect_store(f"{server.url}?command_timeout=0")
    try:
        done: list[int] = []
        with server.frozen():
            waiting = threading.Thread(target=lambda: done.append(append_to(unlimited, "s", 0)))
            waiting.start()
            time.sleep(TIMEOUT_S + 2 * watchdog.CHECK_INTERVAL_S + 0.5)
            assert done == []
        waiting.join(10)
        assert done == [1]
    finally:
        unlimited.close()


def test_an_async_stores_calls_give_up_too(server: PostgresServer) -> None:
    """The watchdog's shut-down socket ends the wait in the event loop as in a thread."""

    async def scenario() -> None:
        url = f"{server.url}?command_timeout={TIMEOUT_S}&pool_timeout={POOL_TIMEOUT_S}"
        store = await connect_async_store(url)
        try:
            assert await store.append([StreamAppend("s", 0, events_for("s", 1, 1))]) == 1
            with server.frozen():
                started = time.monotonic()
                with pytest.raises(StoreUnavailableError, match=UNANSWERED):
                    await store.append([StreamAppend("s", 1, events_for("s", 2, 1))])
                assert time.monotonic() - started < TIMEOUT_S + 2 * watchdog.CHECK_INTERVAL_S + 1
            for _ in range(50):
                try:
                    assert positions(await store.read_all()) == [1]
                    break
                except StoreUnavailableError:
                    await asyncio.sleep(0.2)
            else:
                pytest.fail("the async store did not work again after the server did")
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_workers_runners_stop_soon_while_the_server_is_frozen(
    server: PostgresServer, tmp_path: Path
) -> None:
    """Their calls give up, so a stop is honoured within seconds, as in an outage."""
    events = EventSourcing(
        "shop", f"{server.url}?command_timeout={TIMEOUT_S}&pool_timeout={POOL_TIMEOUT_S}"
    )
    log = riverbed.connect(f"sqlite:///{tmp_path}/log.db")
    events.projection(OrderTotals())
    events.relay(TOPIC)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        place(events, "ada")
        threads = events.run(stop, log=lambda: log)
        wait_until(lambda: published(log, TOPIC) == 1, 30, "the relay")
        with server.frozen():
            time.sleep(TIMEOUT_S)  # the runners wait for the server
            started = time.monotonic()
            stop.set()
            for thread in threads:
                thread.join(30)
            assert not any(thread.is_alive() for thread in threads)
            assert time.monotonic() - started < 15
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        events.close()
        log.close()
