"""Aggregation without windows: a running result per key (a table, in Kafka Streams' terms).

After each batch, every key the batch touched emits its current result once.
"""

from __future__ import annotations

from typing import Any

from riverbed.streams.nodes import Item
from riverbed.streams.windows.base import Aggregation, WindowNode, WindowSettings, grouped


class AggregateNode(WindowNode[tuple[Any, ...]]):
    def __init__(self, store: str, aggregation: Aggregation) -> None:
        super().__init__(WindowSettings(store, aggregation), aggregation.state_type)

    def process(
        self,
        partition: int,
        entries: dict[Any, tuple[Any, ...]],
        dirty: set[Any],
        items: list[Item],
        times: list[int],
        stream_times: list[int],
    ) -> tuple[list[Item], list[Item]]:
        result = self.aggregation.result
        groups = grouped([k for k, _, _ in items], [v for _, v, _ in items])
        keys = list(groups)
        folded = self.aggregation.fold([entries.get(k) for k in keys], list(groups.values()))
        entries.update(zip(keys, folded, strict=True))
        dirty.update(keys)
        return [], [(key, result(entries[key]), stream_times[-1]) for key in groups]

    def close(
        self, partition: int, entries: dict[Any, tuple[Any, ...]], dirty: set[Any], stream_time: int
    ) -> list[Item]:
        return []
