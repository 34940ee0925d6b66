"""Events that stores keep a save to a row: a batch of a stream's consecutive versions, its
records (each event's ``StoredEvent`` as a msgpack array) one after the other. A page joins its
rows' records and decodes them with one msgspec call, then cuts the rows at its ends. Both the
SQLite and the PostgreSQL store cut appends into rows and read pages with these."""

from __future__ import annotations

import bisect
import operator
from collections.abc import Sequence

import msgspec

from riverbed.eventsourcing.errors import EventSourcingError
from riverbed.eventsourcing.records import NewEvent, StoredEvent
from riverbed.eventsourcing.stores.api import MAX_BOUND

_encoder = msgspec.msgpack.Encoder()
_page_decoder = msgspec.msgpack.Decoder(list[StoredEvent])
_position_of = operator.attrgetter("position")
_version_of = operator.attrgetter("version")

# A batch row as reads fetch it: the position of its first event, its event count, its records.
Row = tuple[int, int, bytes]


def runs(events: Sequence[NewEvent], max_events: int, max_bytes: int) -> list[Sequence[NewEvent]]:
    """The events in the runs that batch rows hold: consecutive versions, at most
    ``max_events`` events and ``max_bytes`` of payloads and metadata (or one larger event).
    Slices of ``events``, or ``events`` itself when it is one run (a save's, mostly)."""
    found: list[Sequence[NewEvent]] = []
    start = size = previous = 0
    for n, event in enumerate(events):
        event_size = len(event.data) + len(event.metadata)
        if n > start and (
            n - start == max_events
            or size + event_size > max_bytes
            or event.version != previous + 1
        ):
            found.append(events[start:n])
            start, size = n, 0
        size += event_size
        previous = event.version
    if start < len(events):
        found.append(events[start:] if start else events)
    return found


def joined_records(events: Sequence[NewEvent], first: int) -> bytes:
    """The events' records (each a ``StoredEvent`` as msgpack, which array_like encodes as the
    tuple), numbered from ``first``, joined: a batch row's. One msgspec call encodes them as an
    array, whose header is cut off: a call per record took 1.35 times as long."""
    array = _encoder.encode(
        [
            (position, e.id, e.stream, e.version, e.type, e.schema, e.data, e.metadata,
             e.timestamp_ms)
            for position, e in enumerate(events, first)
        ]
    )  # fmt: skip
    count = len(events)
    return array[1 if count < 16 else 3 if count < 2**16 else 5 :]  # fixarray, array16, 32


def decoded(count: int, records: bytes | None) -> list[StoredEvent] | None:
    """The ``count`` events of joined records, which decode at once as a msgpack array (a row
    per event cost 1.5 times as long), in position order; None for a damaged record, which the
    rows read one by one name."""
    if not count:
        return []
    if records is None:  # as no record is NULL, never; but then the rows say what is wrong
        return None
    try:
        events = _page_decoder.decode(b"\xdd" + count.to_bytes(4, "big") + records)
    except msgspec.MsgspecError:
        return None
    # SQLite's group_concat order is undocumented before 3.44; a page in order sorts in one pass.
    events.sort(key=_position_of)
    return events


def rows_decoded(rows: Sequence[Row]) -> list[StoredEvent]:
    """The events of the rows, joined as ``decoded`` takes them, else one row at a time to name
    a damaged one."""
    found = decoded(sum(row[1] for row in rows), b"".join([row[2] for row in rows]))
    if found is not None:
        return found
    events: list[StoredEvent] = []
    for position, count, records in sorted(rows):
        row_events = decoded(count, records)
        if row_events is None:
            raise EventSourcingError(
                f"the event store holds a damaged event record among those of positions "
                f"{position} to {position + count - 1}"
            )
        events += row_events
    return events


def in_range(
    events: list[StoredEvent], after: int, limit: int, last: int | None
) -> list[StoredEvent] | None:
    """The page of the ``limit`` positions after ``after``, from the events of the rows that
    hold them; None when it comes out short while the store's ``last`` position is past it:
    positions have gaps (rows deleted by hand), and ``first_after`` reads the page instead."""
    upto = min(after + limit, MAX_BOUND)
    page = between(events, after, upto)
    return None if len(page) < limit and last is not None and last > upto else page


def first_after(events: list[StoredEvent], after: int, limit: int) -> list[StoredEvent]:
    """The first ``limit`` events after ``after``, from rows read in position order up to a
    LIMIT."""
    return between(events, after, MAX_BOUND)[:limit]


def between(events: list[StoredEvent], after: int, upto: int) -> list[StoredEvent]:
    """The events, in position order, after ``after`` up to ``upto``."""
    start = bisect.bisect_right(events, after, key=_position_of)
    return events[start : bisect.bisect_right(events, upto, lo=start, key=_position_of)]


def versions(events: list[StoredEvent], from_version: int, upto: int) -> list[StoredEvent]:
    """A stream's events from ``from_version`` up to ``upto``, in version order (appends of no
    expected version may have stored a lower version later)."""
    events.sort(key=_version_of)
    start = bisect.bisect_left(events, from_version, key=_version_of)
    return events[start : bisect.bisect_right(events, upto, lo=start, key=_version_of)]
