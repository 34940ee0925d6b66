"""The event-store contract (``riverbed/eventsourcing/stores/api.py``), run against every store:
appends with optimistic concurrency, reads by stream and by global position, the gap-free order
under concurrent writer processes, waiting for events, snapshots, stream keys, and the read
side's transactions (checkpoints, documents, parked events, the inbox, timers, raw SQL), leases,
and the upgrade of a store an older riverbed made."""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from contextlib import closing
from datetime import datetime
from multiprocessing.synchronize import Event as EventFlag
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from psycopg import sql

from riverbed.errors import InvalidUrlError, RiverbedError
from riverbed.eventsourcing.errors import (
    ConcurrencyError,
    EventSourcingError,
    StoreUnavailableError,
)
from riverbed.eventsourcing.records import (
    NewEvent,
    ParkedEvent,
    Snapshot,
    StoredEvent,
    StreamAppend,
    Timer,
)
from riverbed.eventsourcing.stores import (
    EventStore,
    connect_async_store,
    connect_store,
    missing_store,
)
from riverbed.eventsourcing.stores import sqlite as sqlite_store
from riverbed.eventsourcing.stores.guesses import PositionGuess
from riverbed.eventsourcing.stores.postgres import libpq_append
from riverbed.eventsourcing.stores.postgres import schema as postgres_schema
from riverbed.eventsourcing.stores.postgres import statements as postgres_statements
from riverbed.eventsourcing.stores.postgres.spinning import SPIN_US, AnswerWait
from tests.eventsourcing.conftest import OpenStore
from tests.services.postgres import PostgresServer, terminate_connections

WRITERS = 4
APPENDS_PER_WRITER = 500


def new_event(stream: str, version: int, data: bytes = b"\x81\xa1n\x01") -> NewEvent:
    return NewEvent(
        id=uuid.uuid4().hex,
        stream=stream,
        version=version,
        type="Order.Placed",
        schema=2,
        data=data,
        metadata=b"\x81\xaecorrelation_id\xa1c",
        timestamp_ms=1_764_158_400_000 + version,
    )


def events_for(stream: str, first: int, count: int) -> list[NewEvent]:
    return [new_event(stream, version) for version in range(first, first + count)]


def append_to(store: EventStore, stream: str, expected: int | None, count: int = 1) -> int:
    first = (store.stream_version(stream) if expected is None else expected) + 1
    return store.append([StreamAppend(stream, expected, events_for(stream, first, count))])


def positions(events: Sequence[StoredEvent]) -> list[int]:
    return [event.position for event in events]


def placeholder(store_url: str) -> str:
    return "?" if store_url.startswith("sqlite") else "%s"


# Appending and reading


def test_a_large_append_stores_every_event_in_order(store: EventStore) -> None:
    # More events than one INSERT statement binds on SQLite (its INSERT_ROWS): several run.
    assert append_to(store, "big", 0, 150) == 150
    append_to(store, "other", 0)
    assert append_to(store, "big", 150, 67) == 218
    events = store.read_stream("big")
    assert [e.version for e in events] == list(range(1, 218))
    assert positions(events) == [*range(1, 151), *range(152, 219)]


def test_an_append_of_many_bytes_goes_to_postgresql_in_statements_it_takes(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres_statements, "CHUNK_BYTES", 1000)  # as for 1 GiB messages
    big = [new_event("bytes", version, bytes(400)) for version in range(1, 8)]
    chunks = list(postgres_statements.append_chunks([StreamAppend("bytes", 0, big)]))
    assert [(expected, len(events)) for _, expected, events in chunks] == [
        (0, 2), (None, 2), (None, 2), (None, 1),  # only the first checks the version
    ]  # fmt: skip
    store.append([StreamAppend("bytes", 0, big)])
    assert [e.data for e in store.read_stream("bytes")] == [bytes(400)] * 7
    with pytest.raises(ConcurrencyError):
        store.append([StreamAppend("bytes", 0, [new_event("bytes", 1)])])


def test_append_returns_the_last_position_and_reads_back_what_was_appended(
    store: EventStore,
) -> None:
    appended = events_for("order-1", 1, 3)
    assert store.append([StreamAppend("order-1", 0, appended)]) == 3

    stored = store.read_stream("order-1")
    assert positions(stored) == [1, 2, 3]
    for event, original in zip(stored, appended, strict=True):
        assert isinstance(event, StoredEvent)
        assert (event.id, event.stream, event.version, event.type, event.schema) == (
            original.id, original.stream, original.version, original.type, original.schema,
        )  # fmt: skip
        assert (event.data, event.metadata, event.timestamp_ms) == (
            original.data, original.metadata, original.timestamp_ms,
        )  # fmt: skip
        assert isinstance(event.data, bytes)
        assert isinstance(event.metadata, bytes)
    assert store.read_all() == stored
    assert store.stream_version("order-1") == 3
    assert store.last_position() == 3


def test_an_empty_store(store: EventStore) -> None:
    assert store.read_all() == []
    assert store.read_stream("nothing") == []
    assert store.stream_version("nothing") == 0
    assert store.last_position() == 0
    assert store.footprint() == 0


def test_positions_follow_each_other_across_streams_and_appends(store: EventStore) -> None:
    assert append_to(store, "a", 0, 2) == 2
    assert append_to(store, "b", 0, 1) == 3
    assert append_to(store, "a", 2, 3) == 6
    assert [(e.stream, e.version) for e in store.read_all()] == [
        ("a", 1), ("a", 2), ("b", 1), ("a", 3), ("a", 4), ("a", 5),
    ]  # fmt: skip
    assert positions(store.read_stream("a")) == [1, 2, 4, 5, 6]


def test_stores_taking_turns_number_new_streams_on_from_each_other(
    open_store: OpenStore,
) -> None:
    """Each store's append follows the other's: the SQLite store, which numbers a new stream's
    first save on from its own last append without asking, still follows the other's events."""
    stores = (open_store(), open_store())
    last = [append_to(stores[n % 2], f"new-{n}", 0, 3) for n in range(6)]
    assert last == [3, 6, 9, 12, 15, 18]
    for store in stores:
        events = store.read_all(0, 100)
        assert positions(events) == list(range(1, 19))
        assert [e.stream for e in events] == [f"new-{n}" for n in range(6) for _ in range(3)]
    assert append_to(stores[1], "new-6", 0) == 19


def test_a_new_stream_that_exists_by_now_is_a_concurrency_error(open_store: OpenStore) -> None:
    first, second = open_store(), open_store()
    append_to(first, "order-1", 0)
    with pytest.raises(ConcurrencyError) as raised:  # created by this store
        append_to(first, "order-1", 0, 2)
    assert (raised.value.stream, raised.value.expected, raised.value.actual) == ("order-1", 0, 1)
    append_to(second, "order-2", 0, 2)
    with pytest.raises(ConcurrencyError) as raised:  # by another, since this one's last append
        append_to(first, "order-2", 0)
    assert (raised.value.stream, raised.value.expected, raised.value.actual) == ("order-2", 0, 2)
    assert append_to(first, "order-3", 0) == 4
    assert [(e.stream, e.version) for e in second.read_all()] == [
        ("order-1", 1), ("order-2", 1), ("order-2", 2), ("order-3", 1),
    ]  # fmt: skip


def test_binary_payloads_round_trip_unchanged(store: EventStore) -> None:
    payloads = [b"", bytes(range(256)), b"\x00" * 70_000]
    store.append(
        [StreamAppend("blobs", 0, [new_event("blobs", i + 1, p) for i, p in enumerate(payloads)])]
    )
    assert [event.data for event in store.read_stream("blobs")] == payloads


def test_a_stale_expected_version_raises_concurrency_error_naming_stream_and_versions(
    store: EventStore,
) -> None:
    append_to(store, "order-7", 0, 2)
    with pytest.raises(ConcurrencyError) as raised:
        store.append([StreamAppend("order-7", 1, [new_event("order-7", 2)])])
    assert (raised.value.stream, raised.value.expected, raised.value.actual) == ("order-7", 1, 2)
    assert "'order-7'" in str(raised.value)
    assert "version 2" in str(raised.value)
    assert "expected 1" in str(raised.value)

    with pytest.raises(ConcurrencyError) as raised:
        store.append([StreamAppend("order-7", 5, [new_event("order-7", 6)])])
    assert (raised.value.expected, raised.value.actual) == (5, 2)

    with pytest.raises(ConcurrencyError) as raised:
        store.append([StreamAppend("order-8", 3, [new_event("order-8", 4)])])
    assert (raised.value.stream, raised.value.expected, raised.value.actual) == ("order-8", 3, 0)
    assert store.last_position() == 2


def test_a_conflict_in_one_stream_appends_nothing_to_any_stream(store: EventStore) -> None:
    append_to(store, "b", 0, 1)
    with pytest.raises(ConcurrencyError) as raised:
        store.append(
            [
                StreamAppend("a", 0, events_for("a", 1, 2)),
                StreamAppend("b", 0, events_for("b", 1, 1)),
                StreamAppend("c", None, events_for("c", 1, 1)),
            ]
        )
    assert (raised.value.stream, raised.value.expected, raised.value.actual) == ("b", 0, 1)
    assert store.read_stream("a") == []
    assert store.read_stream("c") == []
    assert store.last_position() == 1
    # The failed append left no hole: the next one takes position 2.
    assert append_to(store, "a", 0) == 2
    assert positions(store.read_all()) == [1, 2]


def test_an_append_to_several_streams_is_atomic_and_in_the_order_given(
    store: EventStore,
) -> None:
    append_to(store, "order", 0)
    last = store.append(
        [
            StreamAppend("order", 1, events_for("order", 2, 2)),
            StreamAppend("payment", 0, events_for("payment", 1, 1)),
            StreamAppend("shipment", None, events_for("shipment", 1, 2)),
        ]
    )
    assert last == 6
    assert [(e.position, e.stream, e.version) for e in store.read_all(after=1)] == [
        (2, "order", 2), (3, "order", 3), (4, "payment", 1), (5, "shipment", 1),
        (6, "shipment", 2),
    ]  # fmt: skip


def test_no_expected_version_appends_at_any_version(store: EventStore) -> None:
    append_to(store, "s", 0, 2)
    assert store.append([StreamAppend("s", None, [new_event("s", 3)])]) == 3
    assert store.stream_version("s") == 3


