"""What event stores hold: events as appended and as stored, snapshots.

Stores see payloads as opaque msgpack bytes; the domain layer (``codec.py``) turns them into
typed events. ``position`` is the event's place in the store's global order: 1, 2, 3, ... with
no gaps, so a reader that has seen position N has seen every event before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from riverbed.eventsourcing.errors import EventDecodeError, EventSourcingError


class NewEvent(msgspec.Struct, frozen=True):
    """An event to append: the ``version``-th event of ``stream`` (1-based)."""

    id: str
    stream: str
    version: int
    type: str
    schema: int  # the event class's version when it was written, for upcasting
    data: bytes  # msgpack payload; personal fields encrypted
    metadata: bytes  # msgpack map: correlation_id, causation_id and the user's
    timestamp_ms: int


class StoredEvent(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """An event as stored, with its global ``position``.

    Untracked by the garbage collector (its fields are scalars, so it can be in no cycle):
    reading all events makes tens of thousands, and tracking them cost a read ~7%."""

    position: int
    id: str
    stream: str
    version: int
    type: str
    schema: int
    data: bytes
    metadata: bytes
    timestamp_ms: int


class StreamAppend(msgspec.Struct, frozen=True):
    """Events for one stream, appended only if it is at ``expected_version`` (0: a new stream;
    None: whatever its version)."""

    stream: str
    expected_version: int | None
    events: list[NewEvent]


def continues(append: StreamAppend) -> bool:
    """Whether the append's events have the versions after its expected one, one by one, as a
    save's do (False with no expected version)."""
    expected = append.expected_version
    if expected is None:
        return False
    return all(event.version == expected + n for n, event in enumerate(append.events, 1))


def distinct_streams(appends: Sequence[StreamAppend]) -> None:
    """Refuse an append that names a stream twice: its expected versions would be checked
    against each other's events on one store and not on another."""
    seen: set[str] = set()
    for append in appends:
        if append.stream in seen:
            raise EventSourcingError(
                f"cannot append: stream {append.stream!r} appears twice in one append; give "
                "all its events in one StreamAppend"
            )
        seen.add(append.stream)


class Snapshot(msgspec.Struct, frozen=True):
    """An aggregate's state at ``version``, so loading it replays only later events."""

    stream: str
    version: int
    type: str
    schema: int
    data: bytes
    timestamp_ms: int


class ParkedEvent(msgspec.Struct, frozen=True):
    """An event a projection could not apply, kept aside with the error."""

    projection: str
    position: int
    event_id: str
    type: str
    error: str
    parked_ms: int


class Timer(msgspec.Struct, frozen=True):
    """A process manager's timer: fires at ``due_ms`` with ``data``."""

    name: str
    key: str
    due_ms: int
    data: bytes


_metadata_decoder = msgspec.msgpack.Decoder(dict[str, Any])


def metadata_of(stored: StoredEvent) -> dict[str, Any]:
    """The event's metadata; ``EventDecodeError`` naming the event if it is damaged."""
    try:
        return _metadata_decoder.decode(stored.metadata)
    except msgspec.MsgspecError as error:
        raise EventDecodeError(
            f"the metadata of the event at position {stored.position} ({stored.type}, version "
            f"{stored.version} of stream {stored.stream!r}) does not decode: {error}"
        ) from None
