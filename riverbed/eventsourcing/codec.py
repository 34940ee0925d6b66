"""Event types: the registry of event classes by name, their versions and upcasters, and the
codec between typed events and the bytes a store keeps.

Payloads are msgpack maps (field name -> value), so a field added with a default still decodes
old events. An event class carries a version; events stored at an older version go through the
class's upcasters (``{old_version: fn(dict) -> dict}``) before they are converted to the class.
Fields marked personal (``Annotated[str, riverbed.Personal]``) are encrypted with the stream's
own key (AES-GCM); deleting the key (crypto-shredding) leaves them unreadable, and they decode as
``ERASED`` (strings) or None, while the rest of the event, and of the stream, still loads.
"""

from __future__ import annotations

import functools
import os
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from riverbed.errors import MissingExtraError
from riverbed.eventsourcing.errors import (
    EventDecodeError,
    EventSourcingError,
    UnknownEventTypeError,
)

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
ERASED = "[erased]"
_ENCRYPTED = 1  # msgpack ext code of an encrypted personal field
_NONCE_BYTES = 12


class Personal:
    """Marks a payload field as personal data: ``email: Annotated[str, riverbed.Personal]``."""


def _enc_hook(value: object) -> object:
    dump = getattr(value, "model_dump", None)  # pydantic v2 models
    if callable(dump):
        return dump(mode="json")
    raise NotImplementedError(f"objects of type {type(value).__name__} are not supported")


def dec_hook(kind: type, value: object) -> object:
    validate = getattr(kind, "model_validate", None)
    if callable(validate):
        return validate(value)
    raise NotImplementedError(f"cannot decode a {kind.__name__}")


ENCODER = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


@dataclass
class EventType:
    """One registered event class."""

    name: str
    cls: type[Any]
    version: int = 1
    upcasters: dict[int, Upcaster] = field(default_factory=dict)
    personal: frozenset[str] = frozenset()
    apply: Callable[[Any, Any], None] | None = None  # (aggregate, event) -> None
    # The aggregate class whose @event method records it; None for a DomainEvent class, which
    # any aggregate may trigger.
    aggregate: type[Any] | None = None

    def recorded_by(self, cls: type[Any]) -> bool:
        """Whether aggregates of ``cls`` record this event (an aggregate of another class
        must not replay it)."""
        owner = self.aggregate
        if owner is None or issubclass(cls, owner):
            return True
        return any(_same_class(base, owner) for base in cls.__mro__)

    @functools.cached_property
    def decoder(self) -> msgspec.msgpack.Decoder[Any]:
        # Built on first use: a Struct class is not complete while it registers itself.
        return msgspec.msgpack.Decoder(self.cls, dec_hook=dec_hook)

    def __post_init__(self) -> None:
        missing = [v for v in range(1, self.version) if v not in self.upcasters]
        if missing:
            raise EventSourcingError(
                f"event {self.name} is at version {self.version} but has no upcaster from "
                f"version {missing[0]}; pass upcasters={{{missing[0]}: fn}}"
            )


class EventRegistry:
    """Event classes by name, one per program (``riverbed.eventsourcing.codec.registry``)."""

    def __init__(self) -> None:
        self._by_name: dict[str, EventType] = {}
        self._by_class: dict[type[Any], EventType] = {}

    def register(
        self,
        name: str,
        cls: type[Any],
        *,
        version: int = 1,
        upcasters: dict[int, Upcaster] | None = None,
        apply: Callable[[Any, Any], None] | None = None,
        aggregate: type[Any] | None = None,
        aliases: Sequence[str] = (),
    ) -> EventType:
        """``aliases``: names the class's events were stored under before a rename; they decode
        as it, and new events are stored as ``name``."""
        names = [name, *aliases]
        for taken in names:
            existing = self._by_name.get(taken)
            # The same class again (a module reloaded, a class made in a function called twice)
            # replaces its entry; another one would decode the first one's stored events.
            if existing is not None and not _same_class(existing.cls, cls):
                raise EventSourcingError(
                    f"event type {taken!r} is already registered for {_where(existing.cls)}, so "
                    f"{_where(cls)} cannot have it too: stored events name their type only; give "
                    "one of them another name (the aggregate class's, or the event's)"
                )
        if version < 1:
            raise EventSourcingError(f"event {name}: version must be >= 1, got {version}")
        entry = EventType(
            name, cls, version, dict(upcasters or {}), _personal_fields(cls), apply, aggregate
        )
        for taken in names:
            self._by_name[taken] = entry
        self._by_class[cls] = entry
        return entry

    def of(self, event: object) -> EventType:
        entry = self._by_class.get(type(event))
        if entry is None:
            raise UnknownEventTypeError(
                f"{type(event).__qualname__} is not a registered event class; subclass "
                "riverbed.DomainEvent, or use @riverbed.event on an aggregate method"
            )
        return entry

    def named(self, name: str, position: int | None = None) -> EventType:
        entry = self._by_name.get(name)
        if entry is None:
            where = f" at position {position}" if position is not None else ""
            raise UnknownEventTypeError(
                f"the store holds an event of type {name!r}{where}, which no event class of "
                "this program is registered as; import the module that defines it, or, if it "
                "was renamed, give the old name in the event's aliases= (event_aliases on a "
                "DomainEvent), or its aggregate class's old name as stored_name"
            )
        return entry


