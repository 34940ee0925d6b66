"""Aggregates: objects whose state is the events they recorded.

A command method decorated with ``@riverbed.event("Paid")`` records an event whose payload is
the method's arguments (a msgspec Struct made from its signature), then applies it by running
the method's body. Decorating ``__init__`` makes construction the first event. Explicit event
classes (``riverbed.DomainEvent`` subclasses with an ``apply(aggregate)`` method) are recorded
with ``self.trigger(event)``. Loading replays the stored events through the same code.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Generic, ParamSpec, Self, TypeVar

import msgspec

from riverbed.eventsourcing.codec import ENCODER, EventType, Upcaster, registry
from riverbed.eventsourcing.errors import EventSourcingError
from riverbed.eventsourcing.sources import read_at_import
from riverbed.ids import time_ordered_id

P = ParamSpec("P")
R = TypeVar("R")


class DomainEvent(msgspec.Struct, kw_only=True):
    """An explicit event class, with fields and ``def apply(self, aggregate) -> None``.

    Class attributes name and evolve it: ``event_type = "Order.Shipped"`` (default: the class's
    qualified name), ``event_version = 2`` with ``upcasters = {1: fn}`` for events stored at
    version 1, ``event_aliases = ("Order.Dispatched",)`` for the names it was stored under
    before a rename."""

    event_type: ClassVar[str] = ""
    event_version: ClassVar[int] = 1
    upcasters: ClassVar[dict[int, Upcaster]] = {}
    event_aliases: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        registry.register(
            cls.__dict__.get("event_type") or cls.__qualname__,
            cls,
            version=cls.__dict__.get("event_version", 1),
            upcasters=cls.__dict__.get("upcasters"),
            apply=lambda aggregate, event: event.apply(aggregate),
            aliases=cls.__dict__.get("event_aliases", ()),
        )

    def apply(self, aggregate: Any) -> None:
        raise NotImplementedError(f"{type(self).__qualname__} has no apply(aggregate) method")


def snapshot_every(cls: type[Aggregate]) -> int | None:
    """``cls.snapshot_every``; ``EventSourcingError`` unless it is a count of events or None
    (checked when the class is defined, and again when it is used: it may be set later)."""
    every = cls.snapshot_every
    if every is not None and (type(every) is not int or every < 1):
        raise EventSourcingError(
            f"{cls.__name__}.snapshot_every = {every!r}: give a number of events >= 1, or None "
            "for no snapshots"
        )
    return every


class Recorded(msgspec.Struct, frozen=True):
    """An event recorded by an aggregate and not yet saved (a Struct: a frozen dataclass took a
    tenth of a command's time to build)."""

    type: EventType
    version: int
    # The payload encoded when it was recorded, unencrypted: what the save stores, whatever the
    # aggregate or the caller did to the objects in it since.
    plain: bytes

    @property
    def event(self) -> Any:
        """The payload as recorded (a new copy each time)."""
        return self.type.decoder.decode(self.plain)


class Aggregate:
    """Base class of event-sourced aggregates.

    ``id`` is a time-ordered UUID (version 7, 32 hex digits) unless given
    (``Order.create(..., id="order-42")``: a natural key);
    ``version`` is the number of events applied. ``snapshot_every = 50`` in the class body makes
    ``app.events.save`` store a snapshot every 50 events, which loading starts from.
    ``stored_name = "Order"`` keeps the names its events are stored under (``Order.Placed``)
    when the class is renamed; by default they start with the class's name."""

    snapshot_every: ClassVar[int | None] = None
    stored_name: ClassVar[str] = ""
    id: str
    version: int
    _applying: EventType | None = None  # the event whose body (or apply) runs, if any
    # An event's body (or apply) raised on this instance: its state may hold a change no event
    # records, which a snapshot must not keep.
    _riverbed_body_raised = False
    # The DomainEvent classes applied to it, by name: any code may trigger one, so a snapshot
    # depends on their code too, not only on what its class's code names.
    _riverbed_triggered: frozenset[str] | set[str] = frozenset()
    # The stream key a load decrypted its state with: a snapshot must not outlive its deletion.
    _decrypted_with: bytes | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        methods: dict[int, tuple[str, EventMethod[Any, Any]]] = {}
        for attribute, value in cls.__dict__.items():
            # Once each (`add = add_line` names one twice). A base's (`add = Cart.add_line` in
            # a subclass) is its recorder by then, and its events stay the base's.
            if isinstance(value, EventMethod):
                methods.setdefault(id(value), (attribute, value))
        recording: dict[str, str] = {}  # event name -> the attribute of its method
        for attribute, method in methods.values():
            first = recording.setdefault(method.name, attribute)
            if first != attribute:  # refused before any is registered
                raise EventSourcingError(
                    f"{cls.__name__}.{first} and {cls.__name__}.{attribute} both record event "
                    f"{method.name!r}: a load would run one's body for the other's events; "
                    "give each method its own event name"
                )
        recorders = {
            key: method.register(cls, attribute) for key, (attribute, method) in methods.items()
        }
        # Each name of a method the class registered holds its recorder (a plain function, as
        # an event method then binds to an instance as any method does: a descriptor's
        # __get__ cost each command ~0.15 us).
        for attribute, value in list(cls.__dict__.items()):
            if id(value) in recorders:
                setattr(cls, attribute, recorders[id(value)])
        _rename_nested_events(cls)
        # Its code's source files as the process imported them (sources.py says why).
        read_at_import(cls.__module__, [base.__module__ for base in cls.__mro__[1:]])
        if "snapshot_every" in cls.__dict__:
            snapshot_every(cls)

    @classmethod
    def create(cls, *args: Any, id: str | None = None, **kwargs: Any) -> Self:
        """Construct through the recorded ``__init__`` event, with this ``id``."""
        if id is not None:
            check_id(id, f"{cls.__name__}.create")
        aggregate = cls.__new__(cls)
        aggregate._begin(id)
        aggregate.__init__(*args, **kwargs)  # type: ignore[misc]
        return aggregate

    def _begin(self, aggregate_id: str | None) -> None:
        self.id = aggregate_id or time_ordered_id()
        self.version = 0
        self._pending: list[Recorded] = []

    @property
    def pending(self) -> list[Recorded]:
        """Events recorded since the last save."""
        try:
            return self._pending
        except AttributeError:  # set up by _begin, which a subclass may have bypassed
            self._pending = []
            return self._pending

    def trigger(self, event: DomainEvent) -> None:
        """Record and apply an explicit event."""
        entry = registry.of(event)
        if not entry.recorded_by(type(self)):  # a load would refuse the stream
            raise EventSourcingError(
                f"{type(self).__name__} cannot record {entry.name}: it is an event of "
                f"{entry.aggregate.__name__ if entry.aggregate else 'another class'}"
            )
        self._record(event, entry)

    def _record(self, event: Any, entry: EventType) -> None:
        if "id" not in self.__dict__:
            self._begin(None)
        applying = self._applying
        if applying is not None:
            # A load would run the outer body again, recording the inner event a second time.
            raise EventSourcingError(
                f"{entry.name} recorded while applying {applying.name}: an event's body (or a "
                "DomainEvent's apply) runs again each time the aggregate loads, so it must not "
                "record events; record both from a plain, undecorated method that calls one "
                "event method after the other"
            )
        try:  # through the codec's encoder and the event's decoder, as a save and a load will
            plain = ENCODER.encode(event)
            # The body applies the payload as a load will: "red" for a Color is Color.RED, and
            # the caller's list is not the one the state keeps.
            loaded = entry.decoder.decode(plain)
        except _PAYLOAD_ERRORS as error:
            raise _payload_error(event, entry, error) from None
        assert entry.apply is not None
        if entry.aggregate is None:
            self._note_triggered(entry)
        # Applied as _replay does, inlined: this is every command's path.
        self._applying = entry
        try:
            entry.apply(self, loaded)
        except BaseException:
            self._riverbed_body_raised = True
            raise
        finally:
            self._applying = None
        self.version = version = self.version + 1
        try:
            pending = self._pending
        except AttributeError:
            pending = self.pending
        pending.append(Recorded(entry, version, plain))

    def _replay(self, event: Any, entry: EventType, version: int) -> None:
        assert entry.apply is not None
        if entry.aggregate is None:
            self._note_triggered(entry)
        self._applying = entry
        try:
            entry.apply(self, event)
        finally:
            self._applying = None
        self.version = version

    def _note_triggered(self, entry: EventType) -> None:
        triggered = self._riverbed_triggered
        if not isinstance(triggered, set):
            self._riverbed_triggered = triggered = set()
        triggered.add(entry.name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} v{self.version}>"


_MISSING = object()


class EventMethod(Generic[P, R]):
    """A command method that records the event named ``name`` (see ``event``)."""

    def __init__(
        self,
        method: Callable[P, R],
        name: str,
        version: int,
        upcasters: dict[int, Upcaster] | None,
        aliases: Sequence[str],
    ) -> None:
        if inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method):
            raise EventSourcingError(
                f"@riverbed.event({name!r}) on {method.__qualname__}: an event's body runs "
                "when the event is recorded and on every load, so it cannot be async; await "
                "in a plain method, then call the event method"
            )
        if inspect.isgeneratorfunction(method):
            raise EventSourcingError(
                f"@riverbed.event({name!r}) on {method.__qualname__}: an event's body cannot "
                "be a generator (it would never run); remove its yield"
            )
        self.method = method
        self.name = name
        self.version = version
        self.upcasters = upcasters
        self.aliases = aliases
        self.signature = inspect.signature(method)
        self.__doc__ = method.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Reached only through a decorator stacked above @riverbed.event, which wrapped this
        # object instead of the method the class would see.
        raise TypeError(
            f"@riverbed.event({self.name!r}) on {self.method.__qualname__} must be the "
            "outermost decorator: one above it hides the event method from its class"
        )

    def __set_name__(self, owner: type[Aggregate], attribute: str) -> None:
        # Registered by Aggregate.__init_subclass__: an error raised here would reach the user
        # wrapped in a RuntimeError (Python < 3.12).
        if not (isinstance(owner, type) and issubclass(owner, Aggregate)):
            raise EventSourcingError(
                f"@riverbed.event on {attribute}: the class must subclass riverbed.Aggregate"
            )

    def register(self, owner: type[Aggregate], attribute: str) -> Callable[..., None]:
        """Make the payload class and register the event, for the class ``owner``; the function
        the class holds in this method's place, whose calls record the event."""
        self._check_name_free(owner, attribute)
        try:
            hints = typing.get_type_hints(self.method, include_extras=True)
        except NameError:
            # A class the module defines further down (postponed annotations): the payload
            # class takes the names as written, and msgspec resolves them in the module on
            # first use, as for any Struct.
            hints = dict(self.method.__annotations__)
        fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
        for parameter in list(self.signature.parameters.values())[1:]:
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                raise EventSourcingError(
                    f"{owner.__name__}.{attribute}: an event method takes named parameters, "
                    "not *args or **kwargs (they become the event's fields)"
                )
            hint = hints.get(parameter.name, Any)
            if parameter.default is inspect.Parameter.empty:
                fields.append((parameter.name, hint))
            elif isinstance(parameter.default, list | dict | set | bytearray) and len(
                parameter.default
            ):
                raise EventSourcingError(
                    f"{owner.__name__}.{attribute}: parameter {parameter.name!r} defaults to a "
                    f"non-empty {type(parameter.default).__name__}, which every call would "
                    "share and change; default to None, or to a tuple or frozenset"
                )
            else:
                fields.append((parameter.name, hint, parameter.default))
        type_name = f"{stored_name(owner)}.{self.name}"
        parameters = list(self.signature.parameters.values())[1:]
        by_keyword = [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
        by_position = [p.name for p in parameters if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        # Fields in the method's parameter order, so the payload class takes a call's arguments
        # as they are: recording an event is one constructor call. With keyword-only parameters
        # (which may follow defaults) the call is bound to the signature first (``__get__``).
        try:
            payload = msgspec.defstruct(
                type_name, fields, module=owner.__module__, kw_only=bool(by_keyword)
            )
        except (TypeError, ValueError) as error:  # a default msgspec refuses, say
            raise EventSourcingError(
                f"@riverbed.event({self.name!r}) on {owner.__name__}.{attribute}: its "
                f"parameters cannot be the event's fields: {error}"
            ) from None
        method: Callable[..., Any] = self.method
        # The payload class takes any field by keyword: positional-only ones need the binding.
        positional_only = any(p.kind is inspect.Parameter.POSITIONAL_ONLY for p in parameters)
        binds = bool(by_keyword) or positional_only

        def apply(aggregate: Any, event: Any) -> None:
            method(aggregate, *msgspec.structs.astuple(event))

        def apply_by_kind(aggregate: Any, event: Any) -> None:
            method(aggregate, *[getattr(event, name) for name in by_position],
                   **{name: getattr(event, name) for name in by_keyword})  # fmt: skip

        entry = registry.register(
            type_name,
            payload,
            version=self.version,
            upcasters=self.upcasters,
            apply=apply_by_kind if by_keyword else apply,
            aggregate=owner,
            aliases=self.aliases,
        )
        # Named and documented as the method, whose signature it shows (help, editors); its
        # ``method`` and ``entry`` as the event method's, for snapshots' fingerprints and for
        # subclasses.
        recorder = functools.update_wrapper(
            _recorder(entry, self.signature if binds else None), self.method
        )
        recorder.method = self.method  # type: ignore[attr-defined]
        recorder.entry = entry  # type: ignore[attr-defined]
        # Order.Paid: the payload class, for tests; a subclass's own, not its base's.
        if self.name not in owner.__dict__:
            setattr(owner, self.name, payload)
        return recorder

    def _check_name_free(self, owner: type[Aggregate], attribute: str) -> None:
        """The class's attribute named after the event becomes its payload class (for tests:
        ``Order.Paid``): refused if the class has one of that name already, its own or
        inherited, but for the payload class of an event of that name of a base."""
        existing = inspect.getattr_static(owner, self.name, _MISSING)
        if existing is _MISSING:
            return
        payloads_of_bases = {
            entry.cls
            for base in owner.__mro__[1:]
            for value in vars(base).values()
            if isinstance(entry := getattr(value, "entry", None), EventType)
        }
        if existing in payloads_of_bases:
            return  # a subclass's event of the same name: its own payload class replaces it
        if isinstance(existing, type) and issubclass(existing, DomainEvent):
            return  # a nested event class of that name: the registry refuses the pair
        if existing is self:
            what = "this event method"
        else:
            where = next(c for c in owner.__mro__ if self.name in vars(c))
            what = f"a {type(existing).__name__} of {where.__module__}.{where.__qualname__}"
        raise EventSourcingError(
            f"@riverbed.event({self.name!r}) on {owner.__name__}.{attribute}: "
            f"{owner.__name__}.{self.name} is {what}, and the event's payload class would take "
            "its place; name the event after what happened (a verb in the past tense, like "
            "'Paid'), with a name the class does not use"
        )


def _rename_nested_events(cls: type[Aggregate]) -> None:
    """DomainEvent classes nested in a class that keeps its old ``stored_name`` keep their
    old names too (``Order.Shipped`` in ``Purchase`` with ``stored_name = "Order"``), unless
    they name themselves (``event_type``)."""
    own = cls.__dict__.get("stored_name")
    if not own or own == cls.__name__:
        return
    inside = f"{cls.__qualname__}."
    namespaces: list[type] = [cls]
    while namespaces:  # the class, and classes nested in it (``Purchase.Events.Cancelled``)
        for value in list(vars(namespaces.pop()).values()):
            if not (isinstance(value, type) and value.__qualname__.startswith(inside)):
                continue
            if issubclass(value, DomainEvent):
                if not value.__dict__.get("event_type"):
                    registry.rename(value, own + value.__qualname__.removeprefix(cls.__qualname__))
            elif not issubclass(value, Aggregate):
                namespaces.append(value)


def stored_name(cls: type[Aggregate]) -> str:
    """The name a class's events and snapshots are stored under: its own ``stored_name`` (kept
    through a rename), else its name."""
    return cls.__dict__.get("stored_name") or cls.__name__


def check_id(aggregate_id: object, where: str) -> None:
    """Raise ``ValueError`` unless ``aggregate_id`` is a valid key (``check_key``)."""
    check_key(aggregate_id, "an aggregate id", where)


def check_key(key: object, what: str, where: str) -> None:
    """Raise ``ValueError`` unless ``key`` is a non-empty str without NUL characters, which
    UTF-8 encodes (no lone surrogates) in at most ``MAX_ID_BYTES``: the keys both stores take
    (``what``: "an aggregate id", "a timer key")."""
    if not isinstance(key, str) or not key or "\x00" in key:
        # PostgreSQL cuts a text at a NUL: "a\x00b" would land in the stream "a".
        raise ValueError(f"{where}: {what} is a non-empty str without NUL characters, got {key!r}")
    try:
        size = len(key.encode())
    except UnicodeEncodeError:
        raise ValueError(
            f"{where}: {what} is text UTF-8 can encode, got {key!r} (a lone surrogate)"
        ) from None
    if size > MAX_ID_BYTES:
        raise ValueError(
            f"{where}: {what} is at most {MAX_ID_BYTES:,} bytes in UTF-8, got {size:,} "
            f"({key[:40]!r}...)"
        )


# PostgreSQL's index entries take ~2,700 bytes at most; both stores take the same ids.
MAX_ID_BYTES = 1000
# A projection's, process manager's or inbox's name goes into its checkpoint's, claim's and
# collections' names, which the stores take up to MAX_ID_BYTES.
MAX_NAME_BYTES = 200


def check_name(name: object, where: str) -> None:
    """Raise ``ValueError`` unless ``name`` can name a projection, process manager or inbox:
    a key both stores take (``check_key``) of at most ``MAX_NAME_BYTES``."""
    check_key(name, "a name", where)
    assert isinstance(name, str)
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"{where} is at most {MAX_NAME_BYTES} bytes, got {name[:40]!r}...")


# What the encoder raises for a value it cannot encode
_ENCODE_ERRORS = (NotImplementedError, OverflowError, TypeError, ValueError)
_PAYLOAD_ERRORS = (msgspec.ValidationError, *_ENCODE_ERRORS)


def _payload_error(event: Any, entry: EventType, error: Exception) -> TypeError:
    """The error for an event that would not load back, naming its field."""
    if isinstance(error, msgspec.ValidationError):  # its message ends "- at `$.amount`"
        return TypeError(f"{entry.name}: {error}")
    # The encoder's messages name no field: find the first that does not encode.
    for name in event.__struct_fields__:
        try:
            ENCODER.encode(getattr(event, name))
        except _ENCODE_ERRORS:
            return TypeError(f"{entry.name}: {error} - at `$.{name}`")
    return TypeError(f"{entry.name}: {error}")


def _recorder(entry: EventType, signature: inspect.Signature | None) -> Callable[..., None]:
    """The function an event method's calls run, given the instance: it makes the payload of
    the call's arguments and records it (bound to ``signature`` first, if given)."""
    make = entry.cls

    if signature is None:

        def record(instance: Aggregate, *args: Any, **kwargs: Any) -> None:
            try:
                payload = make(*args, **kwargs)
            except TypeError as error:
                raise TypeError(f"{entry.name}: {error}") from None
            instance._record(payload, entry)

        return record

    self_name = next(iter(signature.parameters))

    def record_bound(instance: Aggregate, *args: Any, **kwargs: Any) -> None:
        try:
            bound = signature.bind(instance, *args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{entry.name}: {error}") from None
        fields = dict(bound.arguments)
        del fields[self_name]
        instance._record(make(**fields), entry)

    return record_bound


def event(
    name: str,
    *,
    version: int = 1,
    upcasters: dict[int, Upcaster] | None = None,
    aliases: Sequence[str] = (),
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """``@riverbed.event("Paid")`` on an aggregate method: calling it records the event
    ``<Aggregate>.Paid`` with the call's arguments as its payload and applies it by running the
    body. Arguments that would not load back as the annotations say raise ``TypeError``, and
    the body must not record events (it runs again on every load). ``version``/``upcasters``
    evolve the payload's shape; ``aliases`` are the full names it was stored under before a
    rename (``("Order.Settled",)``), which still load as it."""

    # Checked here: raised from __set_name__, the error would reach the user wrapped.
    if type(version) is not int or version < 1:
        raise EventSourcingError(f"event {name!r}: version={version!r}, give an int >= 1")
    missing = [v for v in range(1, version) if v not in (upcasters or {})]
    if missing:
        raise EventSourcingError(
            f"event {name!r} is at version {version} but has no upcaster from version "
            f"{missing[0]}; pass upcasters={{{missing[0]}: fn}}"
        )

    def decorate(method: Callable[P, R]) -> Callable[P, R]:
        return EventMethod(method, name, version, upcasters, aliases)

    return decorate
