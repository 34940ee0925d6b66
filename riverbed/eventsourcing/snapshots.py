"""Snapshots: an aggregate's attributes, typed by its class annotations, so custom types
(Structs, dataclasses, datetimes, Decimals) come back as themselves; taken after a save, sealed
with the stream's key, used on load.

The snapshot's schema is a fingerprint of the class's code (the bodies that build the state from
events), of its annotations and the shape of their types, and of its events' versions: after any
of them changes, old snapshots are ignored and the aggregate is replayed from its events instead
of loading wrong. A state that would not load back equal (an attribute of a custom type with no
annotation comes back as a dict) or does not encode at all gets no snapshot: loading then replays
the events, and a warning names the attributes. A snapshot never fails a save.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import math
import re
import sys
import time
import types
import typing
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import msgspec

from riverbed.eventsourcing.aggregate import Aggregate, snapshot_every, stored_name
from riverbed.eventsourcing.codec import (
    ENCODER,
    EventType,
    dec_hook,
    has_fields,
    registry,
    seal,
    unseal,
)
from riverbed.eventsourcing.errors import UnknownEventTypeError
from riverbed.eventsourcing.records import Snapshot
from riverbed.eventsourcing.sharing import fields_of, shared_object
from riverbed.eventsourcing.sources import digest_read_at_import

A = TypeVar("A", bound=Aggregate)
log = logging.getLogger("riverbed.events")
_snapshot_decoder = msgspec.msgpack.Decoder(dict[str, Any])

# What every aggregate has besides its state.
_NOT_STATE = frozenset(
    {
        "id",
        "version",
        "_pending",
        "_applying",
        "_decrypted_with",
        "_riverbed_body_raised",
        "_riverbed_triggered",
    }
)


def _state_hints(cls: type[Aggregate]) -> tuple[dict[str, Any], int]:
    """The annotated attributes of ``cls`` and the fingerprint of its snapshots' schema."""
    cached = cls.__dict__.get("_riverbed_state")
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    hints = {
        name: hint
        for name, hint in typing.get_type_hints(cls).items()
        if name not in _NOT_STATE and typing.get_origin(hint) is not typing.ClassVar
    }
    schema = _digest(_fingerprinted(cls, hints))
    cls._riverbed_state = (hints, schema)  # type: ignore[attr-defined]
    return hints, schema


def _fingerprinted(cls: type[Aggregate], hints: dict[str, Any]) -> list[str]:
    """What a snapshot of ``cls`` depends on: the code of the class, its bases and mixins, its
    annotated attributes' types (the types of their fields, their bases), and the explicit
    event classes its methods name (any change there, in its methods, their defaults and
    decorators, the events' versions, annotations and ``apply``, replays instead of loading a
    state the new code would not build), and its events' versions and upcasters. A module's
    code is its source file's digest, read as the aggregate's module was imported; a module
    first met later (its file may have been replaced since the process imported it), or one
    without a file, is described by its classes' bytecode and values. Other code the methods
    (or upcasters) call in other modules is not covered: bump an event's version when such a
    change alters the state."""
    parts: set[str] = set()
    classes = [base for base in cls.__mro__ if base not in (cls.__mro__[-1], Aggregate)]
    triggered = _event_classes_named(classes)
    recorded = registry.recorded_by(cls)
    # The types of the events' fields too: what the events carry is built by their code.
    payloads = [t for e in recorded for t in typing.get_type_hints(e.cls).values()]
    classes += _with_bases(_classes_in([*hints.values(), *payloads]) + triggered)
    parts.update(_code_of(classes, cls.__module__))
    entries = [*recorded, *map(registry.of_class, triggered)]
    parts.update(f"{entry.name} v{entry.version}" for entry in entries)
    parts.update(part for entry in entries for part in _upcasters_of(entry))
    # Snapshots of before they named the DomainEvent classes their state applied (any code may
    # trigger one) cannot say what they depend on: ignored once, taken afresh.
    parts.add("snapshot format 2")
    return sorted(parts)