registry = EventRegistry()


def _personal_fields(cls: type[Any]) -> frozenset[str]:
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception:  # unresolvable forward references: no personal fields can be seen
        return frozenset()
    return frozenset(
        name
        for name, hint in hints.items()
        if typing.get_origin(hint) is typing.Annotated and Personal in hint.__metadata__
    )


# Encoding


KeyLookup = Callable[[bool], bytes | None]  # create -> the stream's key, or None if deleted


def encode(event: object, entry: EventType, key: KeyLookup) -> bytes:
    """The payload bytes of ``event``; personal fields encrypted with the stream's key."""
    if not entry.personal:
        return ENCODER.encode(event)
    fields: dict[str, Any] = msgspec.to_builtins(event, enc_hook=_enc_hook)
    stream_key = key(True)
    assert stream_key is not None
    for name in entry.personal:
        if fields.get(name) is not None:
            fields[name] = msgspec.msgpack.Ext(
                _ENCRYPTED, _encrypt(stream_key, ENCODER.encode(fields[name]))
            )
    return ENCODER.encode(fields)


def decode(data: bytes, schema: int, entry: EventType, key: KeyLookup, where: str) -> Any:
    """The typed event stored as ``data`` at version ``schema`` (upcast to the current one)."""
    try:
        if schema == entry.version and not entry.personal:
            return entry.decoder.decode(data)
        fields: dict[str, Any] = msgspec.msgpack.decode(data, ext_hook=_Decrypter(key))
        for version in range(schema, entry.version):
            fields = entry.upcasters[version](fields)
        for name, value in fields.items():
            if isinstance(value, _Erased):
                fields[name] = _erased_value(entry.cls, name)
        return msgspec.convert(fields, entry.cls, dec_hook=dec_hook)
    except (msgspec.DecodeError, msgspec.ValidationError, KeyError, TypeError, ValueError) as error:
        raise EventDecodeError(
            f"event {entry.name} {where} does not decode (stored at version {schema}, class at "
            f"version {entry.version}): {error}; add an upcaster for its old shape"
        ) from error


class _Erased:
    """A personal field whose stream key was deleted."""


class _Decrypter:
    def __init__(self, key: KeyLookup) -> None:
        self._key = key
        self._loaded = False
        self._value: bytes | None = None

    def __call__(self, code: int, data: memoryview) -> object:
        if code != _ENCRYPTED:
            raise ValueError(f"unknown msgpack extension {code}")
        if not self._loaded:
            self._value, self._loaded = self._key(False), True
        if self._value is None:
            return _Erased()
        return msgspec.msgpack.decode(_decrypt(self._value, bytes(data)))


def _erased_value(cls: type[Any], name: str) -> object:
    hint = typing.get_type_hints(cls).get(name)
    return ERASED if hint is str else None


def _aesgcm(key: bytes) -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise MissingExtraError(
            "personal (encrypted) event fields", "crypto", "cryptography"
        ) from None
    return AESGCM(key)


SEALED = b"\xc1"  # a byte msgpack never uses: marks a sealed (encrypted) snapshot


def seal(key: bytes, plaintext: bytes) -> bytes:
    return SEALED + _encrypt(key, plaintext)


def unseal(key: bytes | None, data: bytes) -> bytes | None:
    """The plaintext of ``data`` (sealed or not); None when sealed and the key is gone."""
    if not data.startswith(SEALED):
        return data
    return None if key is None else _decrypt(key, data[len(SEALED) :])


def _encrypt(key: bytes, plaintext: bytes) -> bytes:
    nonce = os.urandom(_NONCE_BYTES)
    ciphertext: bytes = _aesgcm(key).encrypt(nonce, plaintext, None)
    return nonce + ciphertext


def _decrypt(key: bytes, sealed: bytes) -> bytes:
    plaintext: bytes = _aesgcm(key).decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], None)
    return plaintext


def _where(cls: type[Any]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _same_class(first: type[Any], second: type[Any]) -> bool:
    if first.__qualname__ != second.__qualname__:
        return False
    modules = {first.__module__, second.__module__}
    # A script's classes, imported again by its module name (or by a multiprocessing child as
    # __mp_main__), are the same code.
    return len(modules) == 1 or bool(modules & {"__main__", "__mp_main__"})
