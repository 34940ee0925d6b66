"""What every windowed aggregation shares: event time, stream time, lateness, state, results.

Stream time is the largest event time seen in a source partition, kept with the state. Each
record is judged against the stream time including every record before it, so lateness does not
depend on how records were batched. A window closes once stream time reaches its end plus the
grace period; a record only for closed windows is late and goes to the late output (or is
dropped and counted). ``emit="final"`` emits each window once, when it closes; ``"update"`` emits
a window's current result after every batch that changed it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain, islice, repeat
from operator import itemgetter
from typing import Any, Generic, Literal, TypeVar

import msgspec

from riverbed.errors import RiverbedError
from riverbed.streams.aggregators import Aggregator
from riverbed.streams.nodes import Batch, Context, Node, StatefulNode, hashable
from riverbed.streams.state.backend import Changes

T = TypeVar("T")
Emit = Literal["final", "update"]
TimestampFn = Callable[[Any], int]

STREAM_TIME_KEY = b""  # never a msgpack encoding, so never a window's key
NO_TIME = -(2**62)


class Windowed(msgspec.Struct, Generic[T], frozen=True):
    """A window's result: ``value`` over event times ``[start_ms, end_ms)``."""

    start_ms: int
    end_ms: int
    value: T


class Aggregation:
    """One aggregator, or several by name (the result is then a dict of their results)."""

    def __init__(
        self, aggregators: Aggregator[Any, Any, Any] | dict[str, Aggregator[Any, Any, Any]]
    ):
        if isinstance(aggregators, Aggregator):
            self.names: tuple[str, ...] | None = None
            self.aggregators: tuple[Aggregator[Any, Any, Any], ...] = (aggregators,)
        else:
            if not aggregators:
                raise RiverbedError(
                    "aggregate() needs an aggregator, e.g. aggregate(riverbed.count()) or "
                    "aggregate(n=riverbed.count(), total=riverbed.sum(lambda v: v.amount))"
                )
            self.names = tuple(aggregators)
            self.aggregators = tuple(aggregators.values())
        self.state_type: Any = tuple[tuple(a.state_type for a in self.aggregators)]  # type: ignore[misc]
        self._plain_results = all(a.plain_result for a in self.aggregators)

    def initial(self) -> list[Any]:
        return [a.initial() for a in self.aggregators]

    def add_many(self, accs: list[Any] | None, values: list[Any]) -> list[Any]:
        if accs is None:
            accs = self.initial()
        return [a.add_many(acc, values) for a, acc in zip(self.aggregators, accs, strict=True)]

    def fold(
        self, previous: Sequence[Sequence[Any] | None], groups: Sequence[Sequence[Any]]
    ) -> list[tuple[Any, ...]]:
        """``add_many`` for each (accumulators or None, values) pair, an aggregator at a time.
        The new accumulators are tuples (never changed in place), made by one C-level zip."""
        columns = []
        for index, aggregator in enumerate(self.aggregators):
            initial = aggregator.initial
            accs = [initial() if p is None else p[index] for p in previous]
            columns.append(aggregator.add_groups(accs, groups))
        return list(zip(*columns, strict=True))

    def merge(self, left: list[Any], right: list[Any]) -> list[Any]:
        return [a.merge(x, y) for a, x, y in zip(self.aggregators, left, right, strict=True)]

    def check_mergeable(self, window: str) -> None:
        for aggregator in self.aggregators:
            if not aggregator.mergeable:
                aggregator.merge(None, None)  # raises, naming the aggregator
                raise RiverbedError(f"{window} windows need mergeable aggregators")

    def results(self, accs: Sequence[Sequence[Any]]) -> list[Any]:
        """``result`` of each of ``accs``; when every aggregator's result is its accumulator, in
        C-level maps (the dicts of named aggregators from zips of names and accumulators)."""
        if not self._plain_results:
            return list(map(self.result, accs))
        if self.names is None:
            return list(map(itemgetter(0), accs))
        return list(map(dict, map(zip, repeat(self.names), accs)))

    def result(self, accs: Sequence[Any]) -> Any:
        if self.names is None:
            return self.aggregators[0].result(accs[0])
        return {
            name: a.result(acc)
            for name, a, acc in zip(self.names, self.aggregators, accs, strict=True)
        }


@dataclass(frozen=True)
class WindowSettings:
    """What every windowed (or otherwise keyed and timed) state node is built with."""

    store: str
    aggregation: Aggregation | None
    timestamp: TimestampFn | None = None
    grace_ms: int = 0
    emit: Emit = "update"
    late: Node | None = None


