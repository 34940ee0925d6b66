"""Projections: read models kept up to date from the store's global order, exactly once
(a ``Subscription``: each event's read-model writes commit with the checkpoint).

Read models are documents in collections named per projection version. ``rebuild`` fills a new
version from position 0 beside the live one and switches queries (and running workers) to it once
it has caught up.

A runner re-reads the active version first in each of its transactions (one key lookup per page)
and writes nothing for a version a rebuild switched away from: a page of the old version that
commits after the switch would leave documents in collections the rebuild has dropped. The
switch itself commits in a transaction of the old version's subscriber, so the two take turns:
see ``Projections.rebuild``.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from riverbed.eventsourcing.errors import EventSourcingError, StoreUnavailableError
from riverbed.eventsourcing.records import ParkedEvent
from riverbed.eventsourcing.repository import Envelope
from riverbed.eventsourcing.stores.api import (
    AsyncEventStore,
    Document,
    Transaction,
    check_document_key,
)
from riverbed.eventsourcing.stores.deadlines import deadline
from riverbed.eventsourcing.subscriptions import (
    STOPPED,
    SubscriberStatus,
    Subscription,
    returned,
)
from riverbed.ids import random_id

T = TypeVar("T")

if TYPE_CHECKING:
    from riverbed.eventsourcing.repository import Events

ACTIVE_VERSIONS = "riverbed.projection-versions"
# The last version a rebuild of each projection started.
REBUILT_VERSIONS = "riverbed.rebuilt-versions"
REBUILD_LEASE_MS = 30_000  # renewed after each page
# A query waiting for a projection reads its checkpoint again after a pause that starts short (a
# running projection applies a save within a few milliseconds) and grows to POLL_S.
FIRST_POLL_S = 0.00025
POLL_S = 0.005


class Projection:
    """Subclass with a ``name`` and ``handle(event, tx)``; register with
    ``app.events.projection(MyProjection())``.

    ``tx.put(collection, key, document)``, ``tx.get``, ``tx.delete`` write the read model in the
    same transaction as the checkpoint, in collections of the projection version; a rebuild
    drops the old version's once it has switched. ``tx.execute(sql)`` reaches tables of your
    own, which a rebuild does not know: name them after ``tx.version``."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    on_error: ClassVar[Literal["park", "stop"]] = "park"

    def handle(self, event: Envelope, tx: ReadModel) -> None:
        raise NotImplementedError


class ReadModel:
    """A projection version's view of a subscriber transaction: collections are scoped to it."""

    def __init__(self, tx: Transaction, prefix: str, version: int) -> None:
        self.tx = tx
        self._prefix = prefix
        # The projection version being filled: a rebuild fills the next one beside the live one,
        # so tables of your own named after it (``levels_v{tx.version}``) start empty too.
        self.version = version

    def get(self, collection: str, key: str) -> Document | None:
        return self.tx.get(self._prefix + collection, key)

    def put(self, collection: str, key: str, document: Document) -> None:
        self.tx.put(self._prefix + collection, key, document)

    def delete(self, collection: str, key: str) -> None:
        self.tx.delete(self._prefix + collection, key)

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Your own SQL in the projection's transaction, in the store's dialect: ``?``
        placeholders on SQLite, ``%s`` on PostgreSQL. Rows, or [] for a statement without."""
        return self.tx.execute(sql, params)


def prefix(name: str, version: int) -> str:
    return f"{name}@v{version}/"


def parked_label(name: str, version: int) -> str:
    """What a projection version's parked events are filed under: a rebuild's version parks
    afresh, and the old version's entries go with it."""
    return f"{name}@v{version}"


def subscriber(name: str, version: int) -> str:
    return f"projection:{name}@v{version}"


def recorded_version(document: Document | None, projection: Projection) -> int:
    """The active version that ``projection``'s ACTIVE_VERSIONS document records: the class's
    own until a rebuild switches."""
    return projection.version if document is None else int(document["version"])


