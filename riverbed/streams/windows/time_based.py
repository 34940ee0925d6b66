"""Tumbling and hopping windows: fixed-size windows aligned to the epoch.

A tumbling window of size S covers ``[n*S, (n+1)*S)``; a hopping window of size S advancing by A
covers ``[n*A, n*A + S)``, so a record falls into S/A of them. State: per window start, a dict of
the window's accumulators by key, so that a batch is grouped by start (a few runs of equal
starts) and then by key (hashed once, no ``(key, start)`` tuple per record), and stream time
closes a window by popping one dict.

A window's entries are stored together, in rows of up to ``ROW_ENTRIES`` (a window of more keys
is spread over a power of two of rows by a hash of the key), each row one msgpack map: a commit
rewrites the rows of the windows it changed with one msgspec call per row, and closing a window
deletes its rows.
"""

from __future__ import annotations

import zlib
from itertools import compress, islice, repeat
from operator import ne
from typing import Any

import msgspec

from riverbed.errors import RiverbedError
from riverbed.streams.nodes import EMPTY, Batch, grouped
from riverbed.streams.windows.base import (
    Windowed,
    WindowNode,
    WindowSettings,
    ms,
    stream_time_after,
    stream_times,
)

ROW_ENTRIES = 1024
HASHED_KEYS_LIMIT = 100_000


class Hopping:
    """Windows of ``size`` starting every ``advance`` (``tumbling`` when they are equal)."""

    kind = "hopping"

    def __init__(self, size_ms: int, advance_ms: int) -> None:
        if advance_ms > size_ms:
            raise RiverbedError(
                f"a hopping window's advance ({advance_ms} ms) must not exceed its size "
                f"({size_ms} ms); records between windows would belong to none"
            )
        self.size_ms = size_ms
        self.advance_ms = advance_ms

    def node(self, settings: WindowSettings) -> WindowNode[Any]:
        return FixedWindowNode(self, settings)


class Tumbling(Hopping):
    kind = "tumbling"

    def __init__(self, size_ms: int) -> None:
        super().__init__(size_ms, size_ms)


def tumbling(seconds: float | None = None, *, milliseconds: int | None = None) -> Tumbling:
    """Back-to-back windows of ``seconds`` (or ``milliseconds``)."""
    return Tumbling(ms(seconds, milliseconds, "window size"))


def hopping(
    seconds: float | None = None,
    advance: float | None = None,
    *,
    size_ms: int | None = None,
    advance_ms: int | None = None,
) -> Hopping:
    """Windows of ``seconds`` starting every ``advance`` seconds (or the ``_ms`` forms)."""
    return Hopping(ms(seconds, size_ms, "window size"), ms(advance, advance_ms, "advance"))


Window = dict[Any, tuple[Any, ...]]  # key -> accumulators