def test_an_append_of_no_events_checks_versions_and_returns_the_last_position(
    store: EventStore,
) -> None:
    append_to(store, "s", 0, 2)
    assert store.append([StreamAppend("s", 2, [])]) == 2
    with pytest.raises(ConcurrencyError):
        store.append([StreamAppend("s", 1, [])])
    assert store.append([]) == 2


def test_a_stream_given_twice_in_one_append_is_refused(store: EventStore) -> None:
    with pytest.raises(EventSourcingError, match="stream 'a' appears twice in one append"):
        store.append(
            [
                StreamAppend("a", 0, [new_event("a", 1)]),
                StreamAppend("b", 0, [new_event("b", 1)]),
                StreamAppend("a", 1, [new_event("a", 2)]),
            ]
        )
    assert store.last_position() == 0


def test_a_duplicate_version_is_an_error_and_appends_nothing(store: EventStore) -> None:
    # Event ids are random UUIDs made by the writer (riverbed.ids.random_ids); stores do not
    # index them, so a reused id is not checked here.
    append_to(store, "s", 0, 2)
    with pytest.raises(EventSourcingError, match="cannot append"):
        store.append([StreamAppend("s", None, [new_event("s", 2)])])
    with pytest.raises(EventSourcingError, match="cannot append"):
        store.append([StreamAppend("t", 0, [new_event("t", 1), new_event("t", 1)])])
    assert store.last_position() == 2
    assert append_to(store, "u", 0) == 3