def _code_of(classes: list[type[Any]], aggregate_module: str) -> set[str]:
    """What describes the code of ``classes`` for an aggregate of ``aggregate_module``: their
    modules' source digests, or, for modules not read at its import or without files, their
    attributes from memory."""
    parts: set[str] = set()
    for module in {c.__module__ for c in classes}:
        # The file's digest, not the module's name: a script's classes (in __main__) take and
        # use the same snapshots as when a worker imports the script as a module.
        digest = digest_read_at_import(module, aggregate_module)
        if digest is not None:
            parts.add(f"source {digest}")
            continue
        for c in (c for c in classes if c.__module__ == module):
            parts.update(f"{c.__qualname__}.{name} = {_behaviour(value)}"
                         for name, value in _attributes(c))  # fmt: skip
    return parts


# A snapshot's key for the names of the DomainEvent classes its state applied.
_EVENT_CLASSES = "__riverbed_event_classes__"


def _schema(cls: type[Aggregate], event_classes: Collection[str]) -> int | None:
    """The schema of a snapshot of ``cls`` whose state applied the DomainEvent classes named
    ``event_classes`` (any code may trigger them, so the class's own fingerprint may not cover
    them): their code and versions too. None if one is no longer registered."""
    schema = _state_hints(cls)[1]
    if not event_classes:
        return schema
    parts = [str(schema)]
    for name in sorted(event_classes):
        try:
            parts.append(_event_class_fingerprint(registry.named(name), cls.__module__))
        except UnknownEventTypeError:
            return None
    return _digest(parts)


def _event_class_fingerprint(entry: EventType, aggregate_module: str) -> str:
    cache: dict[str, str] = entry.__dict__.setdefault("_riverbed_fingerprints", {})
    cached = cache.get(aggregate_module)
    if cached is None:
        fields = list(typing.get_type_hints(entry.cls).values())
        classes = _with_bases([entry.cls, *_classes_in(fields)])
        code = sorted(_code_of(classes, aggregate_module))
        cache[aggregate_module] = cached = json.dumps(
            [f"{entry.name} v{entry.version}", *_upcasters_of(entry), *code]
        )
    return cached


def _upcasters_of(entry: EventType) -> list[str]:
    """An event's upcasters, as old events load through them: their code and defaults, wherever
    they are defined (fixing one changes what a replay builds)."""
    return [
        f"{entry.name} upcaster {version}: {_behaviour(upcaster)} "
        f"{_constant(getattr(upcaster, '__defaults__', None))} "
        f"{_constant(getattr(upcaster, '__kwdefaults__', None))}"
        for version, upcaster in sorted(entry.upcasters.items())
    ]


def _digest(parts: list[str]) -> int:
    # 31 bits: the snapshot schema column is a 32-bit integer on PostgreSQL.
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:4], "big") & (
        0x7FFFFFFF
    )


# Libraries' classes (a Struct's or an Enum's bases, a datetime) are not the app's code.
_LIBRARIES = frozenset(sys.stdlib_module_names) | {
    "builtins", "msgspec", "riverbed", "pydantic", "pydantic_core", "attr", "attrs",
}  # fmt: skip


def _ours(cls: type[Any]) -> bool:
    return cls.__module__.partition(".")[0] not in _LIBRARIES


def _with_bases(classes: list[type[Any]]) -> list[type[Any]]:
    """``classes`` and the app's classes they derive from."""
    return list(dict.fromkeys(base for c in classes for base in c.__mro__ if _ours(base)))


def _attributes(cls: type[Any]) -> list[tuple[str, object]]:
    """What describes a class from memory: its attributes but its docstring, and a Struct's
    fields' defaults and stored names, which it keeps out of its ``__dict__``."""
    skipped = ("_riverbed_state", "__doc__")
    attributes = [(name, value) for name, value in vars(cls).items() if name not in skipped]
    if issubclass(cls, msgspec.Struct):
        attributes += [
            ("__struct_defaults__", cls.__struct_defaults__),
            ("__struct_encode_fields__", cls.__struct_encode_fields__),
        ]
    return sorted(attributes)


