"""Objects a state holds in two places, which a snapshot cannot keep.

A snapshot is the state's encoding: an object held under two attributes (a list of lines and an
index of the same lines by sku) loads back as two copies, and an event that changes it in one
place after the load leaves the other as it was, so the loaded state drifts from the one its
events build. Immutable values (numbers, strings, tuples, frozen Structs and dataclasses, enum
members) may be shared: no event changes them in place.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import uuid
from collections.abc import Iterable

import msgspec

_IMMUTABLE = (
    str, bytes, int, float, complex, type(None), decimal.Decimal, datetime.date, datetime.time,
    datetime.timedelta, uuid.UUID, enum.Enum,
)  # fmt: skip


def fields_of(value: object) -> tuple[str, ...] | None:
    """The fields of a Struct or dataclass instance, None for another value."""
    if isinstance(value, msgspec.Struct):
        return value.__struct_fields__
    if dataclasses.is_dataclass(value):
        return tuple(f.name for f in dataclasses.fields(value))
    return None


def shared_object(state: dict[str, object]) -> tuple[str, str] | None:
    """Two paths in ``state`` (``lines[0]``, ``by_sku['a']``) to one object that can change in
    place, if there are any. Paths are spelled out only then: the walk itself makes none."""
    seen: set[int] = set()  # the state holds them all, so no id is reused meanwhile
    walked: set[int] = set()  # unchangeable containers, walked once (a cycle ends)
    pending: list[object] = list(state.values())
    while pending:
        value = pending.pop()
        if isinstance(value, _IMMUTABLE):
            continue
        if _unchangeable(value):
            if id(value) in walked:
                continue
            walked.add(id(value))
        elif id(value) in seen:
            return _paths_to(state, value)
        else:
            seen.add(id(value))
        pending.extend(item for _, item in _children("", value))
    return None


def _paths_to(state: dict[str, object], target: object) -> tuple[str, str]:
    """The first two paths to ``target`` in ``state``, in attribute and item order."""
    found: list[str] = []
    walked: set[int] = set()
    pending: list[tuple[str, object]] = list(reversed(state.items()))
    while pending and len(found) < 2:
        path, value = pending.pop()
        if value is target:
            found.append(path)
        if not isinstance(value, _IMMUTABLE) and id(value) not in walked:
            walked.add(id(value))
            pending.extend(reversed(list(_children(path, value))))
    return found[0], found[1]


def _unchangeable(value: object) -> bool:
    if isinstance(value, tuple | frozenset):
        return True
    if isinstance(value, msgspec.Struct):
        return bool(value.__struct_config__.frozen)
    params = getattr(type(value), "__dataclass_params__", None)
    return bool(params is not None and params.frozen)


def _children(path: str, value: object) -> Iterable[tuple[str, object]]:
    if isinstance(value, list | tuple):
        return ((f"{path}[{index}]", item) for index, item in enumerate(value))
    if isinstance(value, dict):
        return ((f"{path}[{key!r}]", item) for key, item in value.items())
    if isinstance(value, set | frozenset):
        return ((f"{path} (an item)", item) for item in value)
    fields = fields_of(value)
    if fields is None:
        return ()
    return ((f"{path}.{name}", getattr(value, name)) for name in fields)
