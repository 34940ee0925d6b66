"""Event types: the registry of event classes by name, their versions and upcasters, and the
codec between typed events and the bytes a store keeps.

Payloads are msgpack maps (field name -> value), so a field added with a default still decodes
old events. An event class carries a version; events stored at an older version go through the
class's upcasters (``{old_version: fn(dict) -> dict}``) before they are converted to the class.
Fields marked personal (``Annotated[str, riverbed.Personal]``) are encrypted with the stream's
own key (AES-GCM); deleting the key (crypto-shredding) leaves them unreadable, and they decode as
None where their type allows None, else as ``ERASED`` (strings), while the rest of the event, and
of the stream, still loads. A personal field of another type, or one nested in a field's type,
could not be erased: its class is refused when it is defined. Each sealed value names the key
that sealed it (a hash of it), so once a deleted key is replaced by a new one, what the old one
sealed still reads as erased, while a field altered since it was sealed is an error (a snapshot
is ignored: the events are replayed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from riverbed.errors import MissingExtraError
from riverbed.eventsourcing.errors import (
    EventDecodeError,
    EventSourcingError,
    UnknownEventTypeError,
)

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
ERASED = "[erased]"
# msgpack ext codes of an encrypted personal field: sealed before key ids (nonce, ciphertext),
# and with the sealing key's id first
_ENCRYPTED = 1
_KEYED = 2
_KEY_ID_BYTES = 8
_NONCE_BYTES = 12
_NO_ERASED_VALUE = object()
log = logging.getLogger("riverbed.events")


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


T = TypeVar("T")


def _resolving(build: Callable[[EventType], T]) -> Callable[[EventType], T]:
    """``build``, with an annotation of the payload that does not resolve (a ``NameError``
    from deep inside typing or msgspec) as an error that names the event and says why."""

    @functools.wraps(build)
    def resolved(entry: EventType) -> T:
        try:
            return build(entry)
        except NameError as error:
            raise EventSourcingError(
                f"event {entry.name}: the annotation {error.name!r} of its payload does not "
                f"resolve in module {entry.cls.__module__!r}. Postponed annotations (`from "
                "__future__ import annotations`) are looked up in the module's globals: define "
                f"{error.name} at module level, not inside a function (a test's, say)"
            ) from None

    return resolved


@dataclass
class EventType:
    """One registered event class."""

    name: str
    cls: type[Any]
    version: int = 1
    upcasters: dict[int, Upcaster] = field(default_factory=dict)
    apply: Callable[[Any, Any], None] | None = None  # (aggregate, event) -> None
    # The aggregate class whose @event method records it; None for a DomainEvent class, which
    # any aggregate may trigger.
    aggregate: type[Any] | None = None

    def __reduce__(self) -> tuple[Callable[[str], EventType], tuple[str]]:
        # A registry entry, not a value: a copy (of an aggregate with unsaved events, deep-copied
        # or pickled) is the entry registered under its name.
        return _registered, (self.name,)

    def recorded_by(self, cls: type[Any]) -> bool:
        """Whether aggregates of ``cls`` record this event (an aggregate of another class
        must not replay it)."""
        owner = self.aggregate
        if owner is None or issubclass(cls, owner):
            return True
        return any(_same_class(base, owner) for base in cls.__mro__)

    @functools.cached_property
    @_resolving
    def personal(self) -> dict[str, object]:
        """Its personal fields by stored name, each with the value it decodes as once erased
        (asked before every save and load of the event)."""
        cls = self.cls
        # Known only once the class is complete, so not when it registers itself.
        if issubclass(cls, msgspec.Struct) and cls.__struct_config__.array_like:
            raise EventSourcingError(
                f"{_where(cls)} cannot be array_like=True: events are stored with their "
                "fields' names, which upcasters and personal fields go by"
            )
        # By stored name: a Struct's field renamed (msgspec.field(name=...), rename=) is
        # stored under its new name, known only once the class is complete.
        return _by_stored_name(cls, _personal_fields(cls))

    def erased_value(self, name: str) -> object:
        """What the field stored as ``name`` reads as once erased: a personal field's erased
        value, or that of a field no longer marked personal which was when it was stored."""
        if name in self.personal:
            return self.personal[name]
        value = self._erased_values.get(name)
        if value is _NO_ERASED_VALUE:
            raise EventDecodeError(
                f"event {self.name}: field {name!r} was personal when it was stored, and its "
                "stream's key is deleted, but its type now has no erased value (None, or "
                f"{ERASED!r} for a str); make it optional, or mark it riverbed.Personal again"
            )
        return value

    @functools.cached_property
    @_resolving
    def _erased_values(self) -> dict[str, object]:
        """The erased value of each field by stored name (``_NO_ERASED_VALUE``: none)."""
        hints = typing.get_type_hints(self.cls)
        return _by_stored_name(self.cls, {name: _erased_value(h) for name, h in hints.items()})

    @functools.cached_property
    @_resolving
    def decoder(self) -> msgspec.msgpack.Decoder[Any]:
        # Built on first use: a Struct class is not complete while it registers itself.
        return msgspec.msgpack.Decoder(self.cls, dec_hook=dec_hook)

    @functools.cached_property
    @_resolving
    def stored_decoder(self) -> msgspec.msgpack.Decoder[Any]:
        """``decoder`` for stored payloads, refusing an encrypted value anywhere (one of a
        field that was personal then, which ``decode`` decrypts)."""
        return msgspec.msgpack.Decoder(self.cls, dec_hook=dec_hook, ext_hook=_refuse_sealed)

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
        if isinstance(aliases, str):  # ("Order.Paid") for ("Order.Paid",): one per letter
            raise EventSourcingError(
                f"event {name}: aliases is a tuple of names, not one name; write ({aliases!r},)"
            )
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
            if existing is not None and (existing.aggregate is None) != (aggregate is None):
                # Not the same class, though of one qualified name: a DomainEvent class nested
                # in an aggregate, and the payload class of an @event method of it.
                raise EventSourcingError(
                    f"event type {taken!r} is both a DomainEvent class and an @event method's "
                    "event: stored events name their type only; give one of them another name"
                )
            owner = None if existing is None else existing.aggregate
            if owner is not None and aggregate is not None and not _same_class(owner, aggregate):
                # An event method's class is named after stored_name: another aggregate class
                # of the module with that stored_name makes one of the same name.
                raise EventSourcingError(
                    f"event type {taken!r} is already recorded by {_where(owner)}, so "
                    f"{_where(aggregate)} cannot record it too: stored events name their type "
                    "only; give one of them another stored_name (or event name)"
                )
        if version < 1:
            raise EventSourcingError(f"event {name}: version must be >= 1, got {version}")
        entry = EventType(name, cls, version, dict(upcasters or {}), apply, aggregate)
        # Personal fields that could not be erased are refused with the class; while it refers
        # to a class defined later, on first use.
        with contextlib.suppress(NameError):
            _personal_fields(cls)
        for taken in names:
            self._by_name[taken] = entry
        self._by_class[cls] = entry
        return entry

    def rename(self, cls: type[Any], name: str) -> None:
        """Store ``cls``'s events as ``name`` from now on; the name it registered under stays an
        alias (events stored under it still load)."""
        entry = self._by_class[cls]
        aliases = [n for n, e in self._by_name.items() if e is entry]
        del self._by_name[entry.name]
        try:
            self.register(
                name, cls, version=entry.version, upcasters=entry.upcasters, apply=entry.apply,
                aggregate=entry.aggregate, aliases=aliases,
            )  # fmt: skip
        except EventSourcingError:
            self._by_name[entry.name] = entry
            raise

    def recorded_by(self, cls: type[Any]) -> list[EventType]:
        """The events that ``cls``'s event methods (its bases' too) record."""
        entries = {id(entry): entry for entry in self._by_class.values()}.values()
        return [e for e in entries if e.aggregate is not None and issubclass(cls, e.aggregate)]

    def of_class(self, cls: type[Any]) -> EventType:
        return self._by_class[cls]

    def is_event_class(self, value: object) -> bool:
        return isinstance(value, type) and value in self._by_class

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
                f"an event of type {name!r}{where} is of no event class this program "
                "registered; import the module that defines it, or, if it "
                "was renamed, give the old name in the event's aliases= (event_aliases on a "
                "DomainEvent), or its aggregate class's old name as stored_name"
            )
        return entry


registry = EventRegistry()


def _by_stored_name(cls: type[Any], values: dict[str, object]) -> dict[str, object]:
    """``values`` of fields of ``cls`` keyed by the names the fields are stored under."""
    if not issubclass(cls, msgspec.Struct):
        return values
    stored_as = {f.name: f.encode_name for f in msgspec.structs.fields(cls)}
    return {stored_as[name]: value for name, value in values.items() if name in stored_as}


def _personal_fields(cls: type[Any]) -> dict[str, object]:
    """The personal fields of ``cls`` with their erased values. Raises ``EventSourcingError``
    for one that could not be erased, and ``NameError`` while an annotation does not resolve."""
    erased: dict[str, object] = {}
    plain_hints = typing.get_type_hints(cls)  # for the messages: without the Annotated extras
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        plain = plain_hints[name]
        if _is_personal(hint):
            erased[name] = _erased_value(hint)
            if erased[name] is _NO_ERASED_VALUE:
                raise EventSourcingError(
                    f"{_where(cls)}: personal field {name!r} ({_describe(plain)}) has no erased "
                    "value for when its stream's key is deleted: that is None for a type that "
                    f"allows None, else {ERASED!r} for a str; make it optional (`{name}: "
                    f"Annotated[{_describe(plain)} | None, riverbed.Personal]`)"
                )
            continue
        path = _nested_personal(hint, set())
        if path is not None:
            whole = _describe(plain)
            if _erased_value(plain) is _NO_ERASED_VALUE:
                whole += " | None"
            raise EventSourcingError(
                f"{_where(cls)}: field {name!r} marks {name}{path} riverbed.Personal inside its "
                "type, where it would be stored unencrypted: only an event's own fields can be "
                f"personal; mark the whole field (`{name}: Annotated[{whole}, riverbed.Personal]`)"
            )
    return erased


def _is_personal(hint: Any) -> bool:
    return typing.get_origin(hint) is typing.Annotated and Personal in hint.__metadata__


def _nested_personal(hint: Any, seen: set[type[Any]]) -> str | None:
    """The path to a part of ``hint`` marked personal ("" for ``hint`` itself), if any: in the
    types it is made of, and in the fields of the classes msgspec encodes field by field."""
    if _is_personal(hint):
        return ""
    if typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    for arg in typing.get_args(hint):
        path = _nested_personal(arg, seen)
        if path is not None:
            return path
    cls = typing.get_origin(hint) or hint
    if not isinstance(cls, type) or cls in seen or not has_fields(cls):
        return None
    seen.add(cls)  # a recursive type is looked into once
    for name, field_hint in typing.get_type_hints(cls, include_extras=True).items():
        path = _nested_personal(field_hint, seen)
        if path is not None:
            return f".{name}{path}"
    return None


def has_fields(cls: type[Any]) -> bool:
    return (
        issubclass(cls, msgspec.Struct)
        or dataclasses.is_dataclass(cls)
        or hasattr(cls, "__attrs_attrs__")
        or typing.is_typeddict(cls)
        or (issubclass(cls, tuple) and hasattr(cls, "_fields"))  # NamedTuple
        or isinstance(getattr(cls, "model_fields", None), dict)  # pydantic models (dumped)
    )


def _erased_value(hint: Any) -> object:
    """None where ``hint`` allows None, else ``ERASED`` where it takes that string, else
    ``_NO_ERASED_VALUE``: a value that would not decode would make the stream unloadable."""
    for value in (None, ERASED):
        try:
            msgspec.convert(value, hint, dec_hook=dec_hook)
        except (msgspec.ValidationError, NotImplementedError, TypeError, ValueError):
            continue
        return value
    return _NO_ERASED_VALUE


def _describe(hint: Any) -> str:
    """``hint`` as code spells it: ``Address | None``, not ``Optional[shop.Address]``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(map(_describe, args))
    if args and isinstance(origin, type):
        return f"{origin.__qualname__}[{', '.join(map(_describe, args))}]"
    if hint is type(None):
        return "None"
    return hint.__qualname__ if isinstance(hint, type) else str(hint).replace("typing.", "")