class ProjectionRunner(Subscription):
    """Runs one version of a projection."""

    kind = "projection"
    version: int

    def __init__(
        self,
        events: Events,
        projection: Projection,
        version: int | None = None,
        *,
        rebuild_lease: tuple[str, str] | None = None,
    ) -> None:
        """``version``: the one to run (default: the class's). A runner switches to the active
        version whenever it finds that a rebuild replaced its own, except a rebuild's, which
        fills a version that is not active yet, holding the rebuild's lease (``rebuild_lease``:
        its name and owner)."""
        self.projection = projection
        self.on_error = projection.on_error
        self._rebuild_lease = rebuild_lease
        version = version or projection.version
        name = projection.name
        super().__init__(events, subscriber(name, version), parked_label(name, version))
        self._use(version)

    def _use(self, version: int) -> None:
        self.version = version
        self.name = subscriber(self.projection.name, version)
        self.label = parked_label(self.projection.name, version)
        self._prefix = prefix(self.projection.name, version)

    def handle(self, event: Envelope, tx: Transaction) -> None:
        handler: Callable[..., object] = self.projection.handle  # maybe async, decorated
        returned(handler(event, ReadModel(tx, self._prefix, self.version)), handler)

    def parked_labels(self) -> list[str]:
        # Before parked events were filed per version, they were filed under the bare name.
        return [self.label, self.projection.name]

    @property
    def registered_name(self) -> str:
        return self.projection.name

    def can_be_replaced(self) -> bool:
        return self._rebuild_lease is None  # a rebuild's own runner has no successor

    def replaced(self, tx: Transaction) -> bool:
        if self._rebuild_lease is not None:
            self.hold_lease(tx)
            return False
        # Read inside the page's transaction, after it took the subscriber's lock, so a switch
        # that committed before is seen, and one that had not yet waits for this page to end.
        active = recorded_version(tx.get(ACTIVE_VERSIONS, self.projection.name), self.projection)
        if active == self.version:
            return False
        self._use(active)
        return True

    def hold_lease(self, tx: Transaction) -> None:
        """Renew the rebuild's lease first in its transaction, which then holds it (the lease's
        row on PostgreSQL, the write lock on SQLite): a rebuild that lost its lease, frozen
        past it, writes nothing once it wakes, whoever rebuilds now."""
        assert self._rebuild_lease is not None
        lease, owner = self._rebuild_lease
        if not tx.renew_lease(lease, owner, REBUILD_LEASE_MS):
            raise EventSourcingError(
                f"the rebuild of projection {self.projection.name!r} lost its lease (it was "
                f"held up over {REBUILD_LEASE_MS // 1000} s), and another rebuild may run: this "
                "one stops, writing nothing more"
            )


