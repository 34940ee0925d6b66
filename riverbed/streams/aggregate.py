"""Aggregation without windows: a running result per key (a table, in Kafka Streams' terms).

After each batch, every key the batch touched emits its current result once.
"""

from __future__ import annotations

from typing import Any

from riverbed.streams.nodes import EMPTY, Batch, grouped
from riverbed.streams.windows.base import (
    Aggregation,
    WindowNode,
    WindowSettings,
    stream_time_after,
)


class AggregateNode(WindowNode[tuple[Any, ...]]):
    def __init__(self, store: str, aggregation: Aggregation) -> None:
        super().__init__(WindowSettings(store, aggregation), aggregation.state_type)

    def process(
        self,
        partition: int,
        entries: dict[Any, tuple[Any, ...]],
        dirty: set[Any],
        batch: Batch,
        times: list[int],
        before: int,
    ) -> tuple[Batch, Batch]:
        groups = grouped(batch.keys, batch.values)
        keys = list(groups)
        folded = self.aggregation.fold(list(map(entries.get, keys)), list(groups.values()))
        entries.update(zip(keys, folded, strict=True))
        dirty.update(keys)
        results = self.aggregation.results(folded)
        return EMPTY, Batch(keys, results, [stream_time_after(before, times)] * len(keys))

    def close(
        self, partition: int, entries: dict[Any, tuple[Any, ...]], dirty: set[Any], stream_time: int
    ) -> Batch:
        return EMPTY