# Encoding


KeyLookup = Callable[[bool], bytes | None]  # create -> the stream's key, or None if deleted


def sealed(entry: EventType, key: KeyLookup, plain: bytes) -> bytes:
    """The payload bytes of an event with personal fields (``entry.personal``) whose
    unencrypted encoding is ``plain`` (made when it was recorded): those fields encrypted with
    the stream's key. An event without them is stored as ``plain``."""
    fields: dict[str, Any] = msgspec.msgpack.decode(plain)
    stream_key = key(True)
    assert stream_key is not None
    for name in entry.personal:
        if fields.get(name) is not None:
            fields[name] = msgspec.msgpack.Ext(
                _KEYED, _encrypt(stream_key, ENCODER.encode(fields[name]))
            )
    return ENCODER.encode(fields)


def decode(data: bytes, schema: int, entry: EventType, key: KeyLookup, where: str) -> Any:
    """The typed event stored as ``data`` at version ``schema`` (upcast to the current one)."""
    if schema > entry.version:
        raise EventDecodeError(
            f"event {entry.name} {where} was stored at version {schema}, newer than this "
            f"program's {entry.version}: a newer release of it wrote the event; run that release"
        )
    personal = entry.personal  # first: it refuses an event class that cannot be stored
    try:
        plain_error: msgspec.ValidationError | None = None
        if schema == entry.version and not personal:
            try:
                return entry.stored_decoder.decode(data)
            except msgspec.ValidationError as error:  # a field sealed while marked personal?
                plain_error = error
            except _SealedFieldError:  # one of type Any, say, sealed while marked personal
                pass
        decrypter = _Decrypter(key)
        fields = msgspec.msgpack.decode(data, ext_hook=decrypter)
        if plain_error is not None and not decrypter.met:
            raise plain_error  # nothing sealed: it is what it says
        if not isinstance(fields, dict):
            raise EventDecodeError(
                f"event {entry.name} {where} is stored as {type(fields).__name__}, not as a "
                "map of its fields"
            )
        # Upcasters see an erased field as the class reads it (ERASED, None); one the class no
        # longer has by that name as a str equal to ERASED, which tells where they move it.
        if schema < entry.version:
            _erase(fields, entry, only_known=True)
        for version in range(schema, entry.version):
            upcaster = entry.upcasters[version]
            try:
                fields = upcaster(fields)
            except Exception as error:
                raise EventDecodeError(
                    f"event {entry.name} {where}: its upcaster from version {version} raised "
                    f"{type(error).__name__}: {error}"
                ) from error
            if not isinstance(fields, dict):
                raise EventDecodeError(
                    f"event {entry.name} {where}: its upcaster from version {version} returned "
                    f"{type(fields).__name__}, not the payload's fields as a dict (a missing "
                    "return?)"
                )
        _erase(fields, entry, only_known=False)
        if decrypter.erased:  # any an upcaster put inside a container: the plain text
            fields = _plain_erased(fields)
        return msgspec.convert(fields, entry.cls, dec_hook=dec_hook)
    except _AlteredError as error:
        raise EventDecodeError(f"event {entry.name} {where} does not decode: {error}") from None
    except EventDecodeError:  # an upcaster's, which says so
        raise
    except (msgspec.DecodeError, msgspec.ValidationError, KeyError, TypeError, ValueError) as error:
        raise EventDecodeError(
            f"event {entry.name} {where} does not decode (stored at version {schema}, class at "
            f"version {entry.version}): {error}; add an upcaster for its old shape"
        ) from error


