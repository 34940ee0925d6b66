"""Events that stores keep a save to a row: a batch of a stream's consecutive versions, its
records (each event's ``StoredEvent`` as a msgpack array) one after the other. A page joins its
rows' records and decodes them with one msgspec call, then cuts the rows at its ends."""

from __future__ import annotations

import bisect
import operator
from collections.abc import Sequence

import msgspec

from riverbed.eventsourcing.errors import EventSourcingError
from riverbed.eventsourcing.records import NewEvent, StoredEvent

_encoder = msgspec.msgpack.Encoder()
_page_decoder = msgspec.msgpack.Decoder(list[StoredEvent])
_position_of = operator.attrgetter("position")
_version_of = operator.attrgetter("version")

# A batch row as reads fetch it: the position of its first event, its event count, its records.
Row = tuple[int, int, bytes]


def record(position: int, e: NewEvent) -> bytes:
    """The event's record at ``position``: a ``StoredEvent`` as msgpack (it is array_like, so
    the tuple encodes the same)."""
    return _encoder.encode((position, e.id, e.stream, e.version, e.type, e.schema, e.data,
                            e.metadata, e.timestamp_ms))  # fmt: skip


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
