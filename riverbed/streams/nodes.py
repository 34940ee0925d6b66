"""The nodes a pipeline is made of, and the context a batch flows through them with.

Pipelines form a graph: each node gets a whole batch of ``(key, value, timestamp_ms)`` items from
its parent with ``push`` and passes its results to its children. The runner pushes each polled
batch, one source partition at a time, into the source node of its topic; stateful nodes keep
their state per source partition.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from riverbed.log.api import Producer
from riverbed.log.partitioner import partition_for_key
from riverbed.serde.codecs import SerializationError
from riverbed.streams.topics import SCHEMA_VERSION_HEADER, Topic

if TYPE_CHECKING:
    from riverbed.streams.state.backend import Changes

# key, value, event time in milliseconds
Item = tuple[Any, Any, int]
PLACED_KEYS_LIMIT = 100_000


class Context:
    """What a batch of one source partition is processed with."""

    __slots__ = ("changes", "late", "loader", "partition", "producer", "touched")

    def __init__(
        self,
        producer: Producer,
        loader: Callable[[str, int], dict[bytes, bytes]],
    ) -> None:
        self.producer = producer
        self.loader = loader
        self.partition = 0
        self.touched: set[StatefulNode] = set()
        self.late = 0


class Node:
    """A step of a pipeline; ``push`` takes a batch, ``forward`` passes results on."""

    def __init__(self) -> None:
        self.children: list[Node] = []

    def push(self, items: list[Item], ctx: Context) -> None:
        self.forward(items, ctx)

    def forward(self, items: list[Item], ctx: Context) -> None:
        if items:
            for child in self.children:
                child.push(items, ctx)

    @property
    def terminal(self) -> bool:
        """Whether some path from here ends in a topic, a sink or an internal topic."""
        return any(child.terminal for child in self.children)


class StepNode(Node):
    """A stateless step: one function from batch to batch (map, filter, ...)."""

    def __init__(self, step: Callable[[list[Item]], list[Item]]) -> None:
        super().__init__()
        self.step = step

    def push(self, items: list[Item], ctx: Context) -> None:
        self.forward(self.step(items), ctx)


class BranchNode(Node):
    """Sends each item to the first branch whose predicate holds, else to the last branch."""

    def __init__(self, predicates: tuple[Callable[[Any], bool], ...]) -> None:
        super().__init__()
        self.predicates = predicates
        self.branches = [Node() for _ in range(len(predicates) + 1)]

    @property
    def terminal(self) -> bool:
        return any(branch.terminal for branch in self.branches)

    def push(self, items: list[Item], ctx: Context) -> None:
        buckets: list[list[Item]] = [[] for _ in self.branches]
        rest = len(self.predicates)
        for item in items:
            value = item[1]
            for index, predicate in enumerate(self.predicates):
                if predicate(value):
                    buckets[index].append(item)
                    break
            else:
                buckets[rest].append(item)
        for branch, bucket in zip(self.branches, buckets, strict=True):
            branch.forward(bucket, ctx)


class ToNode(Node):
    """Writes the items to a topic with its codecs (in the batch's transaction, if any)."""

    def __init__(self, topic: Topic[Any, Any]) -> None:
        super().__init__()
        self.topic = topic
        self.written = 0

    @property
    def terminal(self) -> bool:
        return True

    def push(self, items: list[Item], ctx: Context) -> None:
        topic = self.topic
        encode_key, encode_value = topic.key_codec.encode, topic.value_codec.encode
        headers = {}
        if topic.schema_version is not None:
            headers[SCHEMA_VERSION_HEADER] = str(topic.schema_version).encode()
        try:
            keys = [None if k is None else encode_key(k) for k, _, _ in items]
        except SerializationError as error:
            raise _mismatch(topic, "key", items[0][0], error) from error
        try:
            values = [encode_value(v) for _, v, _ in items]
        except SerializationError as error:
            raise _mismatch(topic, "value", items[0][1], error) from error
        ctx.producer.send_many(topic.name, list(zip(keys, values, strict=True)), headers=headers)
        self.written += len(items)


def _mismatch(topic: Topic[Any, Any], part: str, sample: Any, error: Exception) -> Exception:
    kind = type(sample).__name__
    hint = kind if part == "key" else f"{kind}, e.g. riverbed.Windowed[dict] after a window"
    return SerializationError(
        f"cannot write the pipeline's {part}s ({kind}) to topic '{topic.name}': {error}; "
        f"declare the topic with {part}=<their type> ({hint})"
    )


class SinkNode(Node):
    """Calls a user function with each item's key and value."""

    def __init__(self, fn: Callable[[Any, Any], None]) -> None:
        super().__init__()
        self.fn = fn

    @property
    def terminal(self) -> bool:
        return True

    def push(self, items: list[Item], ctx: Context) -> None:
        fn = self.fn
        for key, value, _ in items:
            fn(key, value)


class InternalTopic:
    """An app-owned topic between two parts of a pipeline (repartitioning, joins).

    Its records carry the event time with the value: ``msgpack([timestamp_ms, value])``, keyed
    by ``msgpack(key)``, so the next part sees the same keys, values and times.
    """

    def __init__(self, name: str, partitions: int, value_type: Any) -> None:
        self.name = name
        self.partitions = partitions
        self.value_type = value_type
        self.encoder = msgspec.msgpack.Encoder()
        self.key_decoder = msgspec.msgpack.Decoder()
        self.decoder = msgspec.msgpack.Decoder(tuple[int, value_type])


class RepartitionNode(Node):
    """Writes items to an internal topic keyed by their key: each key's items then meet in one
    partition, where the next part of the pipeline (often stateful) reads them."""

    def __init__(self, topic: InternalTopic) -> None:
        super().__init__()
        self.topic = topic
        # Keys repeat: their bytes and partition (Kafka's murmur2, as the producer would pick)
        # are computed once per key, and each partition's records go in one send_many.
        self._placed: dict[Any, tuple[bytes, int]] = {}

    @property
    def terminal(self) -> bool:
        return True

    def push(self, items: list[Item], ctx: Context) -> None:
        encode = self.topic.encoder.encode
        placed = self._placed
        by_partition: dict[int, list[tuple[bytes | None, bytes | None]]] = {}
        for key, value, ts in items:
            where = placed.get(key)
            if where is None:
                if len(placed) >= PLACED_KEYS_LIMIT:
                    placed.clear()
                key_bytes = encode(key)
                partition = partition_for_key(key_bytes, self.topic.partitions)
                where = placed[key] = (key_bytes, partition)
            pairs = by_partition.get(where[1])
            if pairs is None:
                pairs = by_partition[where[1]] = []
            pairs.append((where[0], encode((ts, value))))
        for partition, pairs in by_partition.items():
            ctx.producer.send_many(self.topic.name, pairs, partition=partition)


class StatefulNode(Node):
    """A node with state per source partition: loaded on first use, written at commit."""

    def __init__(self, store: str) -> None:
        super().__init__()
        self.store = store

    def changes(self) -> Changes:
        """The state changes since the last call, per (store, partition)."""
        raise NotImplementedError

    def snapshot(self) -> dict[Any, Any]:
        """The entries held in memory, over all partitions (for ``riverbed.testing``)."""
        raise NotImplementedError

    def reset(self, partitions: set[int] | None = None) -> None:
        """Forget in-memory state (of ``partitions``, or all): it is loaded again when next
        needed. After an aborted batch, and when partitions move to another worker."""
        raise NotImplementedError