def test_concurrent_appends_expecting_one_version_let_exactly_one_win(
    open_store: OpenStore,
) -> None:
    stores = [open_store() for _ in range(4)]
    start = threading.Barrier(len(stores))
    outcomes: list[int | ConcurrencyError] = []

    def race(store: EventStore) -> None:
        start.wait()
        try:
            outcomes.append(store.append([StreamAppend("hot", 0, [new_event("hot", 1)])]))
        except ConcurrencyError as error:
            outcomes.append(error)

    threads = [threading.Thread(target=race, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [o for o in outcomes if isinstance(o, int)] == [1]
    conflicts = [o for o in outcomes if isinstance(o, ConcurrencyError)]
    assert [(c.stream, c.expected, c.actual) for c in conflicts] == [("hot", 0, 1)] * 3
    assert len(stores[0].read_all()) == 1


def test_threads_appending_through_one_store_get_gap_free_positions(store: EventStore) -> None:
    # On PostgreSQL one thread at a time appends on the connection kept for appends, the others
    # on pooled ones; conflicts on a shared stream are reported, not lost.
    threads_count, appends = 6, 40
    start = threading.Barrier(threads_count)
    conflicts: list[ConcurrencyError] = []

    def write(worker: int) -> None:
        start.wait()
        for i in range(appends):
            append_to(store, f"w{worker}", i)
            try:
                append_to(store, "shared", store.stream_version("shared"))
            except ConcurrencyError as error:  # another thread appended since the read
                conflicts.append(error)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stored = store.read_all(limit=10_000)
    assert positions(stored) == list(range(1, len(stored) + 1))
    assert len(stored) == threads_count * appends * 2 - len(conflicts)
    for worker in range(threads_count):
        assert [e.version for e in store.read_stream(f"w{worker}")] == list(range(1, appends + 1))
    shared = [e.version for e in store.read_stream("shared")]
    assert shared == list(range(1, len(shared) + 1))


def test_read_stream_between_versions_travels_in_time(store: EventStore) -> None:
    append_to(store, "other", 0, 1)
    append_to(store, "s", 0, 5)
    assert [e.version for e in store.read_stream("s", from_version=3)] == [3, 4, 5]
    assert [e.version for e in store.read_stream("s", to_version=2)] == [1, 2]
    assert [e.version for e in store.read_stream("s", 2, 4)] == [2, 3, 4]
    assert [e.version for e in store.read_stream("s", 4, 4)] == [4]
    assert store.read_stream("s", 6) == []
    assert store.read_stream("s", 4, 3) == []


def test_pages_and_version_ranges_start_and_end_inside_one_save(store: EventStore) -> None:
    # The SQLite store keeps a save's events in one row: reads cut rows where asked.
    append_to(store, "a", 0, 10)
    append_to(store, "b", 0, 3)
    assert positions(store.read_all(3, 4)) == [4, 5, 6, 7]
    assert positions(store.read_all(9, 2)) == [10, 11]
    assert [e.version for e in store.read_stream("a", 3, 6)] == [3, 4, 5, 6]
    assert [e.version for e in store.read_stream("a", 10)] == [10]
    assert [(e.stream, e.version) for e in store.read_all(8, 100)] == [
        ("a", 9), ("a", 10), ("b", 1), ("b", 2), ("b", 3),
    ]  # fmt: skip


def test_appends_of_no_expected_version_give_any_unstored_versions(store: EventStore) -> None:
    started = [new_event("started", 5)]
    store.append([StreamAppend("started", None, started)])
    with pytest.raises(ConcurrencyError) as raised:  # a stream, though it has no version 1
        append_to(store, "started", 0, 3)
    assert raised.value.actual == 5
    shared = [new_event("shared", 1001), new_event("shared", 1003)]
    assert store.append([StreamAppend("shared", None, shared)]) == 3
    assert store.append([StreamAppend("shared", None, [new_event("shared", 1)])]) == 4
    assert [e.version for e in store.read_stream("shared")] == [1, 1001, 1003]
    assert [e.version for e in store.read_stream("shared", 2, 1002)] == [1001]
    assert store.stream_version("shared") == 1003
    for version in (1, 1003):
        with pytest.raises(EventSourcingError, match=rf"(?s)cannot append.*\b{version}\b"):
            store.append([StreamAppend("shared", None, [new_event("shared", version)])])
    run = [new_event("shared", version) for version in (1002, 1003, 1004)]
    with pytest.raises(EventSourcingError, match=r"(?s)cannot append.*\b1003\b"):
        store.append([StreamAppend("shared", None, run)])
    with pytest.raises(ConcurrencyError) as raised:
        append_to(store, "shared", 0)
    assert raised.value.actual == 1003
    assert store.last_position() == 4


def test_read_all_pages_by_position(store: EventStore) -> None:
    for i in range(5):
        append_to(store, f"s{i}", 0, 5)
    pages: list[list[int]] = []
    after = 0
    while page := store.read_all(after=after, limit=10):
        pages.append(positions(page))
        after = page[-1].position
    assert pages == [list(range(1, 11)), list(range(11, 21)), list(range(21, 26))]
    assert positions(store.read_all(after=23)) == [24, 25]
    assert store.read_all(after=25) == []
    assert len(store.read_all()) == 25
    for after, limit in ((-1, 10), (0, -1), (0, 1.5), ("0", 10), (2**63, 1), (0, 2**63)):
        with pytest.raises(ValueError, match=r"read_all: (after|limit) is an int of 0 to 2\*\*62"):
            store.read_all(after, limit)  # type: ignore[arg-type]
    for low, high in ((0, None), ("1", None), (1, -1), (1, 2**63)):
        with pytest.raises(ValueError, match=r"read_stream: (from|to)_version is an int of"):
            store.read_stream("s0", low, high)  # type: ignore[arg-type]
    with store.transaction("view") as tx:
        for collection, key in (("c", "a\x00b"), ("c\x00d", "k"), ("c", "\ud800")):
            with pytest.raises(ValueError, match=r"a document's (key|collection) is a str without"):
                tx.put(collection, key, {"n": 1})
            with pytest.raises(ValueError, match=r"a document's (key|collection) is a str without"):
                store.get_document(collection, key)


# The gap-free global order, with writer processes


def _writer(url: str, writer: int, start: EventFlag) -> None:
    """Append APPENDS_PER_WRITER times to this writer's stream, alternating one event and three,
    every tenth append also to a stream all writers share (any version)."""
    store = connect_store(url)
    stream = f"writer-{writer}"
    version = 0
    start.wait()
    try:
        for i in range(APPENDS_PER_WRITER):
            count = 1 if i % 2 else 3
            appends = [StreamAppend(stream, version, events_for(stream, version + 1, count))]
            if i % 10 == 0:
                # Versions of the shared stream need only be unique (no expected version).
                shared = NewEvent(uuid.uuid4().hex, "shared", writer * 1000 + i + 1, "Tick", 1,
                                  b"", b"\x80", 0)  # fmt: skip
                appends.append(StreamAppend("shared", None, [shared]))
            store.append(appends)
            version += count
    finally:
        store.close()


def test_readers_never_see_a_gap_while_writer_processes_append(store_url: str) -> None:
    store = connect_store(store_url)  # creates the tables before the writers race to
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    writers = [
        context.Process(target=_writer, args=(store_url, writer, start))
        for writer in range(WRITERS)
    ]
    for process in writers:
        process.start()
    per_writer = APPENDS_PER_WRITER * 2 + APPENDS_PER_WRITER // 10
    total = WRITERS * per_writer
    seen = 0
    pages = 0
    try:
        start.set()
        deadline = time.monotonic() + 240
        while seen < total:
            assert time.monotonic() < deadline, f"read {seen} of {total} events"
            page = store.read_all(after=seen, limit=97)
            # Contiguous from where the reader was: a position never shows before all below it.
            assert positions(page) == list(range(seen + 1, seen + 1 + len(page)))
            seen += len(page)
            pages += 1
            if not page:
                store.wait_for_events(after=seen, timeout=0.05)
        for process in writers:
            process.join(60)
            assert process.exitcode == 0
        assert store.last_position() == total
        assert store.read_all(after=total) == []
        for writer in range(WRITERS):
            versions = [e.version for e in store.read_stream(f"writer-{writer}")]
            assert versions == list(range(1, per_writer - APPENDS_PER_WRITER // 10 + 1))
        assert pages > WRITERS  # the reader ran alongside the writers, not only after them
    finally:
        for process in writers:
            if process.is_alive():
                process.kill()
                process.join()
        store.close()


# Waiting for events


def test_wait_for_events_returns_at_once_when_events_are_there(store: EventStore) -> None:
    append_to(store, "s", 0, 2)
    assert store.wait_for_events(after=1, timeout=10)
    assert store.wait_for_events(after=0, timeout=0)


def test_wait_for_events_times_out_when_nothing_is_appended(store: EventStore) -> None:
    append_to(store, "s", 0)
    started = time.monotonic()
    assert not store.wait_for_events(after=1, timeout=0.3)
    assert time.monotonic() - started >= 0.29


def test_wait_for_events_wakes_on_an_append_from_another_connection(
    open_store: OpenStore,
) -> None:
    waiter, writer = open_store(), open_store()
    append_to(writer, "s", 0)
    woke: list[tuple[bool, float]] = []

    def wait() -> None:
        woke.append((waiter.wait_for_events(after=1, timeout=30), time.monotonic()))

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.2)
    assert not woke  # still waiting: nothing past position 1 yet
    appended_at = time.monotonic()
    append_to(writer, "s", 1)
    thread.join(30)
    assert woke and woke[0][0]
    assert woke[0][1] - appended_at < 5  # woken by the append, long before the timeout


def test_several_waiters_wake_each_at_its_own_position(open_store: OpenStore) -> None:
    waiter, writer = open_store(), open_store()
    results: dict[int, bool] = {}

    def wait(after: int) -> None:
        results[after] = waiter.wait_for_events(after=after, timeout=20 if after < 2 else 1)

    threads = [threading.Thread(target=wait, args=(after,)) for after in (0, 1, 2)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    append_to(writer, "s", 0, 2)
    for thread in threads:
        thread.join(30)
    assert results == {0: True, 1: True, 2: False}


# Snapshots


def test_the_latest_snapshot_at_or_below_a_version_is_loaded(store: EventStore) -> None:
    assert store.load_snapshot("order") is None
    store.save_snapshot(Snapshot("order", 5, "Order", 1, b"v5", 1000))
    assert store.load_snapshot("order") == Snapshot("order", 5, "Order", 1, b"v5", 1000)
    assert store.load_snapshot("order", max_version=5) == store.load_snapshot("order")
    assert store.load_snapshot("order", max_version=4) is None
    assert store.load_snapshot("other") is None

    store.save_snapshot(Snapshot("order", 10, "Order", 2, b"v10", 2000))
    assert store.load_snapshot("order") == Snapshot("order", 10, "Order", 2, b"v10", 2000)
    assert store.load_snapshot("order", max_version=12) == store.load_snapshot("order")
    # A later snapshot replaces the earlier ones: time travel before it replays from the start.
    assert store.load_snapshot("order", max_version=9) is None


def test_saving_a_snapshot_again_at_its_version_replaces_it(store: EventStore) -> None:
    store.save_snapshot(Snapshot("order", 3, "Order", 1, b"old", 1))
    store.save_snapshot(Snapshot("order", 3, "Order", 2, b"new", 2))
    assert store.load_snapshot("order") == Snapshot("order", 3, "Order", 2, b"new", 2)
    assert store.footprint() == 1


# Stream keys (crypto-shredding)


def test_a_stream_key_is_created_once_and_shredded_on_delete(store: EventStore) -> None:
    assert store.stream_key("person-1", create=False) is None
    key = store.stream_key("person-1", create=True)
    assert isinstance(key, bytes)
    assert len(key) == 32
    assert store.stream_key("person-1", create=True) == key
    assert store.stream_key("person-1", create=False) == key
    other = store.stream_key("person-2", create=True)
    assert other is not None
    assert other != key

    assert store.delete_stream_key("person-1")
    assert store.stream_key("person-1", create=False) is None
    assert not store.delete_stream_key("person-1")
    assert store.stream_key("person-2", create=False) == other


def test_stores_creating_one_stream_key_at_once_agree_on_it(open_store: OpenStore) -> None:
    stores = [open_store() for _ in range(4)]
    start = threading.Barrier(len(stores))
    keys: list[bytes | None] = []

    def create(store: EventStore) -> None:
        start.wait()
        keys.append(store.stream_key("person", create=True))

    threads = [threading.Thread(target=create, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 4
    assert len(set(keys)) == 1
    assert keys[0] is not None


# Subscriber transactions


def test_documents_and_checkpoint_commit_together(store: EventStore) -> None:
    with store.transaction("orders-view") as tx:
        assert tx.name == "orders-view"
        assert tx.checkpoint == 0
        tx.put("orders", "o1", {"status": "placed", "lines": [1, 2.5, None, "é"], "n": {"a": 1}})
        tx.put("orders", "o2", {"status": "paid"})
        assert tx.get("orders", "o1") == {
            "status": "placed", "lines": [1, 2.5, None, "é"], "n": {"a": 1},
        }  # fmt: skip
        tx.set_checkpoint(7)
        assert tx.checkpoint == 7
    assert store.checkpoint("orders-view") == 7
    assert store.checkpoint("another-view") == 0
    assert store.get_document("orders", "o2") == {"status": "paid"}
    assert store.get_document("orders", "o3") is None
    assert store.get_document("payments", "o1") is None

    with store.transaction("orders-view") as tx:
        assert tx.checkpoint == 7
        tx.put("orders", "o2", {"status": "shipped"})
        tx.delete("orders", "o1")
        tx.set_checkpoint(9)
    assert store.documents("orders") == {"o2": {"status": "shipped"}}
    assert store.checkpoint("orders-view") == 9


def test_a_failed_transaction_leaves_nothing_behind(store: EventStore) -> None:
    with store.transaction("view") as tx:
        tx.put("c", "kept", {"v": 1})
        tx.set_checkpoint(1)
    before = store.footprint()

    with pytest.raises(RuntimeError, match="projection failed"), store.transaction("view") as tx:
        tx.put("c", "new", {"v": 2})
        tx.put("c", "kept", {"v": 3})
        tx.set_checkpoint(2)
        assert tx.seen("event-1") is False
        tx.set_timer("t", 100, b"x")
        tx.park(ParkedEvent("view", 1, "event-1", "T", "boom", 5))
        tx.append([StreamAppend("s", 0, [new_event("s", 1)])])
        raise RuntimeError("projection failed")

    assert store.checkpoint("view") == 1
    assert store.documents("c") == {"kept": {"v": 1}}
    assert store.parked("view") == []
    assert store.read_all() == []
    assert store.footprint() == before
    with store.transaction("view") as tx:
        assert tx.checkpoint == 1
        assert tx.seen("event-1") is False
        assert tx.due_timers(now_ms=1000) == []


def test_transactions_of_one_subscriber_take_turns(open_store: OpenStore) -> None:
    stores = [open_store() for _ in range(3)]
    rounds = 15

    def advance(store: EventStore) -> None:
        for _ in range(rounds):
            with store.transaction("counter") as tx:
                position = tx.checkpoint
                time.sleep(0.001)  # widen the window a lost update would need
                tx.set_checkpoint(position + 1)

    threads = [threading.Thread(target=advance, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert stores[0].checkpoint("counter") == len(stores) * rounds


def test_a_second_transaction_of_a_subscriber_waits_for_the_first(
    open_store: OpenStore,
) -> None:
    first, second = open_store(), open_store()
    entered = threading.Event()
    timeline: list[str] = []

    def hold() -> None:
        with first.transaction("saga") as tx:
            tx.set_checkpoint(1)
            entered.set()
            time.sleep(0.3)
            timeline.append("first commits")

    thread = threading.Thread(target=hold)
    thread.start()
    assert entered.wait(10)
    with second.transaction("saga") as tx:
        timeline.append("second enters")
        assert tx.checkpoint == 1  # it sees what the first committed
    thread.join(10)
    assert timeline == ["first commits", "second enters"]


def test_documents_lists_a_collection_in_key_order(store: EventStore) -> None:
    with store.transaction("view") as tx:
        for key in ("b", "c", "a", "d"):
            tx.put("letters", key, {"key": key})
        tx.put("numbers", "1", {"n": 1})
    assert list(store.documents("letters")) == ["a", "b", "c", "d"]
    assert store.documents("letters", limit=2) == {"a": {"key": "a"}, "b": {"key": "b"}}
    assert store.documents("nothing") == {}

    with store.transaction("view") as tx:
        tx.drop("letters")
        assert tx.get("letters", "a") is None
    assert store.documents("letters") == {}
    assert store.documents("numbers") == {"1": {"n": 1}}


def test_documents_read_back_as_they_were_written(store: EventStore) -> None:
    document = {"z": 1e16, "max": 1.7976931348623157e308, "negative_zero": -0.0, "a": 2}
    with store.transaction("view") as tx:
        tx.put("c", "k", document)
    read = store.get_document("c", "k")
    assert read == document and list(read) == ["z", "max", "negative_zero", "a"]
    assert [type(value) for value in read.values()] == [float, float, float, int]
    assert math.copysign(1, read["negative_zero"]) == -1


@pytest.mark.parametrize(("long", "limit"), [("collection", 1300), ("key", 1000)])
def test_documents_under_names_over_the_limits_are_refused_by_both(
    store: EventStore, long: str, limit: int
) -> None:
    longest = "https://example.com/" + "é" * ((limit - 20) // 2)  # at the limit: kept
    names = {"collection": "c", "key": "k", long: longest}
    with store.transaction("view") as tx:
        tx.put(names["collection"], names["key"], {"n": 1})
    assert store.get_document(names["collection"], names["key"]) == {"n": 1}
    names[long] = longest + "x"
    with (
        pytest.raises(ValueError, match=f"a document's {long}.* is at most {limit:,} bytes"),
        store.transaction("view") as tx,
    ):
        tx.put(names["collection"], names["key"], {"n": 1})
    assert store.get_document(names["collection"], names["key"]) is None  # read: no limit


def test_parked_events_are_listed_by_position_and_unparked(store: EventStore) -> None:
    with store.transaction("view") as tx:
        tx.park(ParkedEvent("view", 9, "e9", "Order.Placed", "KeyError: 'total'", 100))
        tx.park(ParkedEvent("view", 4, "e4", "Order.Paid", "ValueError: bad", 101))
        tx.park(ParkedEvent("other", 4, "e4", "Order.Paid", "no", 102))
    assert store.parked("view") == [
        ParkedEvent("view", 4, "e4", "Order.Paid", "ValueError: bad", 101),
        ParkedEvent("view", 9, "e9", "Order.Placed", "KeyError: 'total'", 100),
    ]
    assert (store.parked_count("view"), store.parked_count("nobody")) == (2, 0)
    assert store.unpark("view", 4)
    assert not store.unpark("view", 4)
    assert [p.position for p in store.parked("view")] == [9]
    assert store.parked_count("view") == 1
    assert [p.projection for p in store.parked("other")] == ["other"]
    assert store.parked("nobody") == []


def test_the_inbox_remembers_event_ids_per_subscriber(store: EventStore) -> None:
    with store.transaction("billing") as tx:
        assert tx.seen("event-1") is False
        assert tx.seen("event-1") is True
        assert tx.seen("event-2") is False
    with store.transaction("billing") as tx:
        assert tx.seen("event-1") is True
    with store.transaction("shipping") as tx:
        assert tx.seen("event-1") is False


def test_timers_are_set_moved_found_due_and_cancelled(store: EventStore) -> None:
    with store.transaction("saga") as tx:
        tx.set_timer("payment-timeout:o1", 300, b"o1")
        tx.set_timer("payment-timeout:o2", 100, b"o2")
        tx.set_timer("payment-timeout:o3", 200, b"o3")
    with store.transaction("other-saga") as tx:
        tx.set_timer("x", 50, b"")
    with store.transaction("saga") as tx:
        assert tx.due_timers(now_ms=99) == []
        assert tx.due_timers(now_ms=250) == [
            Timer("saga", "payment-timeout:o2", 100, b"o2"),
            Timer("saga", "payment-timeout:o3", 200, b"o3"),
        ]
        assert [t.key for t in tx.due_timers(now_ms=1000, limit=1)] == ["payment-timeout:o2"]
        tx.set_timer("payment-timeout:o2", 500, b"moved")
        tx.cancel_timer("payment-timeout:o3")
        tx.cancel_timer("never-set")
    with store.transaction("saga") as tx:
        assert tx.due_timers(now_ms=1000) == [
            Timer("saga", "payment-timeout:o1", 300, b"o1"),
            Timer("saga", "payment-timeout:o2", 500, b"moved"),
        ]


def test_events_appended_in_a_transaction_commit_with_its_checkpoint(
    store: EventStore,
) -> None:
    append_to(store, "order", 0)
    with store.transaction("saga") as tx:
        assert tx.append([StreamAppend("payment", 0, [new_event("payment", 1)])]) == 2
        tx.set_checkpoint(1)
    assert [(e.position, e.stream) for e in store.read_all()] == [(1, "order"), (2, "payment")]
    assert store.checkpoint("saga") == 1

    with pytest.raises(ConcurrencyError) as raised, store.transaction("saga") as tx:
        tx.set_checkpoint(2)
        tx.append([StreamAppend("payment", 0, [new_event("payment", 1)])])
    assert (raised.value.stream, raised.value.expected, raised.value.actual) == ("payment", 0, 1)
    assert store.checkpoint("saga") == 1
    assert store.last_position() == 2


def test_a_conflict_in_a_transaction_leaves_it_usable(store: EventStore) -> None:
    # A saga's command that loses a race retries in the same transaction.
    append_to(store, "payment", 0)
    with store.transaction("saga") as tx:
        with pytest.raises(ConcurrencyError) as raised:
            tx.append([StreamAppend("payment", 0, [new_event("payment", 1)])])
        assert (raised.value.expected, raised.value.actual) == (0, 1)
        assert tx.append([StreamAppend("payment", 1, [new_event("payment", 2)])]) == 2
        tx.set_checkpoint(1)
    assert [e.version for e in store.read_stream("payment")] == [1, 2]
    assert store.checkpoint("saga") == 1


def test_appends_in_a_postgresql_transaction_open_no_subtransactions(postgres_url: str) -> None:
    # Past 64 subtransactions in one transaction, every snapshot on the server slows down; a
    # saga appending once per event of a page would get there with a savepoint per append.
    store = connect_store(f"{postgres_url}?schema=subxacts_{uuid.uuid4().hex[:8]}")
    try:
        with store.transaction("saga") as tx:
            for version in range(1, 4):
                tx.append([StreamAppend("payment", version - 1, [new_event("payment", version)])])
            with pytest.raises(ConcurrencyError):
                tx.append([StreamAppend("payment", 0, [new_event("payment", 1)])])
            # Rows a subtransaction inserts carry its transaction id, not the transaction's.
            inserted_by = tx.execute(
                "SELECT count(DISTINCT xmin::text) FROM riverbed_batches WHERE stream = 'payment'"
            )
            assert inserted_by == [(1,)]
        assert [e.version for e in store.read_stream("payment")] == [1, 2, 3]
    finally:
        store.close()


def test_a_transaction_reads_the_events_it_appended_before_it_commits(
    open_store: OpenStore,
) -> None:
    store, other = open_store(), open_store()
    append_to(store, "order", 0)
    with store.transaction("saga") as tx:
        tx.append([StreamAppend("payment", 0, events_for("payment", 1, 2))])
        assert [e.version for e in tx.read_stream("payment")] == [1, 2]
        assert [e.version for e in tx.read_stream("payment", 2)] == [2]
        assert [e.version for e in tx.read_stream("payment", to_version=1)] == [1]
        # The store's reads on the transaction's thread run in it.
        assert store.stream_version("payment") == 2
        assert [e.version for e in store.read_stream("payment")] == [1, 2]
        assert store.last_position() == 3
        # Other connections see none of it before the commit.
        assert other.read_stream("payment") == []
        assert other.last_position() == 1
    assert [e.version for e in other.read_stream("payment")] == [1, 2]


def test_raw_sql_runs_in_the_transaction(store: EventStore, store_url: str) -> None:
    p = placeholder(store_url)
    with store.transaction("custom-view") as tx:
        assert tx.execute("CREATE TABLE totals (customer TEXT PRIMARY KEY, total INTEGER)") == []
        tx.execute(f"INSERT INTO totals (customer, total) VALUES ({p}, {p})", ("ann", 10))
        tx.execute(f"INSERT INTO totals (customer, total) VALUES ({p}, {p})", ("bob", 5))
        assert tx.execute(f"SELECT customer, total FROM totals WHERE total > {p}", (6,)) == [
            ("ann", 10)
        ]
    with pytest.raises(RuntimeError), store.transaction("custom-view") as tx:
        tx.execute(f"UPDATE totals SET total = total + 1 WHERE customer = {p}", ("ann",))
        raise RuntimeError("rolled back")
    with store.transaction("custom-view") as tx:
        assert tx.execute("SELECT customer, total FROM totals ORDER BY customer") == [
            ("ann", 10), ("bob", 5),
        ]  # fmt: skip


# Leases


def test_a_lease_has_one_owner_until_it_is_released(open_store: OpenStore) -> None:
    first, second = open_store(), open_store()
    assert first.acquire_lease("relay:orders", "a", 10_000)
    assert first.acquire_lease("relay:orders", "a", 10_000)  # renewed
    assert not second.acquire_lease("relay:orders", "b", 10_000)
    assert second.acquire_lease("relay:payments", "b", 10_000)  # one lease per name
    second.release_lease("relay:orders", "b")  # not b's to release
    assert not second.acquire_lease("relay:orders", "b", 10_000)
    first.release_lease("relay:orders", "a")
    assert second.acquire_lease("relay:orders", "b", 10_000)
    assert not first.acquire_lease("relay:orders", "a", 10_000)


def test_an_expired_lease_goes_to_the_next_owner_asking(open_store: OpenStore) -> None:
    first, second = open_store(), open_store()
    assert first.acquire_lease("relay", "a", 100)
    assert not second.acquire_lease("relay", "b", 10_000)
    time.sleep(0.2)
    assert second.acquire_lease("relay", "b", 10_000)
    assert not first.acquire_lease("relay", "a", 10_000)


def race_for_lease(stores: list[EventStore], name: str) -> list[str]:
    """The owners that got lease ``name``, one per store, all asking at once."""
    start = threading.Barrier(len(stores))
    winners: list[str] = []

    def race(store: EventStore, owner: str) -> None:
        start.wait()
        if store.acquire_lease(name, owner, 10_000):
            winners.append(owner)

    threads = [
        threading.Thread(target=race, args=(store, f"owner-{i}")) for i, store in enumerate(stores)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return winners


def test_owners_racing_for_a_free_or_expired_lease_get_it_once(open_store: OpenStore) -> None:
    stores = [open_store() for _ in range(4)]
    assert len(race_for_lease(stores, "relay:free")) == 1
    assert stores[0].acquire_lease("relay:expired", "gone", 1)
    time.sleep(0.01)
    assert len(race_for_lease(stores, "relay:expired")) == 1


def test_a_lease_renewed_in_a_transaction_is_its_owners_until_it_commits(
    open_store: OpenStore,
) -> None:
    first, second = open_store(), open_store()
    assert first.acquire_lease("relay", "a", 50)
    time.sleep(0.1)  # expired, but nobody took it: still a's to renew
    renewed = threading.Event()

    def checkpoint() -> None:
        with first.transaction("relay") as tx:
            assert tx.renew_lease("relay", "a", 10_000)
            tx.set_checkpoint(7)
            renewed.set()
            time.sleep(0.3)

    thread = threading.Thread(target=checkpoint)
    thread.start()
    assert renewed.wait(10)
    assert not second.acquire_lease("relay", "b", 10_000)  # waits for the commit, then sees it
    thread.join(10)
    assert second.checkpoint("relay") == 7


def test_a_lease_taken_over_or_released_is_not_renewed_in_a_transaction(
    open_store: OpenStore,
) -> None:
    first, second = open_store(), open_store()
    assert first.acquire_lease("relay", "a", 50)
    time.sleep(0.1)
    assert second.acquire_lease("relay", "b", 50)
    with first.transaction("relay") as tx:
        assert not tx.renew_lease("relay", "a", 10_000)
    second.release_lease("relay", "b")
    with second.transaction("relay") as tx:
        assert not tx.renew_lease("relay", "b", 10_000)
    assert first.acquire_lease("relay", "a", 10_000)


def test_footprint_counts_the_rows_of_every_table(store: EventStore) -> None:
    append_to(store, "s", 0, 3)
    store.save_snapshot(Snapshot("s", 3, "S", 1, b"", 0))
    store.stream_key("s", create=True)
    with store.transaction("view") as tx:
        tx.set_checkpoint(3)
        tx.put("c", "k", {})
        tx.park(ParkedEvent("view", 2, "e", "T", "error", 0))
        tx.seen("e")
        tx.set_timer("t", 1, b"")
    store.acquire_lease("relay", "a", 1000)
    assert store.footprint() == 3 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1


# Schema versions


def execute(store_url: str, statement: str) -> list[tuple[Any, ...]]:
    """Run ``statement`` on the test's store behind riverbed's back; its rows."""
    if store_url.startswith("sqlite"):
        path = store_url.removeprefix("sqlite:///")
        with closing(sqlite3.connect(path, isolation_level=None)) as conn:
            return conn.execute(statement).fetchall()
    server, schema = store_url.split("?schema=")
    with psycopg.connect(server, autocommit=True, options=f"-c search_path={schema}") as conn:
        cur = conn.execute(statement.encode())
        return cur.fetchall() if cur.description is not None else []


# What schema versions 1 and 2 made for events: a row each.
SQLITE_V2_EVENTS = """
CREATE TABLE events (
    position INTEGER PRIMARY KEY, id TEXT NOT NULL, stream TEXT NOT NULL,
    version INTEGER NOT NULL, record BLOB NOT NULL, UNIQUE (stream, version)
)
"""


def test_a_version_2_sqlite_store_moves_its_events_into_batches_when_opened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path}/events.db"
    store = connect_store(url)
    append_to(store, "a", 0, 2)
    append_to(store, "b", 0)
    append_to(store, "a", 2)
    stored = store.read_all()
    store.close()
    with closing(sqlite3.connect(tmp_path / "events.db", isolation_level=None)) as conn:
        conn.execute(SQLITE_V2_EVENTS)
        for e in stored:
            conn.execute(
                "INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                (e.position, e.id, e.stream, e.version, msgspec.msgpack.encode(e)),
            )
        conn.execute("DROP VIEW new_streams")
        conn.execute("DROP TABLE batches")
        conn.execute("PRAGMA user_version = 2")
    with caplog.at_level(logging.INFO, logger="riverbed.events"):
        store = connect_store(url)
    assert "event store upgraded to schema version 3: 4 events moved" in caplog.text
    try:
        assert store.read_all() == stored
        assert store.read_stream("a", 2) == [stored[1], stored[3]]
        assert store.stream_version("a") == 3
        assert append_to(store, "a", 3) == 5
        assert append_to(store, "c", 0, 2) == 7
        with pytest.raises(ConcurrencyError):
            append_to(store, "b", 0)
        assert positions(store.read_all()) == list(range(1, 8))
        assert execute(url, "SELECT name FROM sqlite_master WHERE name = 'events'") == []
        assert execute(url, "PRAGMA user_version") == [(sqlite_store.SCHEMA_VERSION,)]
    finally:
        store.close()


def test_a_version_1_store_gets_the_leases_table_when_opened(
    open_store: OpenStore, store_url: str
) -> None:
    append_to(open_store(), "s", 0, 2)
    # Version 1 had every table but the leases.
    if store_url.startswith("sqlite"):
        execute(store_url, "DROP TABLE leases")
        execute(store_url, "PRAGMA user_version = 1")
        version = "PRAGMA user_version"
    else:
        execute(store_url, "DROP TABLE riverbed_leases")
        execute(store_url, "UPDATE riverbed_head SET schema_version = 1")
        version = "SELECT schema_version FROM riverbed_head"
    assert execute(store_url, version) == [(1,)]

    store = open_store()
    assert positions(store.read_all()) == [1, 2]
    assert store.acquire_lease("relay", "a", 10_000)
    assert execute(store_url, version) == [(schema_version(store_url),)]


def schema_version(store_url: str) -> int:
    """The schema version this riverbed makes for the store at ``store_url``."""
    if store_url.startswith("sqlite"):
        return sqlite_store.SCHEMA_VERSION
    return postgres_schema.SCHEMA_VERSION


def test_a_store_of_a_newer_riverbed_is_refused(open_store: OpenStore, store_url: str) -> None:
    open_store()
    ours = schema_version(store_url)
    if store_url.startswith("sqlite"):
        execute(store_url, f"PRAGMA user_version = {ours + 1}")
    else:
        execute(store_url, f"UPDATE riverbed_head SET schema_version = {ours + 1}")
    with pytest.raises(
        RiverbedError, match=f"schema version {ours + 1}, newer than this riverbed's {ours}"
    ):
        open_store()


# The async face


def test_the_async_store_appends_reads_and_waits(store: EventStore, store_url: str) -> None:
    async def main() -> None:
        astore = await connect_async_store(store_url)
        try:
            assert await astore.append([StreamAppend("s", 0, events_for("s", 1, 2))]) == 2
            with pytest.raises(ConcurrencyError) as raised:
                await astore.append(
                    [
                        StreamAppend("t", 0, events_for("t", 1, 40)),  # two statements
                        StreamAppend("s", 0, events_for("s", 1, 1)),
                    ]
                )
            assert (raised.value.stream, raised.value.expected, raised.value.actual) == ("s", 0, 2)
            assert await astore.read_stream("t") == []
            assert positions(await astore.read_stream("s", 2)) == [2]
            assert positions(await astore.read_all(after=1)) == [2]
            await astore.save_snapshot(Snapshot("s", 2, "S", 1, b"state", 0))
            assert await astore.load_snapshot("s") == Snapshot("s", 2, "S", 1, b"state", 0)
            key = await astore.stream_key("s", create=True)
            assert key is not None
            assert await astore.stream_key("s", create=False) == key
            assert await astore.checkpoint("view") == 0
            assert await astore.get_document("c", "k") is None

            waiting = asyncio.create_task(astore.wait_for_events(after=2, timeout=30))
            await asyncio.sleep(0.2)
            assert not waiting.done()
            await asyncio.to_thread(append_to, store, "s", 2)  # from another connection
            assert await asyncio.wait_for(waiting, 10)
            assert not await astore.wait_for_events(after=3, timeout=0.1)
        finally:
            await astore.close()

    asyncio.run(main())
    with store.transaction("view") as tx:
        tx.put("c", "k", {"v": 1})
        tx.set_checkpoint(3)

    async def read_side() -> None:
        astore = await connect_async_store(store_url)
        try:
            assert await astore.checkpoint("view") == 3
            assert await astore.get_document("c", "k") == {"v": 1}
        finally:
            await astore.close()

    asyncio.run(read_side())


# URLs


def test_an_unknown_url_option_is_refused(store_url: str) -> None:
    with pytest.raises(InvalidUrlError, match="bogus"):
        connect_store(store_url + ("&" if "?" in store_url else "?") + "bogus=1")


def test_an_unreachable_postgresql_server_fails_fast_without_showing_the_password() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as raised:
            connect_store(f"postgresql://shop:s3cret-pw@127.0.0.1:{port}/shop")
    assert time.monotonic() - started < 10
    assert f"127.0.0.1:{port}" in str(raised.value)
    assert "s3cret-pw" not in str(raised.value)


@pytest.mark.parametrize(
    "option",
    [
        "schema=Bad-Name",
        f"schema={'s' * 48}",
        "schema=information_schema",
        "schema=pg_catalog",
        "pool_size=0",
        "pool_timeout=0",
        "pool_timeout=inf",
        "pool_timeout=1e12",  # the pool's clock would overflow
        "spin_us=-1",
        "spin_us=1.5",
        "spin_us=10001",
        "spin_us=abc",
        "command_timeout=-1",
        "command_timeout=86401",
        "command_timeout=inf",
        "command_timeout=soon",
        "target_session_attrs=read-only",  # riverbed writes: a read-only session cannot work
        "target_session_attrs=prefer-standby",
    ],
)
def test_bad_postgresql_options_are_refused(option: str) -> None:
    with pytest.raises(InvalidUrlError, match=option.split("=", maxsplit=1)[0]):
        connect_store(f"postgresql://shop@127.0.0.1:1/shop?{option}")


def test_stores_in_two_schemas_of_one_database_are_separate(postgres_url: str) -> None:
    first = connect_store(f"{postgres_url}?schema=shop_{uuid.uuid4().hex[:8]}")
    second = connect_store(f"{postgres_url}?schema=shop_{uuid.uuid4().hex[:8]}")
    try:
        append_to(first, "s", 0, 2)
        assert second.read_all() == []
        assert append_to(second, "s", 0) == 1
        assert not second.wait_for_events(after=1, timeout=0.2)
    finally:
        first.close()
        second.close()


def test_dropped_connections_are_replaced_and_the_listeners_fails_one_wait(
    postgres_url: str,
) -> None:
    name = f"dropped_{uuid.uuid4().hex[:8]}"
    store = connect_store(f"{postgres_url}?schema={name}&application_name={name}")
    try:
        append_to(store, "s", 0)
        assert not store.wait_for_events(after=1, timeout=0.01)  # opens the LISTEN connection
        # The pool's connections (one kept for appends) and the listener's.
        assert terminate_connections(postgres_url, name) == 3
        time.sleep(0.5)  # the server's last words reach their sockets
        # The pooled ones are replaced before a call uses them; a wait on the listener fails.
        assert positions(store.read_all()) == [1]
        with pytest.raises(StoreUnavailableError, match="cannot reach the event store"):
            store.wait_for_events(after=1, timeout=5)
        assert append_to(store, "s", 1) == 2
        assert positions(store.read_all()) == [1, 2]
        assert store.wait_for_events(after=1, timeout=5)
    finally:
        store.close()


def test_a_call_waits_pool_timeout_for_a_connection(postgres_url: str) -> None:
    url = f"{postgres_url}?schema=busy_{uuid.uuid4().hex[:8]}&pool_size=1&pool_timeout=0.2"
    store = connect_store(url)
    errors: list[Exception] = []

    def read() -> None:
        try:
            store.read_all()
        except StoreUnavailableError as error:
            errors.append(error)

    try:
        with store.transaction("sub"):  # holds the pool's only connection
            reader = threading.Thread(target=read)
            reader.start()
            reader.join(10)
        assert len(errors) == 1
        assert "came free within 0.2 s: all 1 of the pool's were in use; raise pool_size=" in str(
            errors[0]
        )
    finally:
        store.close()


def test_a_closed_store_says_so(store_url: str) -> None:
    store = connect_store(store_url)
    append_to(store, "s", 0)
    store.close()
    for call in (store.read_all, lambda: append_to(store, "s", 1)):
        with pytest.raises(RiverbedError, match="is closed"):
            call()

    async def read_closed() -> None:
        async_store = await connect_async_store(store_url)
        await async_store.close()
        await async_store.read_all()

    with pytest.raises(RiverbedError, match="is closed"):
        asyncio.run(read_closed())


def test_the_longest_schema_name_works(postgres_url: str) -> None:
    store = connect_store(f"{postgres_url}?schema={'s' * 47}")  # its channel: 63 bytes
    try:
        assert append_to(store, "s", 0) == 1
        assert store.wait_for_events(after=0, timeout=1)
    finally:
        store.close()


def test_a_store_with_a_pool_of_one_connection_serves_every_call(postgres_url: str) -> None:
    store = connect_store(f"{postgres_url}?schema=one_{uuid.uuid4().hex[:8]}&pool_size=1")
    try:
        assert append_to(store, "s", 0) == 1
        assert positions(store.read_all()) == [1]  # the only connection is not kept for appends
        with store.transaction("sub") as tx:
            tx.append([StreamAppend("s", 1, events_for("s", 2, 1))])
        assert append_to(store, "s", 2) == 3
    finally:
        store.close()


def test_appends_survive_psycopg_deallocating_every_prepared_statement(
    postgres_url: str,
) -> None:
    """psycopg prepares a statement run 5 times on a connection, and after a rollback on it
    deallocates all of the connection's prepared statements (DEALLOCATE ALL), the append's
    too. With one pooled connection besides the one kept for appends, every transaction here
    runs on that connection."""
    store = connect_store(f"{postgres_url}?schema=dealloc_{uuid.uuid4().hex[:8]}&pool_size=2")
    try:
        append_to(store, "kept", 0)  # takes the appends' connection out of the pool
        for version in range(6):  # psycopg prepares the subscriber's lock statement
            with store.transaction("sub") as tx:
                tx.append([StreamAppend("in-tx", version, events_for("in-tx", version + 1, 1))])
        with pytest.raises(ValueError), store.transaction("sub"):
            raise ValueError("rolled back")
        with store.transaction("sub") as tx:  # psycopg deallocates all before its first statement
            tx.append([StreamAppend("in-tx", 6, events_for("in-tx", 7, 1))])
        with store.transaction("sub") as tx:  # a conflict in a transaction leaves it usable
            with pytest.raises(ConcurrencyError):
                tx.append([StreamAppend("in-tx", 0, events_for("in-tx", 1, 1))])
            tx.set_checkpoint(1)
        assert store.stream_version("in-tx") == 7 and store.checkpoint("sub") == 1
        # Appends outside transactions use the pooled connection while the kept one is busy.
        with store._appender_free:  # type: ignore[attr-defined]
            assert append_to(store, "pooled", 0) == 9
            with pytest.raises(ValueError), store.transaction("sub"):
                raise ValueError("rolled back")
            assert store.stream_version("pooled") == 1  # psycopg deallocates all first
            assert append_to(store, "pooled", 1) == 10
    finally:
        store.close()


def test_a_sqlite_store_opens_and_reads_while_another_process_writes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/events.db"
    store = connect_store(url)
    append_to(store, "s", 0)
    store.close()
    writer = sqlite3.connect(tmp_path / "events.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process, in the middle of a long transaction
    try:
        reader = connect_store(url)  # takes no write lock: the schema is there
        assert positions(reader.read_all()) == [1]
        reader.close()
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_damaged_sqlite_event_record_is_named(tmp_path: Path) -> None:
    store = connect_store(f"sqlite:///{tmp_path}/events.db")
    try:
        append_to(store, "s", 0)
        append_to(store, "s", 1, 2)  # a row of positions 2 and 3
        append_to(store, "s", 3)
        with sqlite3.connect(tmp_path / "events.db") as damage:
            damage.execute("UPDATE batches SET records = x'92c1' WHERE position = 2")
        with pytest.raises(EventSourcingError, match=r"a damaged .* of positions 2 to 3"):
            store.read_all()
        with pytest.raises(EventSourcingError, match=r"a damaged .* of positions 2 to 3"):
            store.read_stream("s", 3)
        assert positions(store.read_all(limit=1)) == [1]
        assert positions(store.read_all(after=3)) == [4]
        assert positions(store.read_stream("s", 4)) == [4]
    finally:
        store.close()


def test_sqlite_pages_past_the_blob_limit_and_with_nul_bytes_read_whole(tmp_path: Path) -> None:
    """A page is read as one blob SQLite joins; what that cannot hold is read row by row."""
    store = connect_store(f"sqlite:///{tmp_path}/events.db")
    try:
        payloads = [b"\xc4\x03\x00\x00\x00", b"\xc4\x01\x00", b"\x00"]
        for version, payload in enumerate(payloads):  # a row each
            store.append([StreamAppend("s", version, [new_event("s", version + 1, payload)])])
        assert [event.data for event in store.read_all()] == payloads
        assert [event.data for event in store.read_stream("s")] == payloads
        store._conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 150)  # two ~90 B records are past it
        assert positions(store.read_all()) == [1, 2, 3]
        assert positions(store.read_stream("s", 2)) == [2, 3]
    finally:
        store.close()


def test_sqlite_pages_skip_positions_deleted_by_hand(tmp_path: Path) -> None:
    """Positions run without gaps, so a page is read as a range; rows deleted by hand (say, to
    erase someone) leave gaps, and pages still hold what follows them."""
    store = connect_store(f"sqlite:///{tmp_path}/events.db")
    try:
        append_to(store, "s", 0)
        append_to(store, "s", 1, 7)  # a row of positions 2 to 8
        append_to(store, "s", 8, 2)
        with sqlite3.connect(tmp_path / "events.db") as edit:
            edit.execute("DELETE FROM batches WHERE position = 2")
        assert positions(store.read_all(0, 2)) == [1, 9]
        assert positions(store.read_all(1, 3)) == [9, 10]  # not empty: that would end a reader
        assert positions(store.read_all(9, 5)) == [10]
        assert positions(store.read_all()) == [1, 9, 10]
    finally:
        store.close()


# What schema version 1 made: positions in a head row (its append function is replaced too).
V1_STORE = """
CREATE TABLE riverbed_head (
    id smallint PRIMARY KEY CHECK (id = 1), position bigint NOT NULL,
    schema_version integer NOT NULL
);
INSERT INTO riverbed_head VALUES (1, 2, 1);
CREATE TABLE riverbed_events (
    position bigint PRIMARY KEY, id text NOT NULL, stream text NOT NULL, version bigint NOT NULL,
    type text NOT NULL, schema integer NOT NULL, data bytea NOT NULL, metadata bytea NOT NULL,
    timestamp_ms bigint NOT NULL, UNIQUE (stream, version)
);
INSERT INTO riverbed_events VALUES
    (1, 'e1', 's', 1, 'Order.Placed', 2, '\\x81a16e01', '\\x80', 1),
    (2, 'e2', 's', 2, 'Order.Placed', 2, '\\x81a16e01', '\\x80', 2);
CREATE FUNCTION riverbed_append(p_appends json, p_channel text) RETURNS TABLE (
    last_position bigint, conflict_stream text, conflict_expected bigint, conflict_actual bigint
) LANGUAGE sql AS $$ SELECT NULL::bigint, 'v1', 0::bigint, 0::bigint $$;
"""


def older_store(postgres_url: str, version: str, ddl: str) -> str:
    """A new schema holding what ``ddl`` makes (an older riverbed's tables); its name."""
    schema = f"{version}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        admin.execute(f"SET search_path TO {schema}")
        admin.execute(ddl.encode())
    return schema


def test_a_schema_version_1_postgresql_store_is_upgraded_when_opened(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    schema = older_store(postgres_url, "v1", V1_STORE)
    with caplog.at_level(logging.INFO, logger="riverbed.events"):
        store = connect_store(f"{postgres_url}?schema={schema}")
    assert "event store upgraded to schema version 5: 2 events moved" in caplog.text
    try:
        assert store.read_all() == [  # every field as stored: a row of its own each
            StoredEvent(1, "e1", "s", 1, "Order.Placed", 2, b"\x81\xa1n\x01", b"\x80", 1),
            StoredEvent(2, "e2", "s", 2, "Order.Placed", 2, b"\x81\xa1n\x01", b"\x80", 2),
        ]
        assert store.last_position() == 2
        assert append_to(store, "s", 2) == 3
        assert positions(store.read_all()) == [1, 2, 3]
        assert store.read_stream("s")[-1].version == 3
        with pytest.raises(ConcurrencyError):  # the version check of this riverbed
            append_to(store, "s", 2)
    finally:
        store.close()
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        head = admin.execute(f"SELECT * FROM {schema}.riverbed_head").fetchall()
    assert head == [(1, postgres_schema.SCHEMA_VERSION)]  # no position column


def test_an_upgrade_in_a_database_of_another_encoding_writes_utf_8_lengths(
    postgres_url: str,
) -> None:
    """A LATIN1 database stores "é" in one byte, UTF-8 in two: a moved record's text lengths
    are of the UTF-8 bytes it holds."""
    database = f"latin1_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(
            f"CREATE DATABASE {database} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' "
            "TEMPLATE template0"
        )
    url = f"{postgres_url.rsplit('/', 1)[0]}/{database}"
    try:
        texts = V1_STORE.replace("'e1', 's'", "'é1', 'café'").replace("'e2', 's'", "'é2', 'café'")
        texts = texts.replace("'Order.Placed'", "'Order.Placé'")
        schema = older_store(f"{url}?client_encoding=UTF8", "v1", texts)  # as its bytes are
        store = connect_store(f"{url}?schema={schema}")
        try:
            assert store.read_all() == [
                StoredEvent(1, "é1", "café", 1, "Order.Placé", 2, b"\x81\xa1n\x01", b"\x80", 1),
                StoredEvent(2, "é2", "café", 2, "Order.Placé", 2, b"\x81\xa1n\x01", b"\x80", 2),
            ]
        finally:
            store.close()
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {database} WITH (FORCE)")


def test_a_postgresql_append_is_numbered_from_the_guess_unless_another_writer_made_it_stale(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    """The client numbers an append of one statement on from the last position its store
    committed; when another writer appended since, the primary key finds the guess stale, the
    statement inserts nothing (no error in the server's log), and the append goes again for the
    server to number. An append of several statements (streams, here) is numbered by the
    server."""
    log_start = postgres_server.log_path.stat().st_size
    schema = f"guess_{uuid.uuid4().hex[:8]}"
    url = f"{postgres_url}?schema={schema}"
    store, other = connect_store(url), connect_store(url)
    channel = f"riverbed_events_{schema}"
    options = f"-c search_path={schema}"
    try:
        append_to(store, "a", 0, 2)
        append_to(other, "b", 0, 3)
        with psycopg.connect(postgres_url, autocommit=True, options=options) as conn:
            answers = AnswerWait(SPIN_US)
            stale = PositionGuess()
            stale.committed(2)
            c = [StreamAppend("c", 0, events_for("c", 1, 10))]
            assert libpq_append.append(conn, c, channel, stale, answers) == 15
            assert stale.take() is None  # the next appends do not guess
            guess = PositionGuess()
            guess.committed(15)
            d = [StreamAppend("d", 0, events_for("d", 1, 2))]
            assert libpq_append.append(conn, d, channel, guess, answers) == 17
            ef = [StreamAppend("e", 0, events_for("e", 1, 1)),
                  StreamAppend("f", 0, events_for("f", 1, 1))]  # fmt: skip
            assert libpq_append.append(conn, ef, channel, guess, answers) == 19
            assert guess.take() == 19
            runs = conn.execute(
                "SELECT name, generic_plans + custom_plans FROM pg_prepared_statements"
            ).fetchall()
        assert dict(runs) == {
            "riverbed_lock_appends": 2,  # before c again and ef: a numbered append locks itself
            "riverbed_append_numbered": 2,  # c, refused, and d
            "riverbed_append": 3,  # c again, e and f
        }
        events = other.read_all(0, 100)
        assert positions(events) == list(range(1, 20))
        assert [e.stream for e in events] == list("aabbb") + ["c"] * 10 + list("ddef")
    finally:
        store.close()
        other.close()
    assert "riverbed_batches_pkey" not in server_log_since(postgres_server, log_start)


def server_log_since(server: PostgresServer, start: int) -> str:
    """What the server logged from byte ``start`` of its log on."""
    with server.log_path.open("rb") as log:
        log.seek(start)
        return log.read().decode(errors="replace")


def test_an_async_postgresql_store_numbers_appends_from_its_guess_too(
    postgres_server: PostgresServer,
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As the sync store does; and an append that fails leaves nothing in the log: psycopg
    logged a pipeline that a statement's error aborted as an error ignored."""
    log_start = postgres_server.log_path.stat().st_size
    schema = f"aguess_{uuid.uuid4().hex[:8]}"
    url = f"{postgres_url}?schema={schema}"
    numbered: list[int] = []  # the first position of each append numbered by the client
    build = postgres_statements.numbered_append_params

    def numbered_params(*args: Any) -> list[object]:
        numbered.append(args[-1])
        return build(*args)

    monkeypatch.setattr(postgres_statements, "numbered_append_params", numbered_params)
    other = connect_store(url)

    async def main() -> None:
        store = await connect_async_store(url)
        try:
            assert await store.append([StreamAppend("a", 0, events_for("a", 1, 2))]) == 2
            assert await store.append([StreamAppend("b", 0, events_for("b", 1, 3))]) == 5
            assert numbered == [3]  # the first append had nothing to guess from
            two = [StreamAppend("c", 0, events_for("c", 1, 1)),
                   StreamAppend("d", 0, events_for("d", 1, 1))]  # fmt: skip
            assert await store.append(two) == 7
            assert numbered == [3]  # two statements: numbered by the server
            # A conflict in the first of many statements: sending the others outlasts a round
            # trip, so psycopg reads the error before the pipeline ends.
            late = [StreamAppend(f"y{n}", 0, events_for(f"y{n}", 1, 1)) for n in range(50)]
            with pytest.raises(ConcurrencyError):
                await store.append([StreamAppend("c", 0, events_for("c", 1, 1)), *late])
            append_to(other, "x", 0, 3)
            assert await store.append([StreamAppend("e", 0, events_for("e", 1, 2))]) == 12
            assert numbered == [3, 8]  # stale: the server numbered it from 11
            assert await store.append([StreamAppend("f", 0, events_for("f", 1, 1))]) == 13
            assert numbered == [3, 8]  # after a stale guess, the next appends do not guess
        finally:
            await store.close()

    try:
        with caplog.at_level(logging.WARNING):
            asyncio.run(main())
        assert caplog.records == []  # no error ignored while ending the pipeline
        events = other.read_all(0, 100)
        assert [e.stream for e in events] == list("aabbbcdxxxeef")
        assert positions(events) == list(range(1, 14))
    finally:
        other.close()
    assert "riverbed_batches_pkey" not in server_log_since(postgres_server, log_start)


def _waiting(admin: psycopg.Connection[Any], wait_event: str, query: str) -> None:
    """Until a connection runs ``query`` (a LIKE pattern), waiting for a lock of this kind."""
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = %s AND query LIKE %s"
    deadline = time.monotonic() + 30
    while admin.execute(waiting, (wait_event, query)).fetchone() != (1,):
        assert time.monotonic() < deadline, f"nothing ran {query} waiting for a {wait_event} lock"
        time.sleep(0.01)


def _holding_the_append_lock(postgres_url: str, schema: str) -> psycopg.Connection[Any]:
    """A connection in a transaction that holds the append lock, and looks for deadlocks only
    after a minute."""
    holder = psycopg.connect(postgres_url, options=f"-c search_path={schema}")
    holder.execute("SET deadlock_timeout = '60s'")
    holder.execute(postgres_statements.LOCK_APPENDS)
    return holder


def _append_b(holder: psycopg.Connection[Any], schema: str) -> None:
    """Stream "b" (3 events) after "a" (2), in ``holder``'s transaction."""
    b = [StreamAppend("b", 0, events_for("b", 1, 3))]
    assert libpq_append.append_in_transaction(holder, b, f"riverbed_events_{schema}") == 5


def _commit_b_meanwhile(postgres_url: str, holder: psycopg.Connection[Any], schema: str) -> None:
    """Once a numbered append waits for the append lock that ``holder`` holds: ``holder``
    appends stream "b" and commits."""
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        _waiting(admin, "advisory", "INSERT INTO riverbed_batches %")
    _append_b(holder, schema)
    holder.commit()


def _deadlock_with_the_waiting_append(
    postgres_url: str, holder: psycopg.Connection[Any], schema: str
) -> None:
    """Once a numbered append waits for the append lock that ``holder`` holds: another
    transaction takes a table, then waits to have riverbed_batches alone (the append holds its
    lock on it), and ``holder`` waits for that table. The append, looking first, finds the
    cycle and fails. Then ``holder`` appends stream "b" (3 events) after "a" (2) and commits."""
    options = f"-c search_path={schema}"
    with (
        psycopg.connect(postgres_url, options=options) as alterer,
        psycopg.connect(postgres_url, autocommit=True, options=options) as admin,
    ):
        _waiting(admin, "advisory", "INSERT INTO riverbed_batches %")
        admin.execute("CREATE TABLE held (n integer)")
        alterer.execute("SET deadlock_timeout = '60s'")

        def alter() -> None:
            alterer.execute("LOCK TABLE held IN ACCESS EXCLUSIVE MODE")
            alterer.execute("LOCK TABLE riverbed_batches IN ACCESS EXCLUSIVE MODE")
            alterer.rollback()

        altering = threading.Thread(target=alter)
        altering.start()
        _waiting(admin, "relation", "LOCK TABLE riverbed_batches%")
        reading = threading.Thread(target=lambda: holder.execute("SELECT count(*) FROM held"))
        reading.start()
        for thread in (reading, altering):
            thread.join(30)
            assert not thread.is_alive()
    _append_b(holder, schema)
    holder.commit()


def _aabbbcc(store: EventStore) -> None:
    """The store holds "a" (2 events), "b" (3), then "c" (2)."""
    events = store.read_all(0, 100)
    assert positions(events) == list(range(1, 8))
    assert [e.stream for e in events] == list("aabbbcc")


def _run_quietly(
    main: Callable[[], Coroutine[Any, Any, None]], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert caplog.records == []  # no error ignored as psycopg ended a pipeline


# What happens while a numbered append (statements.APPEND_NUMBERED) waits for the append lock.
MEANWHILE = {"committed": _commit_b_meanwhile, "deadlock": _deadlock_with_the_waiting_append}


@pytest.mark.parametrize("meanwhile", MEANWHILE)
def test_a_numbered_postgresql_append_goes_again_when_it_could_not_insert(
    postgres_url: str, meanwhile: str
) -> None:
    """APPEND_NUMBERED takes the append lock itself, so its snapshot is older than the lock: an
    append that commits while it waits is not in it. That append took the guessed position, so
    the insert fails on the primary key. And it holds its lock on the table as it waits: another
    transaction waiting to have the table alone, while it holds what the append holding the
    append lock waits for, closes a cycle, which the server breaks by failing one, here the
    numbered append (the first of the three to look). Either way, the append goes again for the
    server to number."""
    schema = f"{meanwhile}_{uuid.uuid4().hex[:8]}"
    url = f"{postgres_url}?schema={schema}"
    store = connect_store(url)
    options = f"-c search_path={schema}"
    try:
        append_to(store, "a", 0, 2)
        with (
            _holding_the_append_lock(postgres_url, schema) as holder,
            psycopg.connect(postgres_url, autocommit=True, options=options) as conn,
        ):
            conn.execute("SET deadlock_timeout = '3s'")  # once the others all wait
            guess = PositionGuess()
            guess.committed(2)  # true when the numbered statement takes its snapshot
            appended: list[int] = []
            answers = AnswerWait(SPIN_US)
            c = [StreamAppend("c", 0, events_for("c", 1, 2))]
            channel = f"riverbed_events_{schema}"
            numbered = threading.Thread(
                target=lambda: appended.append(
                    libpq_append.append(conn, c, channel, guess, answers)
                )
            )
            numbered.start()
            MEANWHILE[meanwhile](postgres_url, holder, schema)
            numbered.join(30)
            assert appended == [7]
            assert guess.take() is None  # stale: the next appends do not guess
        _aabbbcc(store)
    finally:
        store.close()


@pytest.mark.parametrize("meanwhile", MEANWHILE)
def test_a_numbered_async_postgresql_append_goes_again_when_it_could_not_insert(
    postgres_url: str, meanwhile: str, caplog: pytest.LogCaptureFixture
) -> None:
    schema = f"a{meanwhile}_{uuid.uuid4().hex[:8]}"
    url = f"{postgres_url}?schema={schema}"
    other = connect_store(url)
    # The store's connections look for deadlocks after 3 s, once the others all wait: a role of
    # its own sets that (the URL takes no server settings).
    role = f"looks_early_{uuid.uuid4().hex[:8]}"
    user = postgres_url.split("//", 1)[1].split("@", 1)[0]
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} SUPERUSER LOGIN")
        admin.execute(f"ALTER ROLE {role} SET deadlock_timeout = '3s'")

    async def main() -> None:
        store = await connect_async_store(url.replace(f"//{user}@", f"//{role}@", 1))
        try:
            assert await store.append([StreamAppend("a", 0, events_for("a", 1, 2))]) == 2
            with _holding_the_append_lock(postgres_url, schema) as holder:
                c = [StreamAppend("c", 0, events_for("c", 1, 2))]
                appending = asyncio.create_task(store.append(c))
                await asyncio.to_thread(MEANWHILE[meanwhile], postgres_url, holder, schema)
                assert await asyncio.wait_for(appending, 30) == 7
        finally:
            await store.close()

    try:
        _run_quietly(main, caplog)
        _aabbbcc(other)
    finally:
        other.close()
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"DROP ROLE {role}")


def test_a_postgresql_handler_may_compose_its_sql_with_psycopg(postgres_url: str) -> None:
    store = connect_store(postgres_url)
    try:
        with store.transaction("view") as tx:
            table = sql.Identifier(f"levels_{uuid.uuid4().hex[:8]}_v1")
            tx.execute(sql.SQL("CREATE TABLE {} (sku text PRIMARY KEY, n int)").format(table))
            tx.execute(sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(table), ("a", 1))
            assert tx.execute(sql.SQL("SELECT n FROM {}").format(table)) == [(1,)]
        with pytest.raises(ValueError, match="would end"), store.transaction("view") as tx:
            tx.execute(sql.SQL("/* {} */ COMMIT").format(sql.Identifier("x")))
    finally:
        store.close()


def test_a_handler_may_create_triggers_and_functions_whose_bodies_hold_statements(
    store: EventStore, store_url: str
) -> None:
    table = f"seen_{uuid.uuid4().hex[:8]}"
    if store_url.startswith("sqlite"):
        body = (
            f"CREATE TRIGGER {table}_count AFTER INSERT ON {table} BEGIN "
            f"UPDATE {table} SET n = CASE WHEN n IS NULL THEN 1 ELSE n END; END"
        )
    else:
        body = (
            f"CREATE FUNCTION {table}_two() RETURNS int LANGUAGE sql BEGIN ATOMIC "
            "SELECT 1; SELECT 2; END"
        )
    with store.transaction("view") as tx:
        tx.execute(f"CREATE TABLE {table} (k text, n int)")
        tx.execute(body)  # one statement, whose body has its own ";"
        tx.execute(f"INSERT INTO {table} (k) VALUES ('a')")
        if store_url.startswith("sqlite"):
            assert tx.execute(f"SELECT n FROM {table}") == [(1,)]
        else:
            assert tx.execute(f"SELECT {table}_two()") == [(2,)]


# What schema version 3 made of the documents: jsonb, in the database's collation.
V3_DOCUMENTS = """
CREATE TABLE riverbed_documents (
    collection text NOT NULL, key text NOT NULL, document jsonb NOT NULL,
    PRIMARY KEY (collection, key)
);
INSERT INTO riverbed_documents VALUES ('c', 'b', '{"n": 1}'), ('c', 'B', '{"n": 2}');
"""


def test_a_database_of_a_locales_collation_lists_keys_and_fires_timers_in_code_point_order(
    postgres_server: PostgresServer,
) -> None:
    database = f"icu_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_server.admin_url, autocommit=True) as admin:
        admin.execute(
            f"CREATE DATABASE {database} TEMPLATE template0 LOCALE_PROVIDER icu "
            "ICU_LOCALE 'en-US' LOCALE 'C'"
        )
    url = f"postgresql://riverbed@127.0.0.1:{postgres_server.port}/{database}"
    with psycopg.connect(url, autocommit=True) as conn:  # a version 3 store's documents
        conn.execute(V3_DOCUMENTS)
    store = connect_store(url)
    try:
        keys = ["_x", "a", "A", "b", "é", "item 2", "item-10", "item-9", "z"]
        with store.transaction("view") as tx:
            for key in keys:
                tx.put("c", key, {"key": key})
        assert list(store.documents("c")) == sorted([*keys, "B"])  # as SQLite orders them
        assert store.get_document("c", "B") == {"n": 2}  # the upgrade kept them
        with store.transaction("manager") as tx:
            for key in keys:
                tx.set_timer(key, 1_000, b"")
            # Due together: they fire in the keys' order, as on SQLite.
            assert [timer.key for timer in tx.due_timers(now_ms=1_000)] == sorted(keys)
    finally:
        store.close()


def test_postgresql_batch_rows_are_compressed_with_lz4_from_when_a_store_opens(
    postgres_server: PostgresServer, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A save's row over the size from which the server compresses a value has its records
    compressed with lz4 (the server's default, pglz, cost a 10-event save ~7 us), in a store
    made before too (pglz), from when it opens again; the rows it holds stay as they are. A user
    who does not own the tables opens and appends to the store all the same."""
    schema = f"lz4_{uuid.uuid4().hex[:8]}"
    store_url = f"{postgres_url}?schema={schema}"
    compression = "SELECT position, pg_column_compression(records) FROM riverbed_batches"
    as_older = "ALTER TABLE riverbed_batches ALTER COLUMN records SET COMPRESSION pglz"
    large = b"\xc5\x0b\xb8" + b"abcd" * 750  # 3 kB of a payload that compresses

    def save(store: EventStore, stream: str) -> int:
        return store.append([StreamAppend(stream, 0, [new_event(stream, 1, large)])])

    store = connect_store(store_url)
    try:
        assert save(store, "a") == 1
    finally:
        store.close()
    execute(store_url, as_older)
    store = connect_store(store_url)
    try:
        assert save(store, "b") == 2
        assert [event.data for event in store.read_all()] == [large, large]
    finally:
        store.close()
    assert execute(store_url, compression + " ORDER BY position") == [(1, "lz4"), (2, "lz4")]

    execute(store_url, as_older)
    role = f"user_{uuid.uuid4().hex[:8]}"  # not the tables' owner, nor of its role
    with psycopg.connect(postgres_server.admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
    execute(store_url, f"GRANT USAGE ON SCHEMA {schema} TO {role}")
    execute(store_url, f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA {schema} TO {role}")
    user_url = f"postgresql://{role}@127.0.0.1:{postgres_server.port}/riverbed?schema={schema}"
    with caplog.at_level(logging.INFO, logger="riverbed.events"):
        store = connect_store(user_url)
    try:
        assert save(store, "c") == 3
        assert store.read_stream("c")[0].data == large
    finally:
        store.close()
    assert "records stay compressed with the server's default, not lz4" in caplog.text
    assert "must be owner of table riverbed_batches" in caplog.text
    assert execute(store_url, compression + " WHERE position = 3") == [(3, "pglz")]


@pytest.mark.timeout(30)  # without the limit, the store waits for the reader
def test_a_store_waits_a_moment_only_to_set_lz4_and_opens_if_the_table_stays_in_use(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Setting lz4 waits for the transactions using the table, and every append and read waits
    behind it: a long transaction (a pg_dump) would hold them all up, so it gives up after a
    moment, leaves the rows as they are, and the store opens; the next store to open tries
    again."""
    schema = f"lz4wait_{uuid.uuid4().hex[:8]}"
    store_url = f"{postgres_url}?schema={schema}"
    connect_store(store_url).close()
    execute(store_url, "ALTER TABLE riverbed_batches ALTER COLUMN records SET COMPRESSION pglz")
    with psycopg.connect(postgres_url, options=f"-c search_path={schema}") as reader:
        reader.execute("SELECT count(*) FROM riverbed_batches")  # holds the table till it ends
        with caplog.at_level(logging.INFO, logger="riverbed.events"):
            started = time.monotonic()
            store = connect_store(store_url)
            assert time.monotonic() - started < 5
        try:
            assert append_to(store, "s", 0) == 1
        finally:
            store.close()
    assert "records stay compressed with the server's default, not lz4" in caplog.text
    assert "lock timeout" in caplog.text
    compression = "SELECT attcompression FROM pg_attribute WHERE attname = 'records' "
    compression += "AND attrelid = 'riverbed_batches'::regclass"
    assert execute(store_url, compression) == [("p",)]
    connect_store(store_url).close()  # the next store to open sets it
    assert execute(store_url, compression) == [("l",)]


def test_an_upgrade_a_users_view_blocks_says_what_blocks_it(postgres_url: str) -> None:
    view = "CREATE VIEW totals AS SELECT key, document FROM riverbed_documents"
    schema = older_store(postgres_url, "v3", V3_DOCUMENTS + ";" + view)
    with pytest.raises(EventSourcingError) as raised:
        connect_store(f"{postgres_url}?schema={schema}")
    message = str(raised.value)
    assert "cannot create or upgrade the event store's tables" in message
    assert "to schema version 5" in message and "view" in message
    assert "CREATE privilege" not in message


def test_a_missing_store_is_told_without_creating_it(postgres_url: str, tmp_path: Path) -> None:
    schema = f"absent_{uuid.uuid4().hex[:8]}"
    assert missing_store(f"{postgres_url}?schema={schema}") == (
        f"no event store at {postgres_url} (schema {schema!r} has no riverbed tables)"
    )
    with psycopg.connect(postgres_url) as admin:
        assert admin.execute("SELECT to_regnamespace(%s)", (schema,)).fetchone() == (None,)
    connect_store(f"{postgres_url}?schema={schema}").close()
    assert missing_store(f"{postgres_url}?schema={schema}") is None
    assert "no such file" in (missing_store(f"sqlite:///{tmp_path}/none.db") or "")
    assert not (tmp_path / "none.db").exists()


@pytest.mark.parametrize(
    ("document", "error", "message"),
    [
        ({"n": float("nan")}, ValueError, "is not JSON both stores keep: Out of range float"),
        ({"n": float("inf")}, ValueError, "is not JSON both stores keep: Out of range float"),
        ({"s": "\ud800"}, ValueError, "is not JSON both stores keep: .*surrogates not allowed"),
        ({"s": "a\x00b"}, ValueError, "holds a NUL character, which PostgreSQL's JSON refuses"),
        ({"k\x00": 1}, ValueError, "holds a NUL character"),
        ({1: "int", "1": "str"}, TypeError, r"has a key that is not a str, at \$\[1\]"),
        ({"a": [{"b": {2.5: 1}}]}, TypeError, r"not a str, at \$\['a'\]\[0\]\['b'\]\[2.5\]"),
        ({"d": datetime(2026, 1, 1)}, TypeError, "Object of type datetime is not JSON"),
    ],
)
def test_documents_either_store_refuses_are_refused_by_both_naming_them(
    store: EventStore, document: dict[str, Any], error: type[Exception], message: str
) -> None:
    with (
        pytest.raises(error, match=f"document 'k' of collection 'c'.*{message}"),
        store.transaction("sub") as tx,
    ):
        tx.put("c", "k", document)
    with store.transaction("sub") as tx:
        tx.put("c", "k", {"literal": "a\\u0000b", "é": "ü"})  # a backslash, not a NUL
    assert store.get_document("c", "k") == {"literal": "a\\u0000b", "é": "ü"}