class WindowNode(StatefulNode, Generic[T]):
    """A windowed aggregation; subclasses say how records fall into windows and when windows
    close. The state of a source partition is ``T`` per key, decoded on first use."""

    def __init__(self, settings: WindowSettings, entry_type: Any) -> None:
        super().__init__(settings.store)
        if settings.emit not in ("final", "update"):
            raise RiverbedError(f"emit must be 'final' or 'update', got {settings.emit!r}")
        if settings.grace_ms < 0:
            raise RiverbedError(f"grace must be >= 0, got {settings.grace_ms / 1000} s")
        self._aggregation = settings.aggregation
        self.timestamp = settings.timestamp
        self.grace_ms = settings.grace_ms
        self.emit = settings.emit
        self.late = settings.late
        self._encoder = msgspec.msgpack.Encoder()
        self._key_decoder = msgspec.msgpack.Decoder()
        self._entry_decoder = msgspec.msgpack.Decoder(entry_type)
        self._time_decoder = msgspec.msgpack.Decoder(int)
        # Per source partition: stream time, entries by state key, changed state keys.
        self._times: dict[int, int] = {}
        self._entries: dict[int, dict[Any, T]] = {}
        self._dirty: dict[int, set[Any]] = {}
        # The state keys written to the store, so that an entry made and dropped between two
        # commits (a window opened and closed in one) costs no write at all.
        self._stored: dict[int, set[Any]] = {}
        self._pushed: set[int] = set()

    @property
    def terminal(self) -> bool:
        return super().terminal or (self.late is not None and self.late.terminal)

    @property
    def aggregation(self) -> Aggregation:
        assert self._aggregation is not None, "a window node without aggregation (a join)"
        return self._aggregation

    # State

    def _state(self, ctx: Context) -> dict[Any, T]:
        partition = ctx.partition
        entries = self._entries.get(partition)
        if entries is None:
            rows = ctx.loader(self.store, partition)
            raw_time = rows.pop(STREAM_TIME_KEY, None)
            self._times[partition] = (
                NO_TIME if raw_time is None else self._time_decoder.decode(raw_time)
            )
            entries = self._entries[partition] = self.restore(partition, rows)
            self._dirty[partition] = set()
            self.restored(partition, entries)
        ctx.touched.add(self)
        return entries

    def restore(self, partition: int, rows: dict[bytes, bytes]) -> dict[Any, T]:
        """A partition's entries from its stored rows: here, one row per entry."""
        decode_key, decode_entry = self._key_decoder.decode, self._entry_decoder.decode
        entries = {hashable(decode_key(k)): decode_entry(v) for k, v in rows.items()}
        self._stored[partition] = set(entries)
        return entries

    def restored(self, partition: int, entries: dict[Any, T]) -> None:
        """Rebuild indexes over a partition's entries after loading them."""

    def changes(self) -> Changes:
        out: Changes = {}
        for partition in self._pushed:
            dirty = self._dirty[partition]
            changed = self.changed_rows(partition, dirty)
            changed[STREAM_TIME_KEY] = self._encoder.encode(self._times[partition])
            out[self.store, partition] = changed
            dirty.clear()
        self._pushed.clear()
        return out

    def changed_rows(self, partition: int, dirty: set[Any]) -> dict[bytes, bytes | None]:
        """The rows to write (or delete: None) for the ``dirty`` entries of a partition."""
        encode = self._encoder.encode
        entries = self._entries[partition]
        stored = self._stored[partition]
        changed: dict[bytes, bytes | None] = {}
        for key in dirty:
            if key in entries:
                changed[encode(key)] = encode(entries[key])
                stored.add(key)
            elif key in stored:
                changed[encode(key)] = None
                stored.discard(key)
        return changed

    def snapshot(self) -> dict[Any, Any]:
        return {k: v for entries in self._entries.values() for k, v in entries.items()}

    def reset(self, partitions: set[int] | None = None) -> None:
        for partition in list(self._entries) if partitions is None else partitions:
            self._entries.pop(partition, None)
            self._dirty.pop(partition, None)
            self._stored.pop(partition, None)
            self._times.pop(partition, None)
            self._pushed.discard(partition)

    # Processing

    def push(self, batch: Batch, ctx: Context) -> None:
        entries = self._state(ctx)
        partition = ctx.partition
        self._pushed.add(partition)
        timestamp = self.timestamp
        times = batch.timestamps if timestamp is None else list(map(timestamp, batch.values))
        before = self._times[partition]
        late, emitted = self.process(
            partition, entries, self._dirty[partition], batch, times, before
        )
        after = self._times[partition] = stream_time_after(before, times)
        closed = self.close(partition, entries, self._dirty[partition], after)
        if late:
            ctx.late += len(late)
            if self.late is not None:
                self.late.push(late, ctx)
        self.forward(emitted, ctx)
        self.forward(closed, ctx)

    def process(
        self,
        partition: int,
        entries: dict[Any, T],
        dirty: set[Any],
        batch: Batch,
        times: list[int],
        before: int,
    ) -> tuple[Batch, Batch]:
        """Fold the batch into the entries; returns the late records and the updates to emit.
        ``before`` is the stream time before the batch (see ``stream_times``)."""
        raise NotImplementedError

    def close(
        self, partition: int, entries: dict[Any, T], dirty: set[Any], stream_time: int
    ) -> Batch:
        """Drop the windows that stream time closed; returns their final results to emit."""
        raise NotImplementedError


def stream_time_after(before: int, times: list[int]) -> int:
    """The stream time after the records at ``times``, from ``before``."""
    return max(chain((before,), times))


def stream_times(before: int, times: list[int]) -> list[int]:
    """The stream time at each record: the largest event time up to it, from ``before``."""
    return list(islice(accumulate(times, max, initial=before), 1, None))


def ms(seconds: float | None, milliseconds: int | None, what: str) -> int:
    """A duration given as ``seconds=`` or ``ms=`` (exactly one), in milliseconds."""
    if (seconds is None) == (milliseconds is None):
        raise RiverbedError(f"give the {what} as seconds= or ms=, e.g. tumbling(seconds=10)")
    value = int(seconds * 1000) if seconds is not None else int(milliseconds or 0)
    if value <= 0:
        raise RiverbedError(f"the {what} must be positive, got {value} ms")
    return value
