"""Sliding windows: for each record, the window of ``size`` that ends at it.

Each record at time t yields the aggregate over the key's records in ``(t - size, t]``, the
"last N seconds" view. With ``emit="final"`` it is emitted once stream time reaches
``t + grace``, so records that arrive out of order within the grace period are counted; with
``"update"`` it is emitted at once. State: per key, its recent records' single-record
accumulators ``(time, emitted, accumulators)``, kept while a window can still include them.
"""

from __future__ import annotations

from bisect import insort
from functools import reduce
from typing import Any

from riverbed.streams.nodes import Batch, Item
from riverbed.streams.windows.base import Windowed, WindowNode, WindowSettings, ms, stream_times

Entry = tuple[int, bool, list[Any]]


class SlidingWindows:
    kind = "sliding"

    def __init__(self, size_ms: int) -> None:
        self.size_ms = size_ms

    def node(self, settings: WindowSettings) -> WindowNode[Any]:
        return SlidingNode(self.size_ms, settings)


def sliding(seconds: float | None = None, *, milliseconds: int | None = None) -> SlidingWindows:
    """For each record, the window of the ``seconds`` (or ``milliseconds``) up to it."""
    return SlidingWindows(ms(seconds, milliseconds, "window size"))


class SlidingNode(WindowNode[list[Entry]]):
    def __init__(self, size_ms: int, settings: WindowSettings) -> None:
        assert settings.aggregation is not None
        settings.aggregation.check_mergeable("sliding")
        state_type = settings.aggregation.state_type
        entry_type: Any = tuple.__class_getitem__((int, bool, state_type))
        super().__init__(settings, list[entry_type])
        self.size = size_ms

    def process(
        self,
        partition: int,
        entries: dict[Any, list[Entry]],
        dirty: set[Any],
        batch: Batch,
        times: list[int],
        before: int,
    ) -> tuple[Batch, Batch]:
        grace, update = self.grace_ms, self.emit == "update"
        aggregation = self.aggregation
        late: list[Item] = []
        emitted: list[Item] = []
        for item, ts, now in zip(batch, times, stream_times(before, times), strict=True):
            if ts + grace < now:
                late.append(item)
                continue
            key = item[0]
            recent = entries.setdefault(key, [])
            insort(recent, (ts, update, aggregation.add_many(None, [item[1]])), key=_time)
            dirty.add(key)
            if update:
                emitted.append(self._window(key, recent, ts))
        return Batch.of(late), Batch.of(emitted)

    def close(
        self, partition: int, entries: dict[Any, list[Entry]], dirty: set[Any], stream_time: int
    ) -> Batch:
        due = stream_time - self.grace_ms
        horizon = due - self.size
        emitted: list[Item] = []
        for key in list(entries):
            recent = entries[key]
            if recent[0][0] > horizon and all(done or ts > due for ts, done, _ in recent):
                continue
            marked: list[Entry] = []
            for ts, done, accs in recent:
                emit_now = not done and ts <= due
                if emit_now:
                    emitted.append(self._window(key, recent, ts))
                if not ((done or emit_now) and ts <= horizon):
                    marked.append((ts, done or emit_now, accs))
            if marked:
                entries[key] = marked
            else:
                del entries[key]
            dirty.add(key)
        emitted.sort(key=lambda item: item[2])
        return Batch.of(emitted)

    def _window(self, key: Any, recent: list[Entry], end: int) -> Item:
        start = end - self.size
        merge = self.aggregation.merge
        parts = [list(accs) for ts, _, accs in recent if start < ts <= end]
        accs = reduce(merge, parts)
        return key, Windowed(start + 1, end + 1, self.aggregation.result(accs)), end


def _time(entry: Entry) -> int:
    return entry[0]
