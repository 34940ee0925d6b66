"""The event-store contract both stores implement and one conformance suite checks.

An event store keeps streams of events (one per aggregate) in one global order, plus what the
read side needs in the same database, so that it commits with the events or with a checkpoint:
snapshots, per-stream encryption keys (crypto-shredding), projection checkpoints and their
documents (read models), parked events, timers of process managers, an inbox of handled event
ids, and leases that let one of several processes act for a name (the outbox relay's leader).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from riverbed.eventsourcing.records import (
    NewEvent,
    ParkedEvent,
    Snapshot,
    StoredEvent,
    StreamAppend,
    Timer,
)

Document = dict[str, Any]


# JSON's escape of a NUL character: \u0000 after an even number of backslashes (a literal
# backslash is \\ in JSON).
_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def check_document_key(collection: object, key: object) -> None:
    """A read model's collection and key: strings both stores keep (PostgreSQL's text takes no
    NUL characters, and UTF-8 no lone surrogates); ``ValueError`` otherwise."""
    for what, name in (("collection", collection), ("key", key)):
        if not isinstance(name, str):
            raise TypeError(f"a document's {what} is a str, got {name!r}")
        if "\x00" in name or (not name.isascii() and _unencodable(name)):
            raise ValueError(
                f"a document's {what} is a str without NUL characters or lone surrogates, got "
                f"{name!r}"
            )


def _check_lengths(collection: str, key: str) -> None:
    """What a document is written under fits PostgreSQL's index on (collection, key), ~2,700
    bytes at most, and so both stores take it (read back, longer ones written before stay
    readable)."""
    for what, name, limit in (
        ("collection (with the projection's prefix)", collection, MAX_COLLECTION_BYTES),
        ("key", key, MAX_DOCUMENT_KEY_BYTES),
    ):
        if len(name) > limit // 4 and len(name.encode()) > limit:
            raise ValueError(
                f"a document's {what} is at most {limit:,} bytes in UTF-8, got "
                f"{len(name.encode()):,} ({name[:40]!r}...); key a long value (a URL) by a "
                "digest of it, such as hashlib.sha256(url.encode()).hexdigest()"
            )


MAX_DOCUMENT_KEY_BYTES = 1000
# A user's collection of up to 1,000 bytes, and a projection's prefix ("name@v2/").
MAX_COLLECTION_BYTES = 1300


def _unencodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def document_text(collection: str, key: str, document: Document) -> str:
    """``document`` as the JSON text both stores keep; ``ValueError`` (or ``TypeError`` for a
    value JSON has no type for) naming the document for what PostgreSQL's JSON refuses (NaN and
    infinities, NUL characters and lone surrogates) or would not read back as it was (a dict key
    that is not a str)."""
    check_document_key(collection, key)
    _check_lengths(collection, key)
    where = f"document {key!r} of collection {collection!r}"
    try:
        text = json.dumps(document, ensure_ascii=False, allow_nan=False)
        text.encode()
    except ValueError as error:  # NaN, a lone surrogate (UnicodeEncodeError)
        raise ValueError(f"{where} is not JSON both stores keep: {error}") from None
    except TypeError as error:
        raise TypeError(f"{where}: {error}") from None
    if _NUL.search(text):
        raise ValueError(f"{where} holds a NUL character, which PostgreSQL's JSON refuses")
    if (path := _non_str_key(document, "$")) is not None:
        # JSON would make it a string: {1: "a"} would read back as {"1": "a"}.
        raise TypeError(f"{where} has a key that is not a str, at {path}")
    return text


def _non_str_key(value: object, path: str) -> str | None:
    """Where ``value`` holds a dict key that is not a str, if it does. Batch-at-a-time: types
    are gathered in C (``map``), and only containers of containers are walked."""
    if isinstance(value, dict):
        if value and set(map(type, value)) != {str}:
            return next(f"{path}[{key!r}]" for key in value if not isinstance(key, str))
        items: Iterable[tuple[object, object]] = value.items()
        inner: Iterable[object] = value.values()
    elif isinstance(value, list | tuple):
        items, inner = enumerate(value), value
    else:
        return None
    if set(map(type, inner)) <= _SCALARS:
        return None
    for name, item in items:
        if isinstance(item, dict | list | tuple) and (
            found := _non_str_key(item, f"{path}[{name!r}]")
        ):
            return found
    return None


_SCALARS = frozenset({str, int, float, bool, type(None)})


# Transaction control is the store's: a handler's COMMIT or ROLLBACK would end its transaction
# under it (its earlier writes lost or committed without the checkpoint). Empty statements
# before it (";COMMIT") are nothing to either database, nor is a byte order mark to SQLite.
_TRANSACTION_CONTROL = re.compile(
    r"[\s;\ufeff]*(BEGIN|COMMIT|END|ROLLBACK|ABORT|SAVEPOINT|RELEASE|START\s+TRANSACTION|PREPARE\s+TRANSACTION)\b",
    re.IGNORECASE,
)
# Where a comment, or a quoted string or identifier, may start.
_SPECIAL = re.compile(r"--|/\*|[eE]'|'|\"|`|\$(?:[^\W\d]\w*)?\$")


@functools.lru_cache(maxsize=512)  # a handler runs the same statements for every event
def check_statement(sql: str) -> None:
    """``ValueError`` for a statement of transaction control, which is the store's, behind
    comments too. One statement per call: both stores refuse more (SQLite's driver, and
    PostgreSQL's extended protocol, which the stores use for it)."""
    # PostgreSQL's comments nest, SQLite's do not: either reading must find no control.
    if any(_TRANSACTION_CONTROL.match(_sql_code(sql, nested)) for nested in (True, False)):
        raise ValueError(
            f"tx.execute({sql.strip()[:40]!r}): the statement would end or split the store's "
            "transaction, which commits your writes with the checkpoint; leave COMMIT, ROLLBACK "
            "and savepoints to riverbed"
        )


def _sql_code(sql: str, nested: bool = True) -> str:
    """``sql`` without its comments and with its quoted strings and identifiers emptied, as
    PostgreSQL reads it (or SQLite, whose comments do not ``nested``): what is left says what
    the statement is."""
    code: list[str] = []
    i = 0
    while (found := _SPECIAL.search(sql, i)) is not None:
        start, token = found.start(), found.group()
        code.append(sql[i:start])
        if token == "--":  # to the end of the line, which PostgreSQL also ends at a \r
            ends = [at for at in (sql.find("\n", start), sql.find("\r", start)) if at >= 0]
            i = min(ends, default=len(sql))
            code.append(" ")
        elif token == "/*":
            depth, i = 1, start + 2
            while depth and i < len(sql):
                if nested and sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            code.append(" ")
        elif token.startswith("$"):
            if start and (sql[start - 1].isalnum() or sql[start - 1] in "_$"):
                code.append(token)  # part of a name (a$b$) or a parameter ($1)
                i = found.end()
                continue
            end = sql.find(token, found.end())
            i = len(sql) if end < 0 else end + len(token)
            code.append("''")
        else:
            if (
                token in ("e'", "E'")
                and start
                and (sql[start - 1].isalnum() or sql[start - 1] in "_$")
            ):
                code.append(token[0])  # a name ending in e, then a string
                i = start + 1
                continue
            quote, escapes = token[-1], len(token) == 2  # E'...': backslash escapes
            j = found.end()
            while j < len(sql):
                if escapes and sql[j] == "\\":
                    j += 2
                elif sql[j] == quote:
                    if not sql.startswith(quote, j + 1):
                        break
                    j += 2  # a doubled quote
                else:
                    j += 1
            code.append(quote * 2)
            i = j + 1
    code.append(sql[i:])
    return "".join(code)


def check_page(after: object, limit: object) -> None:
    """A read-all page's bounds: positions after ``after``, at most ``limit`` events; ints of
    0 to 2**62 (what both stores take), else ``ValueError``."""
    _check_bounds("read_all", (("after", after), ("limit", limit)))


def check_versions(from_version: object, to_version: object) -> None:
    """A stream read's versions: ``from_version`` of 1 to 2**62, ``to_version`` None or of 0
    to 2**62 (0: none yet), else ``ValueError``."""
    _check_bounds("read_stream", (("from_version", from_version),), low=1)
    if to_version is not None:
        _check_bounds("read_stream", (("to_version", to_version),))


MAX_BOUND = 2**62  # above any position or version; both stores take it


def _check_bounds(where: str, values: tuple[tuple[str, object], ...], low: int = 0) -> None:
    for name, value in values:
        if type(value) is not int or not low <= value <= MAX_BOUND:
            raise ValueError(f"{where}: {name} is an int of {low} to 2**62, got {value!r}")


class Transaction(Protocol):
    """One database transaction of a subscriber (projection, process manager, inbox consumer):
    its reads and writes, its checkpoint and any events it appends commit together or not at all.

    Opened by ``EventStore.transaction(name)``, which takes the subscriber's row lock, so two
    runners of one subscriber never interleave."""

    name: str

    @property
    def checkpoint(self) -> int:
        """The global position of the last event this subscriber handled (0: none)."""
        ...

    def set_checkpoint(self, position: int) -> None: ...

    # Documents: a small portable read model (collections of JSON-like documents by key).
    def get(self, collection: str, key: str) -> Document | None: ...

    def put(self, collection: str, key: str, document: Document) -> None: ...

    def delete(self, collection: str, key: str) -> None: ...

    def drop(self, collection: str) -> None:
        """Delete every document of ``collection``."""
        ...

    def drop_prefixed(self, prefix: str) -> None:
        """Delete every document of the collections whose names start with ``prefix`` (a
        projection version's, declared or not)."""
        ...

    def savepoint(self) -> AbstractContextManager[None]:
        """A block whose writes roll back alone if it raises, the transaction going on (a
        failed handler's, before its event is parked in the same transaction).
        ``HandlerAbortedTransactionError`` (rolled back too) if the block caught the error of a
        failed statement, which leaves a PostgreSQL transaction unusable."""
        ...

    def park(self, parked: ParkedEvent) -> None: ...

    def unpark(self, projection: str, position: int) -> bool:
        """Forget a parked event; False if it was not parked."""
        ...

    def seen(self, event_id: str) -> bool:
        """Record ``event_id`` as handled by this subscriber; True if it already was (inbox)."""
        ...

    def append(self, appends: Sequence[StreamAppend]) -> int:
        """Append events in this transaction (a process manager's commands); see
        ``EventStore.append``."""
        ...

    def read_stream(
        self, stream: str, from_version: int = 1, to_version: int | None = None
    ) -> list[StoredEvent]:
        """``EventStore.read_stream`` inside this transaction: it sees the events this
        transaction appended (a process manager's second command to one aggregate)."""
        ...

    def set_timer(self, key: str, due_ms: int, data: bytes) -> None:
        """Set (or move) this subscriber's timer ``key``."""
        ...

    def cancel_timer(self, key: str) -> None: ...

    def due_timers(self, now_ms: int, limit: int = 100) -> list[Timer]:
        """This subscriber's timers due by ``now_ms``; firing one is deleting it (``cancel_timer``)
        in the transaction that handles it."""
        ...

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Raw SQL for read models of your own, in this transaction: SQLite takes ``?``
        placeholders, PostgreSQL ``%s``."""
        ...

    def renew_lease(self, name: str, owner: str, ttl_ms: int) -> bool:
        """Whether ``owner`` still holds lease ``name``, no other owner having taken it since
        ``owner`` acquired it (even if it expired meanwhile: nobody else acted under it); if so,
        it is extended by ``ttl_ms`` and stays ``owner``'s until this transaction ends. A fence:
        a holder that paused past its lease commits nothing once another has taken over."""
        ...


class EventStore(Protocol):
    url: str

    def append(self, appends: Sequence[StreamAppend]) -> int:
        """Append to one or several streams atomically; returns the global position of the last
        event appended. Raises ``ConcurrencyError`` (naming the stream and both versions) when a
        stream is not at its ``expected_version``; nothing is appended then."""
        ...

    def read_stream(
        self, stream: str, from_version: int = 1, to_version: int | None = None
    ) -> list[StoredEvent]:
        """The stream's events with ``from_version <= version <= to_version``, in order."""
        ...

    def stream_version(self, stream: str) -> int:
        """The version of the stream's last event; 0 if it has none."""
        ...

    def read_all(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Up to ``limit`` events with position > ``after``, in global order, gap-free: a reader
        never sees position N before every position below N is visible."""
        ...

    def last_position(self) -> int: ...

    def holds_write_lock(self) -> bool:
        """Whether this thread is in a transaction every other writer waits for (SQLite's one
        write lock): waiting in it for another subscriber to commit would never end."""
        ...

    def wait_for_events(self, after: int, timeout: float) -> bool:
        """Block until an event with position > ``after`` is stored (True) or ``timeout``
        seconds pass (False). PostgreSQL wakes on LISTEN/NOTIFY; SQLite watches
        ``PRAGMA data_version``."""
        ...

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """Keep ``snapshot`` as the stream's latest (a later one replaces it)."""
        ...

    def load_snapshot(self, stream: str, max_version: int | None = None) -> Snapshot | None:
        """The stream's latest snapshot at or below ``max_version``."""
        ...

    def stream_key(self, stream: str, create: bool) -> bytes | None:
        """The stream's data key for personal fields (created if ``create`` and missing); None
        when it was deleted or never created."""
        ...

    def delete_stream_key(self, stream: str) -> bool:
        """Crypto-shred: delete the stream's key; its personal fields become unreadable."""
        ...

    def transaction(self, name: str) -> AbstractContextManager[Transaction]:
        """A subscriber's transaction (see ``Transaction``)."""
        ...

    def checkpoint(self, name: str) -> int:
        """A subscriber's checkpoint, read outside its transaction."""
        ...

    def get_document(self, collection: str, key: str) -> Document | None: ...

    def documents(self, collection: str, limit: int | None = None) -> dict[str, Document]: ...

    def parked(self, projection: str) -> list[ParkedEvent]: ...

    def parked_count(self, projection: str) -> int:
        """How many events ``projection`` parked (without reading their errors)."""
        ...

    def unpark(self, projection: str, position: int) -> bool: ...

    def acquire_lease(self, name: str, owner: str, ttl_ms: int) -> bool:
        """Take lease ``name`` for ``owner`` if it is free, expired or already ``owner``'s, and
        extend it to ``ttl_ms`` from now, in one atomic step; whether ``owner`` holds it. Expiry
        is by the database's clock on PostgreSQL, by the machine's on SQLite."""
        ...

    def release_lease(self, name: str, owner: str) -> None:
        """Give lease ``name`` up if ``owner`` holds it, so another owner can take it at once."""
        ...

    def footprint(self) -> int:
        """Rows the store holds in all its tables (tests)."""
        ...

    def close(self) -> None: ...


class AsyncEventStore(Protocol):
    """The same store for ``async`` code: the appends and reads a command or query needs."""

    url: str

    async def append(self, appends: Sequence[StreamAppend]) -> int: ...

    async def read_stream(
        self, stream: str, from_version: int = 1, to_version: int | None = None
    ) -> list[StoredEvent]: ...

    async def read_all(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]: ...

    async def last_position(self) -> int: ...

    async def load_snapshot(
        self, stream: str, max_version: int | None = None
    ) -> Snapshot | None: ...

    async def save_snapshot(self, snapshot: Snapshot) -> None: ...

    async def stream_key(self, stream: str, create: bool) -> bytes | None: ...

    async def wait_for_events(self, after: int, timeout: float) -> bool: ...

    async def get_document(self, collection: str, key: str) -> Document | None: ...

    async def documents(self, collection: str, limit: int | None = None) -> dict[str, Document]: ...

    async def checkpoint(self, name: str) -> int: ...

    async def close(self) -> None: ...


__all__ = [
    "AsyncEventStore",
    "Document",
    "EventStore",
    "NewEvent",
    "Timer",
    "Transaction",
]