def _classes_in(hints: list[Any]) -> list[type[Any]]:
    """The app's classes that annotations name, their arguments' too (``list[Line]``: Line),
    and those of the fields of the classes msgspec encodes field by field
    (``Money.rate: Rate``)."""
    found: list[type[Any]] = []
    while hints:
        hint = hints.pop()
        hints += typing.get_args(hint)
        origin = typing.get_origin(hint) or hint
        if not isinstance(origin, type) or not _ours(origin) or origin in found:
            continue
        found.append(origin)
        if has_fields(origin):
            hints += typing.get_type_hints(origin).values()
    return found


def _event_classes_named(classes: list[type[Any]]) -> list[type[Any]]:
    """The explicit event classes (``DomainEvent``) that ``classes`` hold or their methods
    name: as globals of their modules (``Credited(...)``), through modules imported there
    (``shop.events.Credited(...)``), in functions of those modules they call, or in
    containers (``EVENTS = {"credit": Credited}``)."""
    found: list[type[Any]] = []
    seen: set[int] = set()
    for cls in classes:
        module = sys.modules.get(cls.__module__)
        namespace = vars(module) if module is not None else {}
        for value in vars(cls).values():
            found += _event_classes_in(value, namespace, seen)
    return list(dict.fromkeys(found))


def _event_classes_in(value: object, namespace: dict[str, Any], seen: set[int]) -> list[type]:
    if id(value) in seen:
        return []
    seen.add(id(value))
    if isinstance(value, type):
        return [value] if registry.is_event_class(value) else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple | set | frozenset):
        return [c for item in value for c in _event_classes_in(item, namespace, seen)]
    found: list[type] = []
    for code in _codes_of(value):
        for names in _names_in(code):
            for name in names:
                found += _named(namespace.get(name), names, namespace, seen)
    return found


def _named(target: object, names: tuple[str, ...], namespace: dict[str, Any],
           seen: set[int]) -> list[type]:  # fmt: skip
    """The event classes ``target``, a global that code names, is or leads to."""
    if isinstance(target, types.ModuleType):
        if id(target) in seen:
            return []
        seen.add(id(target))
        return [c for name in names
                for c in _named(getattr(target, name, None), names, namespace, seen)]  # fmt: skip
    if isinstance(target, types.FunctionType) and target.__globals__ is namespace:
        return _event_classes_in(target, namespace, seen)  # a helper of the same module
    if isinstance(target, type | dict | list | tuple | set | frozenset):
        return _event_classes_in(target, namespace, seen)
    return []


def _codes_of(value: object) -> list[types.CodeType]:
    """The code of a method (an event method's, a static or class method's, a property's)."""
    if isinstance(value, property):
        return [code for f in (value.fget, value.fset, value.fdel) for code in _codes_of(f)]
    function = getattr(value, "method", value)  # an event method's
    function = getattr(function, "__func__", function)  # a static or class method's
    code = getattr(function, "__code__", None)
    return [code] if isinstance(code, types.CodeType) else []


def _names_in(code: types.CodeType) -> Iterator[tuple[str, ...]]:
    """The names each code object of ``code`` (its nested functions' too) uses."""
    yield code.co_names
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            yield from _names_in(constant)


# An object's address in a repr (a default factory's), which differs from process to process.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _behaviour(value: object) -> str:
    """A class attribute as a snapshot depends on it: a method's code, or the value."""
    if isinstance(value, property):
        return " ".join(_behaviour(f) for f in (value.fget, value.fset, value.fdel))
    codes = _codes_of(value)
    return _code_text(codes[0]) if codes else _constant(value)


def _code_text(code: types.CodeType) -> str:
    return f"{code.co_code.hex()} {code.co_names} {[_constant(c) for c in code.co_consts]}"


def _constant(value: object) -> str:
    """``value``'s repr as every process gives it."""
    if isinstance(value, types.CodeType):
        return _code_text(value)
    if isinstance(value, dataclasses.Field):  # its default factory's code, not its name
        parts = (value.name, value.default, value.default_factory, value.init, value.kw_only)
        return f"field({', '.join(map(_behaviour, parts))})"
    factory = getattr(value, "factory", None)
    if type(value).__name__ == "Factory" and callable(factory):  # msgspec.field's
        return f"Factory({_behaviour(factory)})"
    if isinstance(value, set | frozenset):  # in the order of string hashes, which vary
        return f"{type(value).__name__}({sorted(map(_constant, value))})"
    if isinstance(value, tuple | list):
        return f"{type(value).__name__}({', '.join(map(_constant, value))})"
    if isinstance(value, dict):
        return f"dict({', '.join(f'{_constant(k)}: {_constant(v)}' for k, v in value.items())})"
    return _ADDRESS.sub("", repr(value))