class _Erased(str):
    """A personal field whose stream key was deleted: ``ERASED`` to an upcaster, which may
    treat it as the str it was stored as (``.strip()``), or move it to another field."""

    __slots__ = ()


def _plain_erased(value: Any) -> Any:
    """``value`` with each ``_Erased`` inside its containers as plain ``ERASED`` text."""
    if type(value) is _Erased:
        return ERASED
    if isinstance(value, dict):
        return {k: _plain_erased(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(map(_plain_erased, value))
    return value


class _SealedFieldError(Exception):
    """An encrypted value met where the event class has no personal field: it was one when
    the event was stored."""


def _refuse_sealed(code: int, data: memoryview) -> object:
    raise _SealedFieldError


def _erase(fields: dict[str, Any], entry: EventType, only_known: bool) -> None:
    """Put the erased value of each erased field in its place (``only_known``: of the fields
    the class has by that name)."""
    for name, value in fields.items():
        if type(value) is _Erased and (name in entry.personal or not only_known):
            fields[name] = entry.erased_value(name)


class _AlteredError(Exception):
    """A personal field that fails authentication under the key that sealed it."""


class _Decrypter:
    def __init__(self, key: KeyLookup) -> None:
        self._key = key
        self._loaded = False
        self._value: bytes | None = None
        self._id = b""
        self.met = False  # an encrypted value
        self.erased = False  # one whose key was deleted

    def _erase(self) -> _Erased:
        self.erased = True
        return _Erased(ERASED)

    def __call__(self, code: int, data: memoryview) -> object:
        self.met = True
        if code not in (_KEYED, _ENCRYPTED):
            raise ValueError(f"unknown msgpack extension {code}")
        if not self._loaded:
            self._value, self._loaded = self._key(False), True
            if self._value is not None:
                self._id = _key_id(self._value)
        if self._value is None:
            return self._erase()
        sealed = bytes(data)
        if code == _ENCRYPTED:
            # Sealed before key ids: one that fails authentication cannot be told from one
            # sealed with a deleted key since replaced, the likelier.
            plaintext = _open(self._value, sealed)
            return self._erase() if plaintext is None else msgspec.msgpack.decode(plaintext)
        if sealed[:_KEY_ID_BYTES] != self._id:  # sealed with a key deleted since
            return self._erase()
        plaintext = _open(self._value, sealed[_KEY_ID_BYTES:])
        if plaintext is None:
            raise _AlteredError(
                "a personal field fails authentication under the stream key that sealed it: "
                "the stored payload was altered"
            )
        return msgspec.msgpack.decode(plaintext)


@functools.lru_cache(maxsize=256)  # a cipher and a key id per stream key, not per field
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
    """The plaintext of ``data`` (sealed or not); None when sealed with a key that is gone
    (deleted, or replaced since; a snapshot sealed before key ids too) or altered since: a
    snapshot only saves replaying the events."""
    if not data.startswith(SEALED):
        return data
    sealed = data[len(SEALED) :]
    if key is None or sealed[:_KEY_ID_BYTES] != _key_id(key):
        return None
    plaintext = _open(key, sealed[_KEY_ID_BYTES:])
    if plaintext is None:
        log.warning("ignoring a snapshot altered since it was sealed: the events are replayed")
    return plaintext


@functools.lru_cache(maxsize=256)
def _key_id(key: bytes) -> bytes:
    # Names the key without revealing it: it is a 256-bit random key, and the hash one-way.
    return hashlib.sha256(b"riverbed stream key id:" + key).digest()[:_KEY_ID_BYTES]


def _encrypt(key: bytes, plaintext: bytes) -> bytes:
    """The sealing key's id, a nonce and the ciphertext."""
    nonce = os.urandom(_NONCE_BYTES)
    ciphertext: bytes = _aesgcm(key).encrypt(nonce, plaintext, None)
    return _key_id(key) + nonce + ciphertext


def _open(key: bytes, sealed: bytes) -> bytes | None:
    """The plaintext of a nonce and ciphertext; None when it fails authentication."""
    aesgcm = _aesgcm(key)
    from cryptography.exceptions import InvalidTag  # importable: _aesgcm imported cryptography

    try:
        plaintext: bytes = aesgcm.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], None)
    except InvalidTag:
        return None
    return plaintext


def _registered(name: str) -> EventType:
    return registry.named(name)


def _where(cls: type[Any]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _same_class(first: type[Any], second: type[Any]) -> bool:
    if first.__qualname__ != second.__qualname__:
        return False
    modules = {first.__module__, second.__module__}
    if len(modules) == 1:
        return True
    # A script's classes, imported again by its module name (or by a multiprocessing child as
    # __mp_main__), are the same code: unless both modules come from files, and other ones.
    if not modules & {"__main__", "__mp_main__"}:
        return False
    files = {_module_file(name) for name in modules}
    return None in files or len(files) == 1


def _module_file(name: str) -> str | None:
    path = getattr(sys.modules.get(name), "__file__", None)
    return os.path.realpath(path) if isinstance(path, str) else None
