"""Joins: a stream with a table (a compacted topic materialized in every worker), and two
streams within a time interval.

The interval join routes both sides through one internal topic keyed by the join key, so a key's
records of both sides meet in one partition whatever the input partitioning was. Each side's
recent records are kept in state for ``within + grace``; every new record is joined with the other
side's records no further than ``within`` from it in event time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import msgspec

from riverbed.streams.nodes import EMPTY, Batch, Context, InternalTopic, Item, Node
from riverbed.streams.topics import Topic
from riverbed.streams.windows.base import WindowNode, WindowSettings, stream_times

LEFT, RIGHT = 0, 1
# (event time, side, msgpack of the value)
Buffered = tuple[int, int, bytes]


class Table:
    """The latest value per key of a topic, kept current in every worker (``app.table``)."""

    def __init__(self, topic: Topic[Any, Any]) -> None:
        self.topic = topic
        self.values: dict[Any, Any] = {}

    def get(self, key: Any, default: Any = None) -> Any:
        return self.values.get(key, default)

    def apply(self, pairs: list[tuple[Any, Any]]) -> None:
        """Apply decoded records in order; a value of None (a tombstone) deletes the key."""
        values = self.values
        for key, value in pairs:
            if value is None:
                values.pop(key, None)
            else:
                values[key] = value


class TableJoinNode(Node):
    """Each item joined with the table's value for its key (or ``on(value)``)."""

    def __init__(
        self,
        table: Table,
        fn: Callable[[Any, Any], Any],
        on: Callable[[Any], Any] | None,
        how: Literal["inner", "left"],
    ) -> None:
        super().__init__()
        self.table, self.fn, self.on, self.how = table, fn, on, how

    def push(self, batch: Batch, ctx: Context) -> None:
        lookup, fn, on = self.table.values.get, self.fn, self.on
        joined: list[Item] = []
        for key, value, ts in batch:
            other = lookup(key if on is None else on(value))
            if other is not None or self.how == "left":
                joined.append((key, fn(value, other), ts))
        self.forward(Batch.of(joined), ctx)


class JoinSideNode(Node):
    """Writes one side of an interval join to the join's internal topic."""

    def __init__(self, topic: InternalTopic, side: int) -> None:
        super().__init__()
        self.topic = topic
        self.side = side
        self.written = 0  # records sent, for the records-out metric

    @property
    def terminal(self) -> bool:
        return True

    def push(self, batch: Batch, ctx: Context) -> None:
        encode, side = self.topic.encoder.encode, self.side
        ctx.producer.send_many(
            self.topic.name, [(encode(k), encode((t, side, v))) for k, v, t in batch]
        )
        self.written += len(batch)


class IntervalJoinNode(WindowNode[list[Buffered]]):
    """Joins the two sides arriving through one internal topic; state: per key, both sides'
    records of the last ``2 * within + grace``."""

    def __init__(
        self,
        store: str,
        within_ms: int,
        grace_ms: int,
        fn: Callable[[Any, Any], Any],
        left_type: Any,
        right_type: Any,
    ) -> None:
        super().__init__(WindowSettings(store, None, grace_ms=grace_ms), list[Buffered])
        self.within = within_ms
        self.fn = fn
        self._decoders = (
            msgspec.msgpack.Decoder(left_type),
            msgspec.msgpack.Decoder(right_type),
        )

    def process(
        self,
        partition: int,
        entries: dict[Any, list[Buffered]],
        dirty: set[Any],
        batch: Batch,
        times: list[int],
        before: int,
    ) -> tuple[Batch, Batch]:
        within, horizon = self.within, self.within + self.grace_ms
        decoders, fn = self._decoders, self.fn
        late: list[Item] = []
        joined: list[Item] = []
        for item, ts, now in zip(batch, times, stream_times(before, times), strict=True):
            if ts + horizon < now:
                late.append(item)
                continue
            key, (side, raw) = item[0], item[1]
            buffered = entries.setdefault(key, [])
            mine = decoders[side].decode(raw)
            for other_ts, other_side, other_raw in buffered:
                if other_side != side and abs(other_ts - ts) <= within:
                    other = decoders[other_side].decode(other_raw)
                    pair = (mine, other) if side == LEFT else (other, mine)
                    joined.append((key, fn(*pair), max(ts, other_ts)))
            buffered.append((ts, side, raw))
            dirty.add(key)
        return Batch.of(late), Batch.of(joined)

    def close(
        self, partition: int, entries: dict[Any, list[Buffered]], dirty: set[Any], stream_time: int
    ) -> Batch:
        # A record on time is at most within + grace behind stream time, and its partners at most
        # within before it.
        oldest = stream_time - 2 * self.within - self.grace_ms
        for key in list(entries):
            buffered = entries[key]
            if buffered and min(ts for ts, _, _ in buffered) >= oldest:
                continue
            kept = [entry for entry in buffered if entry[0] >= oldest]
            if kept:
                entries[key] = kept
            else:
                del entries[key]
            dirty.add(key)
        return EMPTY