class Projections:
    """The projections of an app (``app.events.projections``): register, run, query, rebuild."""

    def __init__(self, events: Events) -> None:
        self.events = events
        self.registered: dict[str, Projection] = {}

    def add(self, projection: Projection) -> Projection:
        name = getattr(projection, "name", "")
        if not name:
            raise EventSourcingError(f"{type(projection).__name__} needs a name = '...'")
        if name in self.registered:
            raise EventSourcingError(f"a projection named {name!r} is already registered")
        self.registered[name] = projection
        return projection

    def named(self, name: str) -> Projection:
        """The projection registered as ``name``; an error naming the registered ones if none."""
        projection = self.registered.get(name)
        if projection is None:
            if name in getattr(self.events, "process_managers", {}):
                raise EventSourcingError(
                    f"{name!r} is a process manager, not a projection: a manager cannot be "
                    "rebuilt or queried (its commands would be issued again)"
                )
            known = ", ".join(sorted(self.registered)) or "none"
            raise EventSourcingError(f"no projection named {name!r}; registered: {known}")
        return projection

    def active_version(self, name: str) -> int:
        document = self.events.store.get_document(ACTIVE_VERSIONS, name)
        return recorded_version(document, self.named(name))

    def runner(self, name: str) -> ProjectionRunner:
        return ProjectionRunner(self.events, self.named(name), self.active_version(name))

    def status(self, name: str) -> SubscriberStatus:
        """The active version, how far it got, how far behind the store it is, what it parked."""
        return self.runner(name).status()

    def parked(self, name: str) -> list[ParkedEvent]:
        """The events the active version of projection ``name`` could not apply, in position
        order, with the errors."""
        return self.runner(name).parked()

    def retry(self, name: str, position: int) -> ParkedEvent | None:
        """Apply the event parked at ``position`` again, now (after the events that followed
        it), and forget it once applied; if it fails again it stays parked with the new error,
        which is returned (``NotParkedError`` if nothing is parked there). For a fixed handler
        whose events do not depend on their order; otherwise ``rebuild``."""
        return self.runner(name).claimed().retry(position)

    def unpark(self, name: str, position: int) -> bool:
        """Forget a parked event: the projection goes on without it (a rebuild applies every
        event again, parked ones included). False if ``position`` was not parked."""
        return self.runner(name).claimed().unpark(position)

    def get(
        self,
        name: str,
        collection: str,
        key: str,
        *,
        wait_for: int = 0,
        timeout: float | None = 10.0,
    ) -> Document | None:
        """A document of the projection's read model; ``wait_for``: a position a save returned,
        to read your own writes (waits until the projection has applied it)."""
        check_document_key(collection, key)
        store = self.events.store
        return self._query(name, wait_for, timeout,
                           lambda read: store.get_document(read + collection, key))  # fmt: skip

    def all(self, name: str, collection: str, *, wait_for: int = 0, timeout: float | None = 10.0
            ) -> dict[str, Document]:  # fmt: skip
        check_document_key(collection, "")
        store = self.events.store
        return self._query(name, wait_for, timeout, lambda read: store.documents(read + collection))

    def _query(
        self, name: str, wait_for: int, timeout: float | None, read: Callable[[str], T]
    ) -> T:
        """``read(prefix)`` of the active version's collections, once the projection has
        applied ``wait_for`` (if given). A rebuild's switch makes a new version active and drops
        the old one's collections at once: a read that came between the two is made again."""
        if wait_for:
            self.wait_for(name, wait_for, timeout)
        version = self.active_version(name)
        while True:
            result = read(prefix(name, version))
            version, before = self.active_version(name), version
            if version == before:
                return result

    def wait_for(self, name: str, position: int, timeout: float | None = 10.0) -> None:
        """Block until projection ``name`` has applied ``position``; ``TimeoutError`` if not."""
        _check_wait_for(position)
        store = self.events.store
        at = _deadline(timeout)
        pauses = _pauses()
        while True:
            try:
                with deadline(at):
                    # The active version is read again each time: a rebuild may switch.
                    sub = subscriber(name, self.active_version(name))
                    checkpoint = store.checkpoint(sub)
                    if checkpoint >= position:
                        return
                    stopped = store.get_document(STOPPED, sub)
                    _check_not_stopped(name, position, checkpoint, stopped)
                    if store.holds_write_lock():
                        raise EventSourcingError(
                            f"cannot wait for projection {name!r} to reach position {position} "
                            "inside a transaction of the SQLite event store (a handler's, say): "
                            "it cannot commit while this thread holds the store's only write "
                            "lock; read without wait_for there"
                        )
                    if time.monotonic() > at:
                        raise _not_reached(name, position, timeout, store.last_position())
            except StoreUnavailableError as error:
                _unreachable_until(at, name, position, timeout, error)
            time.sleep(next(pauses))

    # The queries for async code: the same answers, waiting without blocking the event loop.

    async def get_async(
        self,
        name: str,
        collection: str,
        key: str,
        *,
        wait_for: int = 0,
        timeout: float | None = 10.0,
    ) -> Document | None:
        """``get`` for async code."""
        check_document_key(collection, key)
        store = await self.events.async_store()
        return await self._query_async(
            store, name, wait_for, timeout, lambda read: store.get_document(read + collection, key)
        )

    async def all_async(self, name: str, collection: str, *, wait_for: int = 0,
                        timeout: float | None = 10.0) -> dict[str, Document]:  # fmt: skip
        """``all`` for async code."""
        check_document_key(collection, "")
        store = await self.events.async_store()
        return await self._query_async(
            store, name, wait_for, timeout, lambda read: store.documents(read + collection)
        )

    async def wait_for_async(self, name: str, position: int, timeout: float | None = 10.0) -> None:
        """``wait_for`` for async code."""
        _check_wait_for(position)
        store = await self.events.async_store()
        at = _deadline(timeout)
        pauses = _pauses()
        while True:
            try:
                with deadline(at):
                    sub = subscriber(name, await self._active_version_async(store, name))
                    checkpoint = await store.checkpoint(sub)
                    if checkpoint >= position:
                        return
                    stopped = await store.get_document(STOPPED, sub)
                    _check_not_stopped(name, position, checkpoint, stopped)
                    if time.monotonic() > at:
                        raise _not_reached(name, position, timeout, await store.last_position())
            except StoreUnavailableError as error:
                _unreachable_until(at, name, position, timeout, error)
            await asyncio.sleep(next(pauses))

    async def _query_async(
        self,
        store: AsyncEventStore,
        name: str,
        wait_for: int,
        timeout: float | None,
        read: Callable[[str], Awaitable[T]],
    ) -> T:
        """``_query`` for async code."""
        if wait_for:
            await self.wait_for_async(name, wait_for, timeout)
        version = await self._active_version_async(store, name)
        while True:
            result = await read(prefix(name, version))
            version, before = await self._active_version_async(store, name), version
            if version == before:
                return result

    async def _active_version_async(self, store: AsyncEventStore, name: str) -> int:
        document = await store.get_document(ACTIVE_VERSIONS, name)
        return recorded_version(document, self.named(name))

    def rebuild(self, name: str, stop: threading.Event | None = None) -> int:
        """Fill a new version of the projection from position 0 beside the live one; once it
        has caught up with the store, switch queries (and running workers) to it and drop the
        old version's collections. Returns the new version. One rebuild of a projection runs at
        a time (a lease in the store); each takes a version number never used before, so the
        tables a handler makes for ``tx.version`` start empty even after an interrupted one."""
        projection = self.named(name)
        store = self.events.store
        lease, owner = f"rebuild:{name}", random_id()
        if not store.acquire_lease(lease, owner, REBUILD_LEASE_MS):
            raise EventSourcingError(
                f"projection {name!r} is being rebuilt elsewhere; wait for that rebuild to end "
                f"(or, if its process died, {REBUILD_LEASE_MS // 1000} s for its lease to run out)"
            )

        def renew() -> None:
            if not store.acquire_lease(lease, owner, REBUILD_LEASE_MS):
                raise EventSourcingError(f"the rebuild of projection {name!r} lost its lease")

        try:
            # Read under the lease: a rebuild that switched just before it was taken made
            # another version active, and one read sooner would be forgotten as interrupted.
            old = self.runner(name).claimed().version
            new = self._new_version(projection, old)
            runner = ProjectionRunner(self.events, projection, new, rebuild_lease=(lease, owner))
            while stop is None or not stop.is_set():
                runner.catch_up(renew)
                if runner.stopped_on is not None:  # on_error = "stop": it will not catch up
                    failed = runner.stopped_on
                    raise EventSourcingError(
                        f"the rebuild of projection {name!r} stopped at position "
                        f"{failed.position} ({failed.type}), and version {old} stays active: "
                        f"{failed.error.splitlines()[0]}"
                    )
                if self._switched(projection, old, runner):
                    return new
                renew()
            raise EventSourcingError(f"the rebuild of projection {name!r} was stopped")
        finally:
            store.release_lease(lease, owner)

    def _new_version(self, projection: Projection, old: int) -> int:
        """A version number no rebuild used before; what interrupted rebuilds left of theirs
        (checkpoints, collections, parked events) is forgotten: the lease says none runs."""
        store = self.events.store
        started = store.get_document(REBUILT_VERSIONS, projection.name)
        last = max(old, 0 if started is None else int(started["version"]))
        for interrupted in range(old + 1, last + 1):
            self._forget(projection, interrupted)
        with store.transaction(REBUILT_VERSIONS) as tx:
            tx.put(REBUILT_VERSIONS, projection.name, {"version": last + 1})
        self._forget(projection, last + 1)  # left by a release that used numbers again
        return last + 1

    def _switched(self, projection: Projection, old: int, runner: ProjectionRunner) -> bool:
        """Switch to the runner's version if it has caught up with the store; whether it did.
        The switch takes turns with the old version's pages: it commits in a transaction of
        that version's subscriber (its advisory lock on PostgreSQL, the write lock on SQLite).
        A page in flight commits first and the drop below deletes its writes too (under READ
        COMMITTED each statement sees what committed before it started); a later page reads the
        new version once the switch commits and writes nothing."""
        name = projection.name
        with self.events.store.transaction(subscriber(name, old)) as tx:
            runner.hold_lease(tx)
            # Caught up when nothing is left to read inside the switching transaction.
            if self.events.store.read_all(runner.checkpoint, 1):
                return False
            tx.put(ACTIVE_VERSIONS, name, {"version": runner.version})
            tx.drop_prefixed(prefix(name, old))  # declared in collections or not
        # The old version's parked events are out of sight now; they go too.
        for parked in ProjectionRunner(self.events, projection, old).parked():
            self.events.store.unpark(parked.projection, parked.position)
        return True

    def _forget(self, projection: Projection, version: int) -> None:
        """Forget what a rebuild stopped before its switch left of ``version``: its checkpoint,
        collections and parked events."""
        name = projection.name
        store = self.events.store
        with store.transaction(subscriber(name, version)) as tx:
            tx.set_checkpoint(0)
            tx.drop_prefixed(prefix(name, version))
        for parked in store.parked(parked_label(name, version)):
            store.unpark(parked.projection, parked.position)


