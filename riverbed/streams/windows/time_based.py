"""Tumbling and hopping windows: fixed-size windows aligned to the epoch.

A tumbling window of size S covers ``[n*S, (n+1)*S)``; a hopping window of size S advancing by A
covers ``[n*A, n*A + S)``, so a record falls into S/A of them. State: one accumulator list per
(key, window start); an index of open windows by end time finds those stream time closes.

A window's entries are stored together, in rows of up to ``ROW_ENTRIES`` (a window of more keys
is spread over a power of two of rows by a hash of the key): a commit rewrites the rows of the
windows it changed, with one msgpack call per row, instead of a row per key, and closing a
window deletes its rows.
"""

from __future__ import annotations

import zlib
from typing import Any

import msgspec

from riverbed.errors import RiverbedError
from riverbed.streams.nodes import Item
from riverbed.streams.windows.base import Windowed, WindowNode, WindowSettings, grouped, ms

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


class FixedWindowNode(WindowNode[list[Any]]):
    def __init__(self, spec: Hopping, settings: WindowSettings) -> None:
        assert settings.aggregation is not None
        super().__init__(settings, settings.aggregation.state_type)
        self.size = spec.size_ms
        self.advance = spec.advance_ms
        # Per partition: window end -> the state keys (key, start) of open windows ending then.
        self._ends: dict[int, dict[int, set[tuple[Any, int]]]] = {}
        # Per partition: window start -> how many rows its entries are stored in.
        self._rows: dict[int, dict[int, int]] = {}
        self._row_key_decoder = msgspec.msgpack.Decoder(tuple[int, int, int])
        pair_type: Any = tuple.__class_getitem__((Any, settings.aggregation.state_type))
        self._row_decoder = msgspec.msgpack.Decoder(list[pair_type])
        self._hashes: dict[Any, int] = {}

    def restore(self, partition: int, rows: dict[bytes, bytes]) -> dict[Any, list[Any]]:
        entries: dict[Any, list[Any]] = {}
        counts: dict[int, int] = {}
        decode_row_key, decode_row = self._row_key_decoder.decode, self._row_decoder.decode
        for row_key, row in rows.items():
            start, _, count = decode_row_key(row_key)
            counts[start] = count
            entries.update(((key, start), accs) for key, accs in decode_row(row))
        self._rows[partition] = counts
        return entries

    def restored(self, partition: int, entries: dict[Any, list[Any]]) -> None:
        ends: dict[int, set[tuple[Any, int]]] = {}
        for state_key in entries:
            ends.setdefault(state_key[1] + self.size, set()).add(state_key)
        self._ends[partition] = ends

    def changed_rows(self, partition: int, dirty: set[Any]) -> dict[bytes, bytes | None]:
        encode = self._encoder.encode
        ends, counts = self._ends[partition], self._rows[partition]
        changed: dict[bytes, bytes | None] = {}
        for start in {start for _, start in dirty}:
            members = ends.get(start + self.size, set())
            stored, count = counts.get(start, 0), _row_count(len(members))
            if count == stored:
                if not count:
                    continue  # opened and closed between two commits: never stored
                rows = {self._row_of(key, count) for key, at in dirty if at == start}
            else:  # the window grew past its rows, or closed: its old rows go
                changed.update((encode((start, row, stored)), None) for row in range(stored))
                rows = set(range(count))
                counts[start] = count
                if not count:
                    del counts[start]
            for row, pairs in self._row_pairs(partition, members, count, rows).items():
                changed[encode((start, row, count))] = encode(pairs)
        return changed

    def _row_pairs(
        self, partition: int, members: set[tuple[Any, int]], count: int, rows: set[int]
    ) -> dict[int, list[tuple[Any, list[Any]]]]:
        """The (key, accumulators) pairs of a window's ``rows``, by row."""
        entries = self._entries[partition]
        if count == 1:
            return {0: [(state_key[0], entries[state_key]) for state_key in members]}
        pairs: dict[int, list[tuple[Any, list[Any]]]] = {row: [] for row in rows}
        for state_key in members:
            row_pairs = pairs.get(self._row_of(state_key[0], count))
            if row_pairs is not None:
                row_pairs.append((state_key[0], entries[state_key]))
        return pairs

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

    def reset(self, partitions: set[int] | None = None) -> None:
        super().reset(partitions)
        for partition in list(self._ends) if partitions is None else partitions:
            self._ends.pop(partition, None)
            self._rows.pop(partition, None)

    def process(
        self,
        partition: int,
        entries: dict[Any, list[Any]],
        dirty: set[Any],
        items: list[Item],
        times: list[int],
        stream_times: list[int],
    ) -> tuple[list[Item], list[Item]]:
        size, advance, grace = self.size, self.advance, self.grace_ms
        late: list[Item] = []
        state_keys: list[tuple[Any, int]] = []
        values: list[Any] = []
        if size == advance:
            starts = [ts - ts % size for ts in times]
            if min(starts) + size + grace > stream_times[-1]:
                # The common case, no record late: keys and values in C-level passes.
                state_keys = list(zip([item[0] for item in items], starts, strict=True))
                values = [item[1] for item in items]
                return self._fold(partition, entries, dirty, state_keys, values, late)
            for item, ts, now in zip(items, times, stream_times, strict=True):
                start = ts - ts % size
                if start + size + grace <= now:
                    late.append(item)
                else:
                    state_keys.append((item[0], start))
                    values.append(item[1])
        else:
            for item, ts, now in zip(items, times, stream_times, strict=True):
                start = ts - ts % advance
                placed = False
                while start > ts - size:
                    if start + size + grace > now:
                        state_keys.append((item[0], start))
                        values.append(item[1])
                        placed = True
                    start -= advance
                if not placed:
                    late.append(item)
        return self._fold(partition, entries, dirty, state_keys, values, late)

    def _fold(
        self,
        partition: int,
        entries: dict[Any, list[Any]],
        dirty: set[Any],
        state_keys: list[tuple[Any, int]],
        values: list[Any],
        late: list[Item],
    ) -> tuple[list[Item], list[Item]]:
        size = self.size
        ends = self._ends[partition]
        groups = grouped(state_keys, values)
        keys = list(groups)
        previous = [entries.get(key) for key in keys]
        for key, accs in zip(keys, previous, strict=True):
            if accs is None:
                ends.setdefault(key[1] + size, set()).add(key)
        entries.update(
            zip(keys, self.aggregation.fold(previous, list(groups.values())), strict=True)
        )
        dirty.update(keys)
        if self.emit == "update":
            return late, [self._result(k, entries[k]) for k in dict.fromkeys(state_keys)]
        return late, []

    def close(
        self, partition: int, entries: dict[Any, list[Any]], dirty: set[Any], stream_time: int
    ) -> list[Item]:
        ends = self._ends[partition]
        due = sorted(end for end in ends if end + self.grace_ms <= stream_time)
        emitted: list[Item] = []
        final = self.emit == "final"
        for end in due:
            for state_key in sorted(ends.pop(end), key=_start_then_key):
                accs = entries.pop(state_key)
                dirty.add(state_key)
                if final:
                    emitted.append(self._result(state_key, accs))
        return emitted

    def _result(self, state_key: tuple[Any, int], accs: list[Any]) -> Item:
        key, start = state_key
        end = start + self.size
        return key, Windowed(start, end, self.aggregation.result(accs)), end - 1


def _row_count(entries: int) -> int:
    """Rows for a window of ``entries``: none when empty, else a power of two."""
    count = 1 if entries else 0
    while entries > count * ROW_ENTRIES:
        count *= 2
    return count


def _start_then_key(state_key: tuple[Any, int]) -> tuple[int, str]:
    return state_key[1], repr(state_key[0])
