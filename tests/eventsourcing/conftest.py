"""Event stores for the event-sourcing tests, one per backend: a SQLite file in the test's temp
dir, or a schema of the test's own in the session's PostgreSQL database."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from riverbed.eventsourcing import EventSourcing
from riverbed.eventsourcing.stores import EventStore, connect_store

OpenStore = Callable[[], EventStore]

STORES = ["sqlite", "postgresql"]


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        server: str = request.getfixturevalue("postgres_url")
        return f"{server}?schema=test_{uuid.uuid4().hex[:12]}"
    return f"sqlite:///{tmp_path}/events.db"


@pytest.fixture
def events(store_url: str) -> Iterator[EventSourcing]:
    """An app's ``app.events`` on the test's store."""
    events = EventSourcing("shop", store_url)
    yield events
    events.close()


@pytest.fixture
def open_store(store_url: str) -> Iterator[OpenStore]:
    """``open_store()``: another store on the test's database (as another process would open
    it); all are closed when the test ends."""
    opened: list[EventStore] = []

    def open_store() -> EventStore:
        store = connect_store(store_url)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: OpenStore) -> EventStore:
    return open_store()
