"""``app.events``: save and load aggregates, run commands, read what was stored.

A save appends every pending event of the aggregates given, atomically, each stream checked
against the version it was loaded at. Events carry metadata: a correlation id (the id of the
command or event that started the chain) and a causation id (what directly caused them), set
from the command or event being handled (``causing``), plus the user's own.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import msgspec

from riverbed.eventsourcing.aggregate import (
    Aggregate,
    Recorded,
    check_id,
    check_key,
)
from riverbed.eventsourcing.codec import (
    ENCODER,
    decode,
    registry,
    sealed,
)
from riverbed.eventsourcing.errors import (
    AggregateNotFoundError,
    ConcurrencyError,
    EventSourcingError,
    refuse_awaitable,
)
from riverbed.eventsourcing.records import (
    NewEvent,
    StoredEvent,
    StreamAppend,
    metadata_of,
)
from riverbed.eventsourcing.snapshots import (
    from_snapshot,
    loaded_with,
    mark_saved,
    never_failing,
    seal_snapshot,
    sealed_with,
    take_snapshot,
)
from riverbed.eventsourcing.stores import (
    AsyncEventStore,
    EventStore,
    connect_async_store,
    connect_store,
    missing_store,
    runs_in_threads,
)
from riverbed.eventsourcing.stores.threaded import ThreadedAsyncStore
from riverbed.eventsourcing.turns import Turns
from riverbed.ids import random_ids

A = TypeVar("A", bound=Aggregate)
log = logging.getLogger("riverbed.events")

MAX_VERSION = 2**62  # above any stream's version; both stores take it
# An event's payload and metadata: SQLite takes a value of up to 1e9 bytes (the event's record),
# PostgreSQL a message (a statement's parameters) of up to 1 GiB.
MAX_EVENT_BYTES = 900_000_000
RETRY_PAUSE_S = 0.01  # the bound of the first pause before a command's retry
# For commands of several processes racing for one aggregate (one process's take turns,
# turns.py): shorter pauses (2 ms, up to 0.1 s) left a third of 30 failing after 5 retries.
RETRY_PAUSE_MAX_S = 0.5
# Metadata keys a save sets from the cause in force (``causing``).
CAUSE_KEYS = frozenset({"correlation_id", "causation_id"})
# The metadata key naming the app that saved an event: subscribers of apps sharing a store
# leave alone the events of another app whose classes their process does not import.
APP_KEY = "riverbed_app"  # riverbed's own: a save's metadata may have an "app" of its own


class Cause(msgspec.Struct, frozen=True):
    """What the events saved now are a consequence of."""

    correlation_id: str
    causation_id: str


_cause: contextvars.ContextVar[Cause | None] = contextvars.ContextVar(
    "riverbed_event_cause", default=None
)


@contextmanager
def causing(cause_id: str, correlation_id: str | None = None) -> Iterator[None]:
    """Events saved in this block are caused by ``cause_id`` (a command's or an event's id)
    and belong to ``correlation_id`` (default: the one already in force, else ``cause_id``)."""
    check_key(cause_id, "a cause id", "causing")
    if correlation_id is not None:
        check_key(correlation_id, "a correlation id", "causing")
    current = _cause.get()
    correlation = correlation_id or (current.correlation_id if current else cause_id)
    token = _cause.set(Cause(correlation, cause_id))
    try:
        yield
    finally:
        _cause.reset(token)


class Envelope(msgspec.Struct, frozen=True):
    """A stored event, decoded: the typed event with where and when it was stored."""

    event: Any
    type: str
    id: str
    stream: str
    version: int
    position: int
    timestamp_ms: int
    metadata: dict[str, Any]

    @property
    def correlation_id(self) -> str:
        return str(self.metadata.get("correlation_id", self.id))


class Events:
    """The event store of one app (``app.events``), at ``url`` (else ``$RIVERBED_EVENTS_URL``,
    else ``sqlite:///.riverbed/events.db``), connected on first use."""

    def __init__(self, app_name: str, url: str | None = None) -> None:
        self.app_name = app_name
        self._url = url
        self._store: EventStore | None = None
        # An async store's connections belong to the event loop that opened them; each is kept
        # with the URL it was opened for (use_url changes it).
        self._async_stores: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[str | None, AsyncEventStore]
        ] = weakref.WeakKeyDictionary()
        self._async_opening: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[str | None, asyncio.Task[AsyncEventStore]]
        ] = weakref.WeakKeyDictionary()
        self._retired_async_stores: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, list[AsyncEventStore]
        ] = weakref.WeakKeyDictionary()
        self._threaded_store: ThreadedAsyncStore | None = None  # over self.store, any loop's
        self._connecting = threading.Lock()
        self._turns = Turns()  # commands on one aggregate in this process take turns
        _all_events.add(self)

    def _forget_inherited_stores(self) -> None:
        """In a forked child: the stores' connections are the parent's (closing them would end
        its sessions too, and a pool's threads did not come along), so they are kept unused,
        and the child connects anew."""
        _inherited.append((self._store, self._threaded_store, dict(self._async_stores),
                           dict(self._retired_async_stores)))  # fmt: skip
        self._store = self._threaded_store = None
        self._async_stores = weakref.WeakKeyDictionary()
        self._async_opening = weakref.WeakKeyDictionary()
        self._retired_async_stores = weakref.WeakKeyDictionary()
        self._connecting = threading.Lock()
        self._turns = Turns()  # the parent's threads held some of its locks at the fork

    @property
    def store(self) -> EventStore:
        if self._store is None:
            with self._connecting:
                if self._store is None:
                    self._store = connect_store(self._url)
        return self._store

    def missing(self) -> str | None:
        """Why there is no event store at the URL yet (a save or a worker creates it), or None
        if there is one; creates nothing."""
        return missing_store(self._url) if self._store is None else None

    def use_url(self, url: str | None) -> None:
        self.close()
        self._url = url

    def close(self) -> None:
        self._threaded_store = None
        if self._store is not None:
            self._store.close()
            self._store = None

    # Saving

    def save(self, *aggregates: Aggregate, metadata: dict[str, Any] | None = None) -> int:
        """Append the aggregates' pending events atomically; returns the global position of the
        last one (for read-your-writes: ``projection.wait_for(position)``). Raises
        ``ConcurrencyError`` if another writer saved one of them first."""
        store = self.store
        sealing: dict[str, bytes | None] = {}  # the key each stream's personal fields took

        def stream_key(stream: str, create: bool) -> bytes | None:
            sealing[stream] = key = store.stream_key(stream, create)
            return key

        appends = self.appends(aggregates, metadata, stream_key)  # checks the aggregates
        recorded = [len(aggregate.pending) for aggregate in aggregates]
        position = store.append(appends) if appends else store.last_position()
        if sealing:
            sealed_with(aggregates, sealing)
        for aggregate in mark_saved(aggregates, recorded):
            with never_failing(aggregate):
                snapshot = take_snapshot(aggregate)
                if snapshot is not None:
                    key = store.stream_key(aggregate.id, False)
                    snapshot = seal_snapshot(snapshot, aggregate, key, aggregate._decrypted_with)
                if snapshot is not None:
                    store.save_snapshot(snapshot)
        return position

    async def save_async(
        self, *aggregates: Aggregate, metadata: dict[str, Any] | None = None
    ) -> int:
        _check_aggregates(aggregates)
        store = await self.async_store()
        # What is saved: events recorded meanwhile (by another task) wait for the next save.
        saving = [list(aggregate.pending) for aggregate in aggregates]
        _check_metadata(metadata)  # before a key is made for nothing
        keys: dict[str, bytes | None] = {}
        for aggregate, events in zip(aggregates, saving, strict=True):
            if any(recorded.type.personal for recorded in events):
                keys[aggregate.id] = await store.stream_key(aggregate.id, True)
        appends = self.appends(aggregates, metadata, lambda stream, create: keys[stream], saving)
        position = await store.append(appends) if appends else await store.last_position()
        sealed_with(aggregates, keys)
        # Taken before the next await: another task may record on an aggregate meanwhile.
        snapshots = []
        for aggregate in mark_saved(aggregates, [len(events) for events in saving]):
            with never_failing(aggregate):
                snapshot = take_snapshot(aggregate)
                if snapshot is not None:
                    snapshots.append((aggregate, aggregate._decrypted_with, snapshot))
        for aggregate, decrypted_with, snapshot in snapshots:
            with never_failing(aggregate):
                # Sealed with the stream's key, which events saved earlier may have made.
                if aggregate.id not in keys:
                    keys[aggregate.id] = await store.stream_key(aggregate.id, False)
                sealed = seal_snapshot(snapshot, aggregate, keys[aggregate.id], decrypted_with)
                if sealed is not None:
                    await store.save_snapshot(sealed)
        return position

    def appends(
        self,
        aggregates: Sequence[Aggregate],
        metadata: dict[str, Any] | None,
        stream_key: Callable[[str, bool], bytes | None] | None = None,
        saving: Sequence[Sequence[Recorded]] | None = None,
        timestamp_ms: int | None = None,
    ) -> list[StreamAppend]:
        """The appends that save the aggregates' pending events (or ``saving``, each one's
        events to save), with their metadata, stamped now (or at ``timestamp_ms``)."""
        if saving is None:  # else the caller took (and checked) them
            _check_aggregates(aggregates)
            saving = [aggregate.pending for aggregate in aggregates]
        now = time.time_ns() // 1_000_000 if timestamp_ms is None else timestamp_ms
        event_ids = random_ids(sum(map(len, saving)))  # in one call
        ids = iter(event_ids)
        meta: dict[str, Any] = {}
        if metadata is not None:
            _check_metadata(metadata)
            meta.update(metadata)
        meta[APP_KEY] = self.app_name
        cause = _cause.get()
        if cause is None:  # the events of one save correlate with its first
            meta["correlation_id"] = event_ids[0] if event_ids else ""
        else:
            meta["correlation_id"] = cause.correlation_id
            if cause.causation_id:
                meta["causation_id"] = cause.causation_id
        encoded_meta = ENCODER.encode(meta)  # the same for every event of one save
        room = MAX_EVENT_BYTES - len(encoded_meta)  # for each event's payload
        appends = []
        saved: set[str] = set()
        for aggregate, pending in zip(aggregates, saving, strict=True):
            if not pending:
                continue
            if aggregate.id in saved:
                raise EventSourcingError(
                    f"save() was given aggregate {aggregate.id!r} twice: give each one once"
                )
            saved.add(aggregate.id)
            stream = aggregate.id
            check_id(stream, "save")
            events = []
            for recorded, event_id in zip(pending, ids, strict=False):
                entry = recorded.type
                data = recorded.plain
                if entry.personal:
                    keys = stream_key or self.store.stream_key
                    data = sealed(entry, _key_of(stream, keys), data)
                if len(data) > room:
                    raise EventSourcingError(
                        f"event {entry.name} of {stream!r} (version {recorded.version}) is "
                        f"{len(data) + len(encoded_meta):,} bytes encoded, over the "
                        f"{MAX_EVENT_BYTES:,} an event store takes; keep large data elsewhere "
                        "(a blob store) and a reference to it in the event"
                    )
                events.append(
                    NewEvent(
                        event_id,
                        stream,
                        recorded.version,
                        entry.name,
                        entry.version,
                        data,
                        encoded_meta,
                        now,
                    )
                )
            appends.append(StreamAppend(aggregate.id, pending[0].version - 1, events))
        return appends

    # Loading

    def get(self, cls: type[A], aggregate_id: str, *, version: int | None = None) -> A:
        """The aggregate as of its latest event (or as of ``version``: time travel), from its
        latest snapshot on. Raises ``AggregateNotFoundError`` when it has no events."""
        return self.load(cls, aggregate_id, version, self.store.read_stream)

    def load(
        self,
        cls: type[A],
        aggregate_id: str,
        version: int | None,
        read_stream: Callable[[str, int, int | None], list[StoredEvent]],
    ) -> A:
        """``get``, reading the stream with ``read_stream`` (a transaction's, to see its own
        appends)."""
        _check_class(cls)
        check_id(aggregate_id, f"get({cls.__name__}, id)")
        version = _checked_version(version)
        store = self.store
        used: list[bytes] = []  # the stream's key, once the state needed it

        def stream_key(stream: str, create: bool) -> bytes | None:
            key = store.stream_key(stream, create)
            if key is not None:
                used.append(key)
            return key

        snapshot = store.load_snapshot(aggregate_id, version) if cls.snapshot_every else None
        aggregate = None
        if snapshot is not None:
            aggregate = from_snapshot(cls, snapshot, stream_key(aggregate_id, False))
        start = aggregate.version + 1 if aggregate is not None else 1
        events = read_stream(aggregate_id, start, version)
        loaded = self._replayed(cls, aggregate_id, aggregate, events, stream_key)
        loaded._decrypted_with = loaded_with(used)
        return loaded

    async def get_async(self, cls: type[A], aggregate_id: str, *, version: int | None = None) -> A:
        _check_class(cls)
        check_id(aggregate_id, f"get_async({cls.__name__}, id)")
        version = _checked_version(version)
        store = await self.async_store()
        snapshot = await store.load_snapshot(aggregate_id, version) if cls.snapshot_every else None
        start = snapshot.version + 1 if snapshot is not None else 1
        events = await store.read_stream(aggregate_id, start, version)
        # Read after the events: the key a personal event among them made is committed by now.
        key = await store.stream_key(aggregate_id, False)
        aggregate = None
        if snapshot is not None:
            aggregate = from_snapshot(cls, snapshot, key)
            if aggregate is None:  # replayed from the first event instead
                events = await store.read_stream(aggregate_id, 1, snapshot.version) + events

        def stream_key(stream: str, create: bool) -> bytes | None:
            return key

        loaded = self._replayed(cls, aggregate_id, aggregate, events, stream_key)
        if key is not None:
            loaded._decrypted_with = key
        return loaded

    def _replayed(
        self,
        cls: type[A],
        aggregate_id: str,
        aggregate: A | None,
        events: list[StoredEvent],
        stream_key: Callable[[str, bool], bytes | None],
    ) -> A:
        if aggregate is None:
            if not events:
                raise AggregateNotFoundError(
                    f"no {cls.__name__} with id {aggregate_id!r}: its stream has no events"
                )
            aggregate = cls.__new__(cls)
            aggregate._begin(aggregate_id)
        for stored in events:
            entry = registry.named(stored.type, stored.position)
            if not entry.recorded_by(cls):
                raise AggregateNotFoundError(
                    f"no {cls.__name__} with id {aggregate_id!r}: its stream holds events of "
                    f"another aggregate class ({stored.type} at position {stored.position})"
                )
            event = decode(stored.data, stored.schema, entry, _key_of(stored.stream, stream_key),
                           f"at position {stored.position}")  # fmt: skip
            try:
                aggregate._replay(event, entry, stored.version)
            except Exception as error:
                error.add_note(
                    f"while loading {cls.__name__} {aggregate_id!r}: applying {stored.type} "
                    f"(version {stored.version}, at position {stored.position})"
                )
                raise
        return aggregate

    # Commands

    def handle(
        self,
        cls: type[A],
        aggregate_id: str,
        decide: Callable[[A], object],
        *,
        retries: int = 5,
        command_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> tuple[A, int]:
        """Load, decide, save; on a concurrent save, load again and retry (up to ``retries``
        times, each after a random pause that grows with the attempts). ``decide`` calls the
        aggregate's command methods (or raises to refuse). Returns the aggregate and the saved
        position."""
        _check_retries(retries)
        with causing(random_ids(1)[0] if command_id is None else command_id):
            for attempt in range(retries + 1):
                with self._turns.turn(aggregate_id):
                    aggregate = self.get(cls, aggregate_id)
                    refuse_awaitable(
                        decide(aggregate),
                        f"decide {decide!r} is async: await app.events.handle_async(...) instead",
                    )
                    try:
                        return aggregate, self.save(aggregate, metadata=metadata)
                    except ConcurrencyError:
                        if attempt == retries:
                            raise
                time.sleep(_retry_pause(attempt))
        raise AssertionError("unreachable")

    async def handle_async(
        self,
        cls: type[A],
        aggregate_id: str,
        decide: Callable[[A], Awaitable[None] | None],
        *,
        retries: int = 5,
        command_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> tuple[A, int]:
        """``handle`` for async code; ``decide`` may be a coroutine function."""
        _check_retries(retries)
        with causing(random_ids(1)[0] if command_id is None else command_id):
            for attempt in range(retries + 1):
                async with self._turns.turn_async(aggregate_id):
                    aggregate = await self.get_async(cls, aggregate_id)
                    decided = decide(aggregate)
                    if inspect.isawaitable(decided):
                        await decided
                    try:
                        return aggregate, await self.save_async(aggregate, metadata=metadata)
                    except ConcurrencyError:
                        if attempt == retries:
                            raise
                await asyncio.sleep(_retry_pause(attempt))
        raise AssertionError("unreachable")

    # Reading the store

    def read(self, after: int = 0, limit: int = 1000) -> list[Envelope]:
        """Decoded events in global order after position ``after``."""
        store = self.store
        return [envelope(stored, store.stream_key) for stored in store.read_all(after, limit)]

    def decode(self, stored: StoredEvent) -> Envelope:
        """A stored event as a typed one, such as a relayed record's (``stored_event(record)``,
        or the event an ``Inbox`` hands over): personal fields are decrypted with the stream's
        key in this store, and read as erased once it is deleted."""
        return envelope(stored, self.store.stream_key)

    async def async_store(self) -> AsyncEventStore:
        """The running event loop's store (opened on first use); on SQLite, ``store``'s calls
        run in worker threads, for any loop."""
        if self._threaded_store is not None:
            return self._threaded_store
        if runs_in_threads(self._url):
            self._threaded_store = ThreadedAsyncStore(self.store)
            return self._threaded_store
        loop = asyncio.get_running_loop()
        url, store = self._async_stores.get(loop, (None, None))
        if store is not None and url != self._url:  # opened before use_url
            del self._async_stores[loop]
            await store.close()
            store = None
        if store is not None:
            return store
        opening = self._async_opening.get(loop)
        if opening is None or opening[0] != self._url:
            self._forget_closed_loops()
            task = loop.create_task(self._open_async_store(loop, self._url))
            # Its error is each waiting caller's; with none left, not a "never retrieved" one.
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._async_opening[loop] = opening = (self._url, task)
        # The calls that race to open the loop's store wait for one opening, which a caller's
        # cancellation leaves to finish: its pool, half open, would have leaked.
        return await asyncio.shield(opening[1])

    async def _open_async_store(
        self, loop: asyncio.AbstractEventLoop, url: str | None
    ) -> AsyncEventStore:
        try:
            store = await connect_async_store(url)
        finally:
            if self._async_opening.get(loop, (None, None))[1] is asyncio.current_task():
                del self._async_opening[loop]
        # Opened for a URL use_url has replaced since, or replaced by one opened for the new
        # URL first: it serves the calls that waited for it, and close_async closes it.
        current = self._async_stores.get(loop)
        if current is not None and (url != self._url or current[0] == url):
            self._retired_async_stores.setdefault(loop, []).append(store)
            return store
        if current is not None:
            self._retired_async_stores.setdefault(loop, []).append(current[1])
        self._async_stores[loop] = (url, store)
        return store

    def _forget_closed_loops(self) -> None:
        """Drop the stores of event loops that ended without ``close_async``: they can no
        longer be closed (their loop is gone), and held here, their connections would stay
        open for good; dropped, the garbage collector closes them."""
        for loop in [loop for loop in self._retired_async_stores if loop.is_closed()]:
            del self._retired_async_stores[loop]
        for loop in [loop for loop in self._async_stores if loop.is_closed()]:
            del self._async_stores[loop]
            log.warning("an event loop ended without app.events.close_async(); call it before "
                        "the loop ends to close its connections at once")  # fmt: skip

    async def close_async(self) -> None:
        """Close the running event loop's connections (``close`` closes SQLite's)."""
        loop = asyncio.get_running_loop()
        _, opening = self._async_opening.get(loop, (None, None))
        if opening is not None:  # its store is closed with the rest
            await asyncio.wait([opening])
        _, store = self._async_stores.pop(loop, (None, None))
        for retired in self._retired_async_stores.pop(loop, []):
            await retired.close()
        if store is not None:
            await store.close()


_all_events: weakref.WeakSet[Events] = weakref.WeakSet()
_inherited: list[object] = []  # a forked child's stores of its parent's, never closed


def _after_fork_in_child() -> None:
    for events in list(_all_events):
        events._forget_inherited_stores()


os.register_at_fork(after_in_child=_after_fork_in_child)


def envelope(stored: StoredEvent, stream_key: Callable[[str, bool], bytes | None]) -> Envelope:
    """Decode a stored event. Raises ``UnknownEventTypeError`` or ``EventDecodeError``."""
    entry = registry.named(stored.type, stored.position)
    event = decode(stored.data, stored.schema, entry, _key_of(stored.stream, stream_key),
                   f"at position {stored.position}")  # fmt: skip
    return Envelope(
        event,
        entry.name,  # the current name, for an event stored under an alias too
        stored.id,
        stored.stream,
        stored.version,
        stored.position,
        stored.timestamp_ms,
        metadata_of(stored),
    )


def _retry_pause(attempt: int) -> float:
    """How long a command that lost a race waits before trying again: a random pause whose
    bound doubles with each attempt ("full jitter"), so that writers racing for one aggregate
    spread out instead of colliding again at once."""
    return random.uniform(0, min(RETRY_PAUSE_MAX_S, RETRY_PAUSE_S * 2**attempt))


def _check_class(cls: object) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Aggregate)):
        raise TypeError(f"{cls!r} is not an aggregate class (a riverbed.Aggregate subclass)")


