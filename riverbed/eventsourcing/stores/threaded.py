"""An async face for a sync store: each call runs in a worker thread (SQLite's driver is sync)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from riverbed.eventsourcing.records import Snapshot, StoredEvent, StreamAppend
from riverbed.eventsourcing.stores.api import Document, EventStore


class ThreadedAsyncStore:
    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.url = store.url

    async def append(self, appends: Sequence[StreamAppend]) -> int:
        return await asyncio.to_thread(self.store.append, appends)

    async def read_stream(
        self, stream: str, from_version: int = 1, to_version: int | None = None
    ) -> list[StoredEvent]:
        return await asyncio.to_thread(self.store.read_stream, stream, from_version, to_version)

    async def read_all(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        return await asyncio.to_thread(self.store.read_all, after, limit)

    async def last_position(self) -> int:
        return await asyncio.to_thread(self.store.last_position)

    async def load_snapshot(self, stream: str, max_version: int | None = None) -> Snapshot | None:
        return await asyncio.to_thread(self.store.load_snapshot, stream, max_version)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        await asyncio.to_thread(self.store.save_snapshot, snapshot)

    async def stream_key(self, stream: str, create: bool) -> bytes | None:
        return await asyncio.to_thread(self.store.stream_key, stream, create)

    async def wait_for_events(self, after: int, timeout: float) -> bool:
        return await asyncio.to_thread(self.store.wait_for_events, after, timeout)

    async def get_document(self, collection: str, key: str) -> Document | None:
        return await asyncio.to_thread(self.store.get_document, collection, key)

    async def documents(self, collection: str, limit: int | None = None) -> dict[str, Document]:
        return await asyncio.to_thread(self.store.documents, collection, limit)

    async def checkpoint(self, name: str) -> int:
        return await asyncio.to_thread(self.store.checkpoint, name)

    async def close(self) -> None:
        self.store.close()