class FixedWindowNode(WindowNode[Window]):
    """The entries of a partition are its open windows, by start."""

    def __init__(self, spec: Hopping, settings: WindowSettings) -> None:
        assert settings.aggregation is not None
        super().__init__(settings, settings.aggregation.state_type)
        self.size = spec.size_ms
        self.advance = spec.advance_ms
        # Per partition: window start -> how many rows its entries are stored in.
        self._rows: dict[int, dict[int, int]] = {}
        # Per partition: window start -> the keys changed since the last commit, kept only for
        # windows of more than one row (a one-row window is rewritten whole).
        self._changed: dict[int, dict[int, set[Any]]] = {}
        self._row_key_decoder = msgspec.msgpack.Decoder(tuple[int, int, int])
        row_type: Any = dict.__class_getitem__((Any, settings.aggregation.state_type))
        self._row_decoder = msgspec.msgpack.Decoder(row_type)
        self._hashes: dict[Any, int] = {}

    def restore(self, partition: int, rows: dict[bytes, bytes]) -> dict[int, Window]:
        windows: dict[int, Window] = {}
        counts: dict[int, int] = {}
        decode_row_key, decode_row = self._row_key_decoder.decode, self._row_decoder.decode
        for row_key, row in rows.items():
            start, _, count = decode_row_key(row_key)
            counts[start] = count
            window = windows.get(start)
            if window is None:
                windows[start] = decode_row(row)
            else:
                window.update(decode_row(row))
        self._rows[partition] = counts
        self._changed[partition] = {}
        return windows

    def changed_rows(self, partition: int, dirty: set[Any]) -> dict[bytes, bytes | None]:
        encode = self._encoder.encode
        windows, counts = self._entries[partition], self._rows[partition]
        changed_keys = self._changed[partition]
        changed: dict[bytes, bytes | None] = {}
        for start in dirty:
            window = windows.get(start, {})
            stored, count = counts.get(start, 0), _row_count(len(window))
            keys = changed_keys.pop(start, ())
            if count == stored:
                if not count:
                    continue  # opened and closed between two commits: never stored
                rows = {0} if count == 1 else {self._row_of(key, count) for key in keys}
            else:  # the window grew past its rows, or closed: its old rows go
                changed.update((encode((start, row, stored)), None) for row in range(stored))
                rows = set(range(count))
                counts[start] = count
                if not count:
                    del counts[start]
            if count == 1:
                changed[encode((start, 0, 1))] = encode(window)
                continue
            for row, entries in self._row_entries(window, count, rows).items():
                changed[encode((start, row, count))] = encode(entries)
        return changed

    def _row_entries(self, window: Window, count: int, rows: set[int]) -> dict[int, Window]:
        """The entries of a window's ``rows``, by row."""
        out: dict[int, Window] = {row: {} for row in rows}
        for key, accs in window.items():
            entries = out.get(self._row_of(key, count))
            if entries is not None:
                entries[key] = accs
        return out

    def _row_of(self, key: Any, count: int) -> int:
        return 0 if count == 1 else self._hash(key) & (count - 1)

    def _hash(self, key: Any) -> int:
        """A stable hash of the key (the same in every process), to spread big windows."""
        hashed = self._hashes.get(key)
        if hashed is None:
            if len(self._hashes) >= HASHED_KEYS_LIMIT:
                self._hashes.clear()
            hashed = self._hashes[key] = zlib.crc32(self._encoder.encode(key))
        return hashed

    def snapshot(self) -> dict[Any, Any]:
        return {
            (key, start): accs
            for windows in self._entries.values()
            for start, window in windows.items()
            for key, accs in window.items()
        }

    def reset(self, partitions: set[int] | None = None) -> None:
        super().reset(partitions)
        for partition in list(self._rows) if partitions is None else partitions:
            self._rows.pop(partition, None)
            self._changed.pop(partition, None)

    def process(
        self,
        partition: int,
        entries: dict[int, Window],
        dirty: set[Any],
        batch: Batch,
        times: list[int],
        before: int,
    ) -> tuple[Batch, Batch]:
        size, advance, grace = self.size, self.advance, self.grace_ms
        if size == advance:
            starts = [ts - ts % size for ts in times]
            if min(starts) + size + grace > stream_time_after(before, times):
                # The common case, no record late: whole columns, no stream time per record.
                return EMPTY, self._fold(partition, entries, dirty, starts, batch)
            on_time = [
                start + size + grace > now
                for start, now in zip(starts, stream_times(before, times), strict=True)
            ]
            late = batch.select([not kept for kept in on_time])
            starts = list(compress(starts, on_time))
            return late, self._fold(partition, entries, dirty, starts, batch.select(on_time))
        # Hopping: a record falls into several windows; one (start, index) pair per window.
        placed: list[int] = []
        indexes: list[int] = []
        late_indexes: list[int] = []
        for index, (ts, now) in enumerate(zip(times, stream_times(before, times), strict=True)):
            start = ts - ts % advance
            in_some = False
            while start > ts - size:
                if start + size + grace > now:
                    placed.append(start)
                    indexes.append(index)
                    in_some = True
                start -= advance
            if not in_some:
                late_indexes.append(index)
        late = batch.take(late_indexes)
        return late, self._fold(partition, entries, dirty, placed, batch.take(indexes))

    def _fold(
        self,
        partition: int,
        windows: dict[int, Window],
        dirty: set[Any],
        starts: list[int],
        batch: Batch,
    ) -> Batch:
        """Fold the records into their windows (``starts``), a window at a time; returns the
        updates to emit (with ``emit="update"``): each changed (window, key) once."""
        aggregation, changed_keys = self.aggregation, self._changed[partition]
        emitted: list[Batch] = []
        for start, (keys, values) in _by_start(starts, batch.keys, batch.values).items():
            window = windows.get(start)
            if window is None:
                window = windows[start] = {}
            groups = grouped(keys, values)
            touched = list(groups)
            previous = list(map(window.get, touched))
            folded = aggregation.fold(previous, list(groups.values()))
            window.update(zip(touched, folded, strict=True))
            dirty.add(start)
            if len(window) > ROW_ENTRIES:
                changed_keys.setdefault(start, set()).update(touched)
            if self.emit == "update":
                emitted.append(self._results(start, window, touched))
        return Batch.joined(emitted)

    def close(
        self, partition: int, entries: dict[int, Window], dirty: set[Any], stream_time: int
    ) -> Batch:
        closing = self.size + self.grace_ms
        due = sorted(start for start in entries if start + closing <= stream_time)
        emitted: list[Batch] = []
        for start in due:
            window = entries.pop(start)
            dirty.add(start)
            if self.emit == "final":
                emitted.append(self._results(start, window, sorted(window, key=repr)))
        return Batch.joined(emitted)

    def _results(self, start: int, window: Window, keys: list[Any]) -> Batch:
        end, count = start + self.size, len(keys)
        results = self.aggregation.results(list(map(window.__getitem__, keys)))
        values = list(map(Windowed, repeat(start, count), repeat(end, count), results))
        return Batch(keys, values, [end - 1] * count)


def _by_start(
    starts: list[int], keys: list[Any], values: list[Any]
) -> dict[int, tuple[list[Any], list[Any]]]:
    """Keys and values by window start. Records come in time order from each source
    partition, so equal starts come in runs: a C-level pass finds where runs change, and each
    run is copied with two slices."""
    if not starts:  # a batch of late records only
        return {}
    cuts = [0, *compress(range(1, len(starts)), map(ne, starts, islice(starts, 1, None)))]
    out: dict[int, tuple[list[Any], list[Any]]] = {}
    for begin, end in zip(cuts, [*cuts[1:], len(starts)], strict=True):
        start = starts[begin]
        run = out.get(start)
        if run is None:
            out[start] = (keys[begin:end], values[begin:end])
        else:
            run[0].extend(keys[begin:end])
            run[1].extend(values[begin:end])
    return out


def _row_count(entries: int) -> int:
    """Rows for a window of ``entries``: none when empty, else a power of two."""
    count = 1 if entries else 0
    while entries > count * ROW_ENTRIES:
        count *= 2
    return count