@contextmanager
def never_failing(aggregate: Aggregate) -> Iterator[None]:
    """A snapshot never fails a save, whose events are committed: its error is logged, and
    loading replays the events instead."""
    try:
        yield
    except Exception as error:
        log.warning("no snapshot of %s %s: %s: %s", type(aggregate).__qualname__, aggregate.id,
                    type(error).__name__, error)  # fmt: skip


def mark_saved(aggregates: Sequence[Aggregate], saved: Sequence[int]) -> list[Aggregate]:
    """Mark the first ``saved`` pending events of each aggregate saved (they are committed,
    whatever becomes of the snapshots); the aggregates due for a snapshot. One that recorded
    more meanwhile (another task, while the save awaited the store) keeps those pending, and
    its state, ahead of the store, is not snapshotted."""
    due = []
    for aggregate, count in zip(aggregates, saved, strict=True):
        pending = aggregate.pending
        every = type(aggregate).snapshot_every
        if every is not None:  # checked again: it may have been set since the class was made
            every = None
            with never_failing(aggregate):
                every = snapshot_every(type(aggregate))
        if (
            every
            and count
            and count == len(pending)
            and aggregate.version // every > (pending[0].version - 1) // every
        ):
            due.append(aggregate)
        del pending[:count]
    return due


# What _decrypted_with holds once a stream's key changed under a live aggregate: its state may
# hold personal data of the old key, which no key may seal again.
_NO_KEY_FITS = b""


def loaded_with(keys: list[bytes]) -> bytes | None:
    """The key a state loaded with ``keys`` (each one it decrypted personal data with) may be
    snapshotted under: none fits data of two keys (a key deleted, and a new one made, while it
    loaded), so that a snapshot never seals what a deletion erased under the new key."""
    if not keys:
        return None
    return keys[0] if all(key == keys[0] for key in keys) else _NO_KEY_FITS


def sealed_with(aggregates: Sequence[Aggregate], keys: dict[str, bytes | None]) -> None:
    """After a save: the key each aggregate's personal data is now protected by (``keys``: the
    one its personal events were just sealed with, by stream)."""
    for aggregate in aggregates:
        key = keys.get(aggregate.id)
        if key is None:
            continue
        if aggregate._decrypted_with is None:
            aggregate._decrypted_with = key
        elif aggregate._decrypted_with != key:
            aggregate._decrypted_with = _NO_KEY_FITS


def seal_snapshot(
    snapshot: Snapshot, aggregate: Aggregate, key: bytes | None, decrypted_with: bytes | None
) -> Snapshot | None:
    """``snapshot`` sealed with the stream's ``key`` if it has one, since the state may hold
    personal fields, and a deleted key must erase them here too; None when the state holds
    personal data of another key (``decrypted_with``: the aggregate's when it was taken)."""
    if decrypted_with is not None and decrypted_with != key:
        log.info("no snapshot of %s %s: its stream's key was deleted since its personal data "
                 "was read or saved", type(aggregate).__qualname__, aggregate.id)  # fmt: skip
        return None
    if key is None:
        return snapshot
    return msgspec.structs.replace(snapshot, data=seal(key, snapshot.data))


