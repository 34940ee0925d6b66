"""The Stream DSL: ``app.stream(topic).filter(...).key_by(...).window(...).aggregate(...).to(out)``.

Each operator adds a node to the app's pipeline graph and returns a stream over it. Stateless
steps turn a whole batch into the next one with a C-level ``map`` over the column they read
(``filter`` then picks from each column), so a pipeline costs a few Python calls per batch per
step plus the user's function per record, not per record per layer. ``key_by`` writes to an
internal topic keyed by the new key, so all of a key's records meet in one partition, where
state lives.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterable
from typing import Any, Generic, Literal, TypeVar

from riverbed.errors import RiverbedError
from riverbed.streams.aggregate import AggregateNode
from riverbed.streams.aggregators import Aggregator, count, reducer
from riverbed.streams.joins import LEFT, RIGHT, IntervalJoinNode, JoinSideNode, Table, TableJoinNode
from riverbed.streams.nodes import (
    Batch,
    BranchNode,
    Node,
    RepartitionNode,
    SinkNode,
    StepNode,
    ToNode,
)
from riverbed.streams.topics import Topic
from riverbed.streams.topology import Topology
from riverbed.streams.windows import Windowed, WindowSpec
from riverbed.streams.windows.base import (
    Aggregation,
    Emit,
    TimestampFn,
    WindowNode,
    WindowSettings,
)

K = TypeVar("K")
V = TypeVar("V")
V2 = TypeVar("V2")
K2 = TypeVar("K2")
R = TypeVar("R")

UNKNOWN: Any = object()  # a value type the DSL cannot tell (after an unannotated map)
Late = Topic[Any, Any] | Callable[[Any, Any], None] | None


def _return_type(fn: Callable[..., Any]) -> Any:
    try:
        return typing.get_type_hints(fn).get("return", UNKNOWN)
    except Exception:  # unresolvable annotations: treat as unannotated
        return UNKNOWN


class Stream(Generic[K, V]):
    """A stream of keyed values; operators return new streams, ``to``/``sink`` end one."""

    def __init__(
        self, topology: Topology, node: Node, value_type: Any, partitions: int, origin: str
    ) -> None:
        self._topology = topology
        self.node = node
        self.value_type = value_type
        self.partitions = partitions
        self.origin = origin  # the topic the stream reads, for messages

    def _then(self, node: Node, value_type: Any = None) -> Stream[Any, Any]:
        self.node.children.append(node)
        return Stream(
            self._topology,
            node,
            self.value_type if value_type is None else value_type,
            self.partitions,
            self.origin,
        )

    def _step(self, step: Callable[[Batch], Batch], value_type: Any = None) -> Stream[Any, Any]:
        return self._then(StepNode(step), value_type)

    # Stateless

    def map(self, fn: Callable[[V], V2], value: type[V2] | None = None) -> Stream[K, V2]:
        """Replace each value with ``fn(value)``; ``value`` is its type if ``fn`` has no
        return annotation (needed to carry it through ``key_by``)."""
        return self._step(
            lambda batch: Batch(batch.keys, list(map(fn, batch.values)), batch.timestamps),
            value or _return_type(fn),
        )

    def filter(self, fn: Callable[[V], bool]) -> Stream[K, V]:
        """Keep the records whose value passes ``fn``."""
        return self._step(lambda batch: batch.select(list(map(fn, batch.values))))

    def flat_map(
        self, fn: Callable[[V], Iterable[V2]], value: type[V2] | None = None
    ) -> Stream[K, V2]:
        """Replace each value with the values ``fn(value)`` yields (none, one or many)."""
        return self._step(
            lambda batch: Batch.of((k, out, t) for k, v, t in batch for out in fn(v)),
            value or UNKNOWN,
        )

    def peek(self, fn: Callable[[K, V], None]) -> Stream[K, V]:
        """Call ``fn(key, value)`` for each record and pass it on unchanged."""

        def step(batch: Batch) -> Batch:
            for k, v in zip(batch.keys, batch.values, strict=True):
                fn(k, v)
            return batch

        return self._step(step)

    def branch(self, *predicates: Callable[[V], bool]) -> tuple[Stream[K, V], ...]:
        """One stream per predicate, plus a last one: each record goes to the first stream whose
        predicate it passes, or to the last if none."""
        if not predicates:
            raise RiverbedError("branch() needs at least one predicate")
        node = BranchNode(predicates)
        self.node.children.append(node)
        return tuple(
            Stream(self._topology, branch, self.value_type, self.partitions, self.origin)
            for branch in node.branches
        )

    def merge(self, *others: Stream[K, V]) -> Stream[K, V]:
        """One stream with the records of this one and ``others``."""
        merged = Node()
        for stream in (self, *others):
            stream.node.children.append(merged)
        partitions = max(s.partitions for s in (self, *others))
        return Stream(self._topology, merged, self.value_type, partitions, self.origin)

    # Repartitioning

    def key_by(
        self,
        fn: Callable[[V], K2],
        value: Any = None,
        partitions: int | None = None,
    ) -> Stream[K2, V]:
        """Re-key each record by ``fn(value)``, through an internal topic (``partitions``: its
        partition count, by default the stream's), so each key's records meet in one partition.

        Records cross the topic as msgpack; ``value`` is the values' type when the DSL cannot
        tell it (after ``map`` with an unannotated function).
        """
        value_type = self._known_value_type(value, "key_by")
        topic, source = self._topology.internal(
            "repartition", partitions or self.partitions, value_type
        )
        self._step(
            lambda batch: Batch(list(map(fn, batch.values)), batch.values, batch.timestamps)
        ).node.children.append(RepartitionNode(topic))
        return Stream(self._topology, source, value_type, topic.partitions, self.origin)

    def _known_value_type(
        self, value: Any, operator: str, why: str = "carry them through an internal topic"
    ) -> Any:
        if value is not None:
            return value
        if self.value_type is UNKNOWN:
            raise RiverbedError(
                f"{operator}() on the stream from '{self.origin}' needs the values' type to "
                f"{why}: pass {operator}(..., value=Type), or annotate the return type of the "
                "function given to map()"
            )
        return self.value_type

    # Stateful

    def window(
        self,
        spec: WindowSpec,
        timestamp: TimestampFn | None = None,
        grace: float = 0.0,
        late: Late = None,
        emit: Emit = "final",
        name: str | None = None,
    ) -> WindowedStream[K, V]:
        """Group records into event-time windows by key; follow with ``aggregate``/``reduce``/
        ``count``. ``timestamp(value)`` gives a record's event time in epoch milliseconds (by
        default the record's timestamp); a window closes once stream time passes its end plus
        ``grace`` seconds; records for closed windows go to ``late`` (a topic or a function
        called with key and value), else are dropped and counted; ``emit="final"`` emits each
        window once when it closes, ``"update"`` after every batch that changed it."""
        return WindowedStream(self, spec, timestamp, int(grace * 1000), late, emit, name)

    def aggregate(
        self,
        aggregator: Aggregator[Any, Any, Any] | None = None,
        /,
        name: str | None = None,
        **aggregators: Aggregator[Any, Any, Any],
    ) -> Stream[K, Any]:
        """A running aggregate per key (no window): emits each changed key's result per batch.

        ``aggregate(riverbed.count())`` emits the count; ``aggregate(n=riverbed.count(),
        total=riverbed.sum(lambda v: v.amount))`` emits ``{"n": ..., "total": ...}``.
        """
        aggregation = _aggregation(aggregator, aggregators)
        node = AggregateNode(name or self._topology.name("aggregate"), aggregation)
        self._topology.stateful_node(node, self.partitions)
        return self._then(node, UNKNOWN)

    def reduce(
        self, fn: Callable[[V, V], V], name: str | None = None, value: Any = None
    ) -> Stream[K, V]:
        """A running ``fn(accumulated, value)`` per key (``value``: the values' type, needed
        after a ``map`` whose function has no return annotation)."""
        return self.aggregate(reducer(fn, self._reduced_type(value)), name=name)

    def count(self, name: str | None = None) -> Stream[K, int]:
        return self.aggregate(count(), name=name)

    def _reduced_type(self, value: Any) -> Any:
        """The type a reduce keeps in its state, which it must decode as it was (a Struct came
        back from the store as a dict)."""
        return self._known_value_type(value, "reduce", "keep them in its state")

    # Joins

    def join(
        self,
        other: Stream[K, V2],
        fn: Callable[[V, V2], R],
        within: float,
        grace: float = 0.0,
        name: str | None = None,
    ) -> Stream[K, R]:
        """Pairs of records with the same key, one from each stream, at most ``within`` seconds
        apart in event time (the record timestamps): emits ``fn(left, right)`` for each pair.
        Records later than ``within + grace`` behind stream time are dropped."""
        left_type = self._known_value_type(None, "join")
        right_type = other._known_value_type(None, "join")
        partitions = max(self.partitions, other.partitions)
        topic, source = self._topology.internal("join", partitions, Any, joined=True)
        self.node.children.append(JoinSideNode(topic, LEFT))
        other.node.children.append(JoinSideNode(topic, RIGHT))
        node = IntervalJoinNode(
            name or self._topology.name("join-store"),
            int(within * 1000),
            int(grace * 1000),
            fn,
            left_type,
            right_type,
        )
        self._topology.stateful_node(node, partitions)
        source.children.append(node)
        return Stream(self._topology, node, _return_type(fn), partitions, self.origin)

    def join_table(
        self,
        table: Table,
        fn: Callable[[V, Any], R],
        on: Callable[[V], Any] | None = None,
        how: Literal["inner", "left"] = "inner",
    ) -> Stream[K, R]:
        """Each record joined with ``table``'s current value for its key (or for ``on(value)``):
        emits ``fn(value, table_value)``; records with no table value are dropped (``inner``) or
        joined with None (``left``)."""
        if how not in ("inner", "left"):
            raise RiverbedError(f"how must be 'inner' or 'left', got {how!r}")
        return self._then(TableJoinNode(table, fn, on, how), _return_type(fn))

    # Ends

    def to(self, topic: Topic[Any, Any]) -> Stream[K, V]:
        """Write the records to ``topic`` (encoded with its codecs)."""
        self.node.children.append(ToNode(topic))
        return self

    def sink(self, fn: Callable[[K, V], None]) -> Stream[K, V]:
        """Call ``fn(key, value)`` for each record that reaches the end of the pipeline.
        A sink is a side effect: it runs again for a batch that is retried."""
        self.node.children.append(SinkNode(fn))
        return self


class WindowedStream(Generic[K, V]):
    """A stream grouped into windows; ``aggregate``, ``reduce`` or ``count`` computes per window."""

    def __init__(
        self,
        stream: Stream[K, V],
        spec: WindowSpec,
        timestamp: TimestampFn | None,
        grace_ms: int,
        late: Late,
        emit: Emit,
        name: str | None,
    ) -> None:
        self._stream = stream
        self._spec = spec
        self._timestamp = timestamp
        self._grace_ms = grace_ms
        self._late = late
        self._emit = emit
        self._name = name

    def aggregate(
        self,
        aggregator: Aggregator[Any, Any, Any] | None = None,
        /,
        **aggregators: Aggregator[Any, Any, Any],
    ) -> Stream[K, Windowed[Any]]:
        """Aggregate each key's records per window: emits ``Windowed(start_ms, end_ms, value)``."""
        stream = self._stream
        topology = stream._topology
        late: Node | None = None
        if isinstance(self._late, Topic):
            late = ToNode(self._late)
        elif self._late is not None:
            late = SinkNode(self._late)
        node: WindowNode[Any] = self._spec.node(
            WindowSettings(
                self._name or topology.name(f"{self._spec.kind}-window"),
                _aggregation(aggregator, aggregators),
                self._timestamp,
                self._grace_ms,
                self._emit,
                late,
            )
        )
        topology.stateful_node(node, stream.partitions)
        return stream._then(node, UNKNOWN)

    def reduce(self, fn: Callable[[V, V], V], value: Any = None) -> Stream[K, Windowed[V]]:
        return self.aggregate(reducer(fn, self._stream._reduced_type(value)))

    def count(self) -> Stream[K, Windowed[int]]:
        return self.aggregate(count())


def _aggregation(
    aggregator: Aggregator[Any, Any, Any] | None, named: dict[str, Aggregator[Any, Any, Any]]
) -> Aggregation:
    if aggregator is not None and named:
        raise RiverbedError(
            "pass one aggregator, or several by name, not both: aggregate(riverbed.count()) or "
            "aggregate(n=riverbed.count(), total=riverbed.sum(...))"
        )
    return Aggregation(aggregator if aggregator is not None else named)
