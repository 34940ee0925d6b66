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
# A repartition record's value stays well below the default record size limit (1 MiB).
RUN_RECORD_BYTES = 256 * 1024


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
    """An app-owned topic between two parts of a pipeline (repartitioning, joins)."""

    def __init__(self, name: str, partitions: int, value_type: Any) -> None:
        self.name = name
        self.partitions = partitions
        self.value_type = value_type
        self.encoder = msgspec.msgpack.Encoder()


class RepartitionNode(Node):
    """Writes items to an internal topic by their key: each key's items then meet in one
    partition, where the next part of the pipeline (often stateful) reads them.

    A key goes to the partition that murmur2 of its msgpack encoding picks, as for a keyed
    record. A record carries a run of items for its partition, ``msgpack([[key, value,
    timestamp_ms], ...])`` with no record key, so that encoding and decoding cost one msgspec
    call per run, not a few Python calls per item, and the log stores one record per run.
    """

    def __init__(self, topic: InternalTopic) -> None:
        super().__init__()
        self.topic = topic
        # Keys repeat: each one's partition is computed once.
        self._placed: dict[Any, int] = {}

    @property
    def terminal(self) -> bool:
        return True

    def push(self, items: list[Item], ctx: Context) -> None:
        placed = self._placed
        runs: dict[int, list[Item]] = {}
        for item in items:
            partition = placed.get(item[0])
            if partition is None:
                partition = self._place(item[0])
            run = runs.get(partition)
            if run is None:
                runs[partition] = [item]
            else:
                run.append(item)
        name, send_many = self.topic.name, ctx.producer.send_many
        for partition, run in runs.items():
            send_many(name, [(None, value) for value in self._encode(run)], partition=partition)

    def _place(self, key: Any) -> int:
        if len(self._placed) >= PLACED_KEYS_LIMIT:
            self._placed.clear()
        encoded = self.topic.encoder.encode(key)
        partition = self._placed[key] = partition_for_key(encoded, self.topic.partitions)
        return partition

    def _encode(self, run: list[Item]) -> list[bytes]:
        """The run as record values of at most RUN_RECORD_BYTES (but never less than one
        item: a bigger one meets the topic's record size limit like any other record)."""
        encoded = self.topic.encoder.encode(run)
        if len(encoded) <= RUN_RECORD_BYTES or len(run) == 1:
            return [encoded]
        half = len(run) // 2
        return self._encode(run[:half]) + self._encode(run[half:])


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