def take_snapshot(aggregate: Aggregate) -> Snapshot | None:
    """The aggregate's state as a snapshot, not sealed yet (``_seal``); None when the state
    would not load back as it is."""
    cls = type(aggregate)
    if aggregate._riverbed_body_raised:
        log.info("no snapshot of %s %s: an event's body raised on it, maybe after changing its "
                 "state", cls.__qualname__, aggregate.id)  # fmt: skip
        return None
    try:
        hints, _ = _state_hints(cls)
        schema = _schema(cls, aggregate._riverbed_triggered)
    except NameError as error:  # an annotation of a name only imported for type checkers
        _no_snapshots(cls, f"its annotations do not resolve ({error})")
        return None
    assert schema is not None  # the classes it applied are registered
    state = {k: v for k, v in vars(aggregate).items() if k not in _NOT_STATE}
    shared = shared_object(state)
    if shared is not None:
        _no_snapshots(
            cls,
            f"{shared[1]} is the same object as {shared[0]}, which a snapshot would load as two "
            "copies (an event changing one would leave the other); hold it in one place, or "
            "its key there",
        )
        return None
    stored = (
        {**state, _EVENT_CLASSES: sorted(aggregate._riverbed_triggered)}
        if aggregate._riverbed_triggered
        else state
    )
    try:
        data = ENCODER.encode(stored)
        restored = _typed(_snapshot_decoder.decode(data), hints)
        restored.pop(_EVENT_CLASSES, None)
        differing = [
            name for name, value in state.items() if not same_when_loaded(restored.get(name), value)
        ]
    except (NotImplementedError, OverflowError, TypeError, ValueError, msgspec.MsgspecError
            ) as error:  # fmt: skip
        _no_snapshots(cls, f"its state does not encode and decode ({error})")
        return None
    if differing:
        changes = ", ".join(_change(name, state[name], restored.get(name)) for name in differing)
        name = differing[0]
        dropped = next(
            filter(None, (_dropped_attribute(restored.get(n), state[n]) for n in differing)), None
        )
        if dropped is not None:
            advice = f"its encoding keeps fields only, not {dropped}: make it a field"
        elif name not in hints:
            advice = f"annotate them on the class (`{name}: {type(state[name]).__name__}`)"
        else:
            advice = "their annotations do not say what they hold"
        _no_snapshots(cls, f"{changes}; {advice}")
        return None
    return Snapshot(
        stream=aggregate.id,
        version=aggregate.version,
        type=stored_name(cls),
        schema=schema,
        data=data,
        timestamp_ms=time.time_ns() // 1_000_000,
    )


def from_snapshot(cls: type[A], snapshot: Snapshot, key: bytes | None) -> A | None:
    """The aggregate restored from ``snapshot``; None (replay from the events) when the class
    changed shape since, the snapshot does not convert to its annotations, or it is sealed with
    a key that was deleted."""
    try:
        hints, _ = _state_hints(cls)
        data = unseal(key, snapshot.data)
        if snapshot.type != stored_name(cls) or data is None:
            return None
        values = _snapshot_decoder.decode(data)
        triggered = values.pop(_EVENT_CLASSES, [])
        if snapshot.schema != _schema(cls, triggered):
            return None
        aggregate = cls.__new__(cls)
        aggregate._begin(snapshot.stream)
        for name, value in _typed(values, hints).items():
            setattr(aggregate, name, value)
        if triggered:
            aggregate._riverbed_triggered = set(triggered)
    except Exception as error:  # whatever fails, the events are there to replay
        log.warning("ignoring the snapshot of %s %s: %s: %s", cls.__name__, snapshot.stream,
                    type(error).__name__, error)  # fmt: skip
        return None
    aggregate.version = snapshot.version
    return aggregate


def _typed(values: dict[str, Any], hints: dict[str, Any]) -> dict[str, Any]:
    """A decoded state's annotated attributes converted to their types."""
    for name, hint in hints.items():
        if name in values:
            values[name] = msgspec.convert(values[name], hint, dec_hook=dec_hook)
    return values