def _checked_version(version: int | None) -> int | None:
    """``version``, checked; one past any stream's end is the end (what a store can hold)."""
    if version is None:
        return None
    if type(version) is not int or version < 1:
        raise ValueError(f"version={version!r}: give a version >= 1 (an aggregate's first is 1)")
    return min(version, MAX_VERSION)


def _check_aggregates(aggregates: Sequence[object]) -> None:
    for aggregate in aggregates:
        if not isinstance(aggregate, Aggregate):
            raise TypeError(f"save() takes aggregates, not {aggregate!r}")


def _check_retries(retries: object) -> None:
    if type(retries) is not int or retries < 0:
        raise ValueError(f"retries={retries!r}: give how many times to retry a conflict, >= 0")


def _check_metadata(metadata: dict[str, Any] | None) -> None:
    """Refuse a save's metadata that is not a str-keyed dict of the caller's own keys, or that
    does not encode."""
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise EventSourcingError(
            f"metadata is a dict of str keys to values, not {type(metadata).__name__}"
        )
    not_text = [key for key in metadata if not isinstance(key, str)]
    if not_text:
        first = not_text[0]
        raise EventSourcingError(
            f"metadata keys are strings, not {type(first).__name__} ({first!r})"
        )
    if APP_KEY in metadata:
        raise EventSourcingError(
            f"metadata {APP_KEY!r} is set by riverbed: the name of the app that saved the event"
        )
    reserved = sorted(CAUSE_KEYS & metadata.keys())
    if reserved:
        raise EventSourcingError(
            f"metadata {reserved[0]!r} is set by riverbed; give the command's id with "
            "handle(..., command_id=), or the ids with "
            "`with riverbed.eventsourcing.causing(cause_id, correlation_id=...)`"
        )
    try:
        ENCODER.encode(metadata)
    except (NotImplementedError, OverflowError, TypeError, ValueError) as error:
        raise EventSourcingError(f"the save's metadata does not encode: {error}") from None


def _key_of(
    stream: str, stream_key: Callable[[str, bool], bytes | None]
) -> Callable[[bool], bytes | None]:
    return lambda create: stream_key(stream, create)
