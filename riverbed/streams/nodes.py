"""The nodes a pipeline is made of, and the context a batch flows through them with.

Pipelines form a graph: each node gets a whole ``Batch`` from its parent with ``push`` and passes
its results to its children. The runner pushes each polled batch, one source partition at a time,
into the source node of its topic; stateful nodes keep their state per source partition.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain, compress
from typing import TYPE_CHECKING, Any

import msgspec

from riverbed.log.api import Producer
from riverbed.log.partitioner import partition_for_key
from riverbed.serde.codecs import SerializationError
from riverbed.streams.topics import SCHEMA_VERSION_HEADER, Topic

if TYPE_CHECKING:
    from riverbed.streams.state.backend import Changes

# key, value, event time in milliseconds: one record of a batch, where a loop needs one
Item = tuple[Any, Any, int]
PLACED_KEYS_LIMIT = 100_000
# A repartition record's value stays well below the default record size limit (1 MiB).
RUN_RECORD_BYTES = 256 * 1024


def hashable(decoded: Any) -> Any:
    """A key decoded from msgpack as the hashable key it was: its arrays (lists) become
    tuples, nested ones too."""
    return tuple(map(hashable, decoded)) if type(decoded) is list else decoded


class Batch:
    """Records as three columns: keys, values and event times (ms), in order.

    Columns instead of a tuple per record: a step that changes one column (``map``, ``key_by``)
    makes one list with a C-level ``map`` and shares the other two, and nothing allocates an
    object per record that it does not need. A batch, like its lists, is never changed in place:
    children of one node get the same batch.
    """

    __slots__ = ("keys", "timestamps", "values")

    def __init__(self, keys: list[Any], values: list[Any], timestamps: list[int]) -> None:
        self.keys = keys
        self.values = values
        self.timestamps = timestamps

    @classmethod
    def of(cls, items: Iterable[Item]) -> Batch:
        """A batch from ``(key, value, timestamp_ms)`` items."""
        columns = tuple(zip(*items, strict=True))
        if not columns:
            return EMPTY
        keys, values, timestamps = columns
        return cls(list(keys), list(values), list(timestamps))

    @classmethod
    def joined(cls, batches: Sequence[Batch]) -> Batch:
        """The records of ``batches``, one after the other."""
        if len(batches) <= 1:
            return batches[0] if batches else EMPTY
        return cls(
            list(chain.from_iterable(batch.keys for batch in batches)),
            list(chain.from_iterable(batch.values for batch in batches)),
            list(chain.from_iterable(batch.timestamps for batch in batches)),
        )

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[Item]:
        return zip(self.keys, self.values, self.timestamps, strict=True)

    def select(self, keep: Sequence[object]) -> Batch:
        """The records whose ``keep`` entry is true."""
        return Batch(
            list(compress(self.keys, keep)),
            list(compress(self.values, keep)),
            list(compress(self.timestamps, keep)),
        )

    def take(self, indexes: Sequence[int]) -> Batch:
        """The records at ``indexes``, in their order."""
        return Batch(
            list(map(self.keys.__getitem__, indexes)),
            list(map(self.values.__getitem__, indexes)),
            list(map(self.timestamps.__getitem__, indexes)),
        )


EMPTY = Batch([], [], [])


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

    def push(self, batch: Batch, ctx: Context) -> None:
        self.forward(batch, ctx)

    def forward(self, batch: Batch, ctx: Context) -> None:
        if batch.keys:
            for child in self.children:
                child.push(batch, ctx)

    @property
    def terminal(self) -> bool:
        """Whether some path from here ends in a topic, a sink or an internal topic."""
        return any(child.terminal for child in self.children)


class StepNode(Node):
    """A stateless step: one function from batch to batch (map, filter, ...)."""

    def __init__(self, step: Callable[[Batch], Batch]) -> None:
        super().__init__()
        self.step = step

    def push(self, batch: Batch, ctx: Context) -> None:
        self.forward(self.step(batch), ctx)


class BranchNode(Node):
    """Sends each record to the first branch whose predicate holds, else to the last branch."""

    def __init__(self, predicates: tuple[Callable[[Any], bool], ...]) -> None:
        super().__init__()
        self.predicates = predicates
        self.branches = [Node() for _ in range(len(predicates) + 1)]

    @property
    def terminal(self) -> bool:
        return any(branch.terminal for branch in self.branches)

    def push(self, batch: Batch, ctx: Context) -> None:
        buckets: list[list[int]] = [[] for _ in self.branches]
        rest = len(self.predicates)
        for index, value in enumerate(batch.values):
            for chosen, predicate in enumerate(self.predicates):
                if predicate(value):
                    buckets[chosen].append(index)
                    break
            else:
                buckets[rest].append(index)
        for branch, indexes in zip(self.branches, buckets, strict=True):
            branch.forward(batch.take(indexes), ctx)


class ToNode(Node):
    """Writes the records to a topic with its codecs (in the batch's transaction, if any),
    stamped with their event times."""

    def __init__(self, topic: Topic[Any, Any]) -> None:
        super().__init__()
        self.topic = topic
        self.written = 0

    @property
    def terminal(self) -> bool:
        return True

    def push(self, batch: Batch, ctx: Context) -> None:
        topic = self.topic
        headers = {}
        if topic.schema_version is not None:
            headers[SCHEMA_VERSION_HEADER] = str(topic.schema_version).encode()
        try:
            keys: Sequence[bytes | None]
            if None in batch.keys:  # records without a key stay without one
                encode_key = topic.key_codec.encode
                keys = [None if k is None else encode_key(k) for k in batch.keys]
            else:
                keys = topic.key_codec.encode_many(batch.keys)
        except SerializationError as error:
            raise _mismatch(topic, "key", batch.keys[0], error) from error
        try:
            values = topic.value_codec.encode_many(batch.values)
        except SerializationError as error:
            raise _mismatch(topic, "value", batch.values[0], error) from error
        # Each record keeps its event time as its timestamp, as Kafka Streams' to() does: a
        # pipeline reading the topic windows by it (one before 1970 is stamped now).
        times = batch.timestamps
        ctx.producer.send_many(
            topic.name,
            list(zip(keys, values, strict=True)),
            headers=headers,
            timestamps=times if min(times, default=1) > 0 else None,
        )
        self.written += len(keys)


def _mismatch(topic: Topic[Any, Any], part: str, sample: Any, error: Exception) -> Exception:
    kind = type(sample).__name__
    hint = kind if part == "key" else f"{kind}, e.g. riverbed.Windowed[dict] after a window"
    return SerializationError(
        f"cannot write the pipeline's {part}s ({kind}) to topic '{topic.name}': {error}; "
        f"declare the topic with {part}=<their type> ({hint})"
    )


class SinkNode(Node):
    """Calls a user function with each record's key and value."""

    def __init__(self, fn: Callable[[Any, Any], None]) -> None:
        super().__init__()
        self.fn = fn

    @property
    def terminal(self) -> bool:
        return True

    def push(self, batch: Batch, ctx: Context) -> None:
        fn = self.fn
        for key, value in zip(batch.keys, batch.values, strict=True):
            fn(key, value)


class InternalTopic:
    """An app-owned topic between two parts of a pipeline (repartitioning, joins)."""

    def __init__(self, name: str, partitions: int, value_type: Any) -> None:
        self.name = name
        self.partitions = partitions
        self.value_type = value_type
        self.encoder = msgspec.msgpack.Encoder()


class RepartitionNode(Node):
    """Writes records to an internal topic by their key: each key's records then meet in one
    partition, where the next part of the pipeline (often stateful) reads them.

    A key goes to the partition that murmur2 of its msgpack encoding picks, as for a keyed
    record. A record carries a run of the batch for its partition, as columns: ``msgpack([keys,
    values, timestamps_ms])`` with no record key, so that encoding and decoding cost one msgspec
    call per run, not a few Python calls per record, and the log stores one record per run.
    """

    def __init__(self, topic: InternalTopic) -> None:
        super().__init__()
        self.topic = topic
        self.written = 0  # records (runs of items) sent, for the records-out metric
        # Keys repeat: each one's partition is computed once.
        self._placed: dict[Any, int] = {}

    @property
    def terminal(self) -> bool:
        return True

    def push(self, batch: Batch, ctx: Context) -> None:
        partitions = list(map(self._placed.get, batch.keys))
        if None in partitions:  # keys not seen before
            place = self._place
            partitions = [
                place(key) if partition is None else partition
                for key, partition in zip(batch.keys, partitions, strict=True)
            ]
        runs = grouped(partitions, range(len(partitions)))
        name, send_many = self.topic.name, ctx.producer.send_many
        for partition, indexes in runs.items():
            run = batch if len(runs) == 1 else batch.take(indexes)
            values = self._encode(run)
            send_many(name, [(None, value) for value in values], partition=partition)
            self.written += len(values)

    def _place(self, key: Any) -> int:
        if len(self._placed) >= PLACED_KEYS_LIMIT:
            self._placed.clear()
        encoded = self.topic.encoder.encode(key)
        partition = self._placed[key] = partition_for_key(encoded, self.topic.partitions)
        return partition

    def _encode(self, run: Batch) -> list[bytes]:
        """The run as record values of at most RUN_RECORD_BYTES (but never less than one
        record: a bigger one meets the topic's record size limit like any other record)."""
        encoded = self.topic.encoder.encode((run.keys, run.values, run.timestamps))
        if len(encoded) <= RUN_RECORD_BYTES or len(run) == 1:
            return [encoded]
        half = len(run) // 2
        first, second = range(half), range(half, len(run))
        return self._encode(run.take(first)) + self._encode(run.take(second))


def grouped(keys: Sequence[Any], values: Iterable[Any]) -> dict[Any, list[Any]]:
    """Values by key, in arrival order. A Python loop here would cost a few bytecodes per value;
    the lists are made once per distinct key and filled by C-level ``map``s instead."""
    groups: dict[Any, list[Any]] = {key: [] for key in dict.fromkeys(keys)}
    deque(map(list.append, map(groups.__getitem__, keys), values), maxlen=0)
    return groups


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