def same_when_loaded(restored: object, value: object) -> bool:
    """Whether a state's value loads back as it is: equal, of the same type (an IntEnum is equal
    to the int it loads back as, an int to the float its annotation makes of it), down to the
    items of containers and the fields of objects; a datetime in the same time zone (msgpack
    keeps the instant, in UTC); a NaN is itself, though not equal."""
    if type(restored) is not type(value):
        return False
    if isinstance(value, float):
        assert isinstance(restored, float)
        return restored == value or (math.isnan(restored) and math.isnan(value))
    if isinstance(value, list | tuple):
        assert isinstance(restored, list | tuple)
        return len(restored) == len(value) and all(map(same_when_loaded, restored, value))
    if isinstance(value, dict):
        assert isinstance(restored, dict)
        return same_when_loaded(list(restored), list(value)) and same_when_loaded(
            list(restored.values()), list(value.values())
        )
    if isinstance(value, set | frozenset):
        assert isinstance(restored, set | frozenset)
        if restored != value:
            return False
        # Each item against the one it loads back as (equal, so found by lookup): a datetime
        # in another zone, or an IntEnum in a tuple, is equal to what it loads back as too.
        loaded_as = {item: item for item in restored}
        return all(same_when_loaded(loaded_as[item], item) for item in value)
    if isinstance(value, datetime.datetime | datetime.time):
        assert isinstance(restored, datetime.datetime | datetime.time)
        return restored == value and restored.tzinfo == value.tzinfo
    fields = fields_of(value)
    if fields is not None:
        return (
            restored == value
            and all(
                same_when_loaded(getattr(restored, name), getattr(value, name)) for name in fields
            )
            and _same_outside_fields(
                _outside_fields(restored, fields), _outside_fields(value, fields)
            )
        )
    return restored == value


def _outside_fields(value: object, fields: tuple[str, ...]) -> dict[str, object]:
    """The attributes of a Struct (``dict=True``) or dataclass instance outside its fields,
    which its encoding leaves out (a cached_property's value is computed again)."""
    attributes: dict[str, object] = getattr(value, "__dict__", None) or {}
    cls = type(value)
    return {
        name: item
        for name, item in attributes.items()
        if name not in fields
        and not isinstance(getattr(cls, name, None), functools.cached_property)
    }


def _dropped_attribute(restored: object, value: object) -> str | None:
    """``Class.attribute`` of the first Struct or dataclass in ``value`` with an attribute
    outside its fields that does not load back, if any."""
    if type(restored) is not type(value):
        return None
    if isinstance(value, list | tuple):
        assert isinstance(restored, list | tuple)
        pairs: Iterable[tuple[object, object]] = zip(restored, value, strict=False)
    elif isinstance(value, dict):
        assert isinstance(restored, dict)
        pairs = zip(restored.values(), value.values(), strict=False)
    elif (fields := fields_of(value)) is not None:
        extra, kept = _outside_fields(value, fields), _outside_fields(restored, fields)
        for name, item in extra.items():
            if name not in kept or not _same_outside_field(kept[name], item):
                return f"{type(value).__name__}.{name}"
        pairs = ((getattr(restored, name), getattr(value, name)) for name in fields)
    else:
        return None
    return next(filter(None, (_dropped_attribute(r, v) for r, v in pairs)), None)


def _same_outside_fields(restored: dict[str, object], value: dict[str, object]) -> bool:
    return restored.keys() == value.keys() and all(
        _same_outside_field(restored[name], item) for name, item in value.items()
    )


def _same_outside_field(restored: object, value: object) -> bool:
    """An object equal only to itself (a lock ``__post_init__`` makes) is no state: one of its
    type built again on load is as good."""
    if type(value).__eq__ is object.__eq__:
        return type(restored) is type(value)
    return same_when_loaded(restored, value)


def _change(name: str, value: object, restored: object) -> str:
    kind = type(value).__name__
    if type(restored) is not type(value):
        return f"{name} ({kind} loads back as {type(restored).__name__})"
    if isinstance(value, datetime.datetime | datetime.time):
        assert isinstance(restored, datetime.datetime | datetime.time)
        return f"{name} ({kind} in time zone {value.tzinfo} loads back in {restored.tzinfo})"
    fields = fields_of(value)
    if fields is None:
        return f"{name} ({kind} whose items load back changed)"
    if not _same_outside_fields(_outside_fields(restored, fields), _outside_fields(value, fields)):
        return f"{name} ({kind} whose attributes outside its fields do not load back)"
    return f"{name} ({kind} whose fields load back changed)"


_warned_unsnapshotted: set[type[Aggregate]] = set()


def _no_snapshots(cls: type[Aggregate], reason: str) -> None:
    """Warn, once per class, that its aggregates are saved without snapshots."""
    if cls not in _warned_unsnapshotted:
        _warned_unsnapshotted.add(cls)
        log.warning("no snapshots of %s, loads replay its events: %s", cls.__qualname__, reason)
