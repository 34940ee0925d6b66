"""An app's pipelines as a graph: source nodes per topic, internal topics, stateful nodes.

Names of internal topics and state stores come from the order pipelines are declared in
(``<app>-repartition-0``, ``<app>-window-1``, ...), so every worker of an app, running the same
code, agrees on them, as Kafka Streams' generated names do.
"""

from __future__ import annotations

from typing import Any

import msgspec

from riverbed.errors import RiverbedError
from riverbed.log.api import Record
from riverbed.streams.joins import Table
from riverbed.streams.nodes import Batch, InternalTopic, Item, Node, StatefulNode, hashable
from riverbed.streams.topics import Topic


class SourceNode(Node):
    """Where a topic's records enter the graph."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


class TopicSource(SourceNode):
    """A user topic; the runner decodes its records with the topic's codecs (and dead-letters
    those that do not decode)."""

    def __init__(self, topic: Topic[Any, Any]) -> None:
        super().__init__(topic.name)
        self.topic = topic


class InternalSource(SourceNode):
    """An internal topic: runs of repartitioned records as columns (see ``RepartitionNode``),
    or one side of a join per record."""

    def __init__(self, topic: InternalTopic, joined: bool) -> None:
        super().__init__(topic.name)
        self._decode_key = msgspec.msgpack.Decoder().decode
        self._decode_joined = msgspec.msgpack.Decoder(tuple[int, int, msgspec.Raw]).decode
        values_type: Any = list.__class_getitem__(topic.value_type)
        run_type: Any = tuple.__class_getitem__((list[Any], values_type, list[int]))
        self._decode_run = msgspec.msgpack.Decoder(run_type).decode
        self._joined = joined

    def batch(self, records: list[Record]) -> Batch:
        if self._joined:
            decode_key = self._decode_key
            items: list[Item] = []
            for record in records:
                ts, side, raw = self._decode_joined(record.value or b"")
                items.append((hashable(decode_key(record.key or b"")), (side, bytes(raw)), ts))
            return Batch.of(items)
        batches = []
        for keys, values, times in map(self._decode_run, [r.value or b"" for r in records]):
            # A composite (tuple) key crossed as an array.
            hashable_keys = list(map(hashable, keys)) if list in {*map(type, keys)} else keys
            batches.append(Batch(hashable_keys, values, times))
        return batches[0] if len(batches) == 1 else Batch.joined(batches)


class Topology:
    def __init__(self, app: str) -> None:
        self.app = app
        self.sources: dict[str, SourceNode] = {}
        self.internal_topics: dict[str, InternalTopic] = {}
        self.stateful: dict[str, StatefulNode] = {}
        self.store_partitions: dict[str, int] = {}
        self.tables: dict[str, Table] = {}
        self._counter = 0

    def name(self, kind: str) -> str:
        name = f"{self.app}-{kind}-{self._counter}"
        self._counter += 1
        return name

    def source(self, topic: Topic[Any, Any]) -> SourceNode:
        node = self.sources.get(topic.name)
        if node is None:
            node = self.sources[topic.name] = TopicSource(topic)
        return node

    def internal(
        self, kind: str, partitions: int, value_type: Any, joined: bool = False
    ) -> tuple[InternalTopic, InternalSource]:
        topic = InternalTopic(self.name(kind), partitions, value_type)
        self.internal_topics[topic.name] = topic
        source = InternalSource(topic, joined)
        self.sources[topic.name] = source
        return topic, source

    def stateful_node(self, node: StatefulNode, partitions: int) -> None:
        if node.store in self.stateful:
            raise RiverbedError(
                f"state store '{node.store}' is declared twice in app '{self.app}'; "
                "give each stateful step its own name="
            )
        self.stateful[node.store] = node
        self.store_partitions[node.store] = partitions

    def table(self, topic: Topic[Any, Any]) -> Table:
        table = self.tables.get(topic.name)
        if table is None:
            table = self.tables[topic.name] = Table(topic)
        return table

    def running_sources(self) -> dict[str, SourceNode]:
        """The sources from which some path ends in a topic, a sink or an internal topic."""
        return {name: node for name, node in self.sources.items() if node.terminal}