def _pauses() -> Iterator[float]:
    pause = FIRST_POLL_S
    while True:
        yield pause
        pause = min(pause * 1.5, POLL_S)


def _check_not_stopped(name: str, position: int, checkpoint: int, stopped: Document | None) -> None:
    """Raise if the projection stopped (``on_error = "stop"``) before ``position``: waiting
    would only run out its timeout."""
    if stopped is not None and checkpoint < stopped["position"] <= position:
        error = str(stopped["error"]).partition("\n")[0]
        raise EventSourcingError(
            f"projection {name!r} stopped at position {stopped['position']} (on_error = "
            f"'stop') and will not reach {position}: {error}; fix it and restart the worker"
        )


def _deadline(timeout: object) -> float:
    """When a wait of ``timeout`` seconds (None: no limit) from now ends."""
    if timeout is None:
        return math.inf
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or math.isnan(timeout):
        raise TypeError(
            f"timeout={timeout!r}: give the seconds to wait (a number), or None to wait as "
            "long as it takes"
        )
    return time.monotonic() + timeout


def _unreachable_until(
    at: float, name: str, position: int, timeout: float | None, error: StoreUnavailableError
) -> None:
    """A wait that met an outage (or a pool with no connection free) tries again until its
    deadline, then raises ``TimeoutError`` saying why."""
    if time.monotonic() >= at:
        raise TimeoutError(
            f"projection {name!r} was not seen to reach position {position} within {timeout} s: "
            f"{error}"
        ) from error


def _not_reached(name: str, position: int, timeout: float | None, head: int) -> TimeoutError:
    if position > head:
        return TimeoutError(
            f"projection {name!r} has not reached position {position} within {timeout} s: the "
            f"store holds events up to position {head} only; wait for a position a save to "
            "this store returned"
        )
    return TimeoutError(
        f"projection {name!r} has not reached position {position} within {timeout} s;"
        " is a worker running it?"
    )


def _check_wait_for(position: object) -> None:
    if type(position) is not int:
        raise TypeError(
            f"wait_for={position!r}: give the position (an int) a save returned, to read "
            "your own writes"
        )
