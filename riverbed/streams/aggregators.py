"""Aggregators for ``aggregate``: count, sum, min, max, mean, collect, latest, and your own.

An aggregator folds values into an accumulator a whole group at a time (``add_many`` gets every
value of one key and window in the batch), so the built-ins cost one C-level call per group, not
a Python call per record. Accumulators are stored in state with msgpack, typed by ``state_type``;
``merge`` combines two accumulators, which session and sliding windows need.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from riverbed.errors import RiverbedError

V = TypeVar("V")
A = TypeVar("A")
R = TypeVar("R")

Getter = Callable[[Any], Any]


class Aggregator(Generic[V, A, R]):
    """A fold: ``initial()``, then ``add(acc, value)`` per value, ``result(acc)`` to emit.

    ``add_many(acc, values)`` may replace ``add`` for speed; ``merge(a, b)`` is needed by session
    and sliding windows; ``state_type`` is the accumulator's type for storage (default ``Any``:
    stored as msgpack builtins).
    """

    def __init__(
        self,
        initial: Callable[[], A],
        add: Callable[[A, V], A] | None = None,
        result: Callable[[A], R] | None = None,
        merge: Callable[[A, A], A] | None = None,
        add_many: Callable[[A, Sequence[V]], A] | None = None,
        state_type: Any = Any,
        name: str = "aggregator",
        add_groups: Callable[[list[A], Sequence[Sequence[V]]], list[A]] | None = None,
    ) -> None:
        if add is None and add_many is None:
            raise RiverbedError(f"aggregator '{name}' needs add(acc, value) or add_many")
        self.initial = initial
        self._add = add
        self._add_many = add_many
        self._add_groups = add_groups
        self.result: Callable[[A], R] = result or _identity
        self._merge = merge
        self.state_type = state_type
        self.name = name

    def add_many(self, acc: A, values: Sequence[V]) -> A:
        if self._add_many is not None:
            return self._add_many(acc, values)
        add = self._add
        assert add is not None
        for value in values:
            acc = add(acc, value)
        return acc

    def add_groups(self, accs: list[A], groups: Sequence[Sequence[V]]) -> list[A]:
        """``add_many`` for many (accumulator, values) pairs at once: one comprehension over a
        batch's groups, for the built-ins, instead of a few Python calls per group."""
        if self._add_groups is not None:
            return self._add_groups(accs, groups)
        add_many = self.add_many
        return [add_many(acc, values) for acc, values in zip(accs, groups, strict=True)]

    @property
    def plain_result(self) -> bool:
        """Whether ``result(acc)`` is the accumulator itself (count, sum and the like)."""
        return self.result is _identity

    @property
    def mergeable(self) -> bool:
        return self._merge is not None

    def merge(self, left: A, right: A) -> A:
        if self._merge is None:
            raise RiverbedError(
                f"aggregator '{self.name}' has no merge(a, b), which session and sliding "
                "windows need to combine partial results; pass merge= to Aggregator"
            )
        return self._merge(left, right)


def _identity(acc: Any) -> Any:
    return acc


def _values(values: Sequence[Any], field: Getter | None) -> Sequence[Any] | map[Any]:
    return values if field is None else map(field, values)


def count() -> Aggregator[Any, int, int]:
    """How many records."""
    return Aggregator(
        int,
        add_many=lambda acc, values: acc + len(values),
        merge=lambda a, b: a + b,
        state_type=int,
        name="count",
        add_groups=lambda accs, groups: [a + len(g) for a, g in zip(accs, groups, strict=True)],
    )


def sum(field: Getter | None = None) -> Aggregator[Any, float, float]:
    """The sum of ``field(value)`` (or of the values)."""

    def add_groups(accs: list[Any], groups: Sequence[Sequence[Any]]) -> list[Any]:
        total = builtins.sum
        if field is None:
            return [a + total(g) for a, g in zip(accs, groups, strict=True)]
        return [a + total(map(field, g)) for a, g in zip(accs, groups, strict=True)]

    return Aggregator(
        int,
        add_many=lambda acc, values: acc + builtins.sum(_values(values, field)),
        merge=lambda a, b: a + b,
        state_type=float | int,
        name="sum",
        add_groups=add_groups,
    )


def min(field: Getter | None = None) -> Aggregator[Any, Any, Any]:
    """The smallest ``field(value)`` (or value)."""
    return _extreme(builtins.min, field, "min")


def max(field: Getter | None = None) -> Aggregator[Any, Any, Any]:
    """The largest ``field(value)`` (or value)."""
    return _extreme(builtins.max, field, "max")


def _extreme(
    pick: Callable[..., Any], field: Getter | None, name: str
) -> Aggregator[Any, Any, Any]:
    def add_many(acc: Any, values: Sequence[Any]) -> Any:
        best = pick(_values(values, field))
        return best if acc is None else pick(acc, best)

    def merge(a: Any, b: Any) -> Any:
        return b if a is None else a if b is None else pick(a, b)

    return Aggregator(lambda: None, add_many=add_many, merge=merge, name=name)


def mean(field: Getter | None = None) -> Aggregator[Any, list[float], float | None]:
    """The arithmetic mean of ``field(value)`` (or of the values); None before any value."""

    def add_many(acc: list[float], values: Sequence[Any]) -> list[float]:
        return [acc[0] + builtins.sum(_values(values, field)), acc[1] + len(values)]

    return Aggregator(
        lambda: [0, 0],
        add_many=add_many,
        result=lambda acc: acc[0] / acc[1] if acc[1] else None,
        merge=lambda a, b: [a[0] + b[0], a[1] + b[1]],
        state_type=list[float],
        name="mean",
    )


def collect(
    field: Getter | None = None, state_type: Any = Any
) -> Aggregator[Any, list[Any], list[Any]]:
    """Every ``field(value)`` (or value), in arrival order. ``state_type``: their type."""
    return Aggregator(
        list,
        add_many=lambda acc, values: [*acc, *_values(values, field)],
        merge=lambda a, b: [*a, *b],
        state_type=list[state_type],
        name="collect",
    )


def latest(field: Getter | None = None, state_type: Any = Any) -> Aggregator[Any, Any, Any]:
    """The last ``field(value)`` (or value) to arrive. ``state_type``: its type."""
    return Aggregator(
        lambda: None,
        add_many=lambda acc, values: field(values[-1]) if field else values[-1],
        merge=lambda a, b: a if b is None else b,
        state_type=state_type | None,
        name="latest",
    )


def reducer(fn: Callable[[Any, Any], Any], state_type: Any = Any) -> Aggregator[Any, Any, Any]:
    """``reduce(fn)``: the first value, then ``fn(acc, value)`` for each next one."""

    def add(acc: Any, value: Any) -> Any:
        return value if acc is None else fn(acc, value)

    return Aggregator(
        lambda: None,
        add=add,
        merge=lambda a, b: b if a is None else a if b is None else fn(a, b),
        state_type=state_type | None,
        name="reduce",
    )
