"""Crypto-shredding on both stores: personal data saved after a key deletion, personal fields of
every type, personal fields nested in a field's type, and payloads altered since sealed."""

# No `from __future__ import annotations`: the classes defined in tests annotate with locals.

import asyncio
import copy
import dataclasses
import os
import pickle
import uuid
from datetime import date
from typing import Annotated, Any, Literal

import msgspec
import pydantic
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import riverbed
from riverbed.eventsourcing import EventSourcing
from riverbed.eventsourcing.codec import registry
from riverbed.eventsourcing.errors import EventSourcingError
from riverbed.eventsourcing.records import NewEvent, StreamAppend


def cause(raised: pytest.ExceptionInfo[Exception]) -> str:
    """The refusal's message (Python 3.11 wraps errors of __set_name__ in a RuntimeError)."""
    error = raised.value.__cause__ or raised.value
    assert isinstance(error, EventSourcingError)
    return str(error)


class Subscriber(riverbed.Aggregate):
    snapshot_every = 2
    email: str
    touches: int

    @riverbed.event("Joined")
    def __init__(self, email: Annotated[str, riverbed.Personal]) -> None:
        self.email = email
        self.touches = 0

    @riverbed.event("Touched")
    def touch(self) -> None:
        self.touches += 1

    @riverbed.event("EmailChanged")
    def change(self, email: Annotated[str, riverbed.Personal]) -> None:
        self.email = email


def test_personal_data_saved_after_a_key_deletion_loads_with_the_stream(
    events: EventSourcing,
) -> None:
    subscriber = Subscriber("old@example.com")
    subscriber.touch()  # version 2: a snapshot sealed with the first key
    events.save(subscriber)
    assert events.store.delete_stream_key(subscriber.id)
    assert events.get(Subscriber, subscriber.id).email == riverbed.ERASED

    # A second key seals the new address; the first key's snapshot and field stay erased.
    events.handle(Subscriber, subscriber.id, lambda s: s.change("new@example.com"))
    loaded = events.get(Subscriber, subscriber.id)
    assert (loaded.email, loaded.touches, loaded.version) == ("new@example.com", 1, 3)
    read = [
        (e.type, e.event.email if e.type != "Subscriber.Touched" else None) for e in events.read()
    ]
    assert read == [
        ("Subscriber.Joined", riverbed.ERASED),
        ("Subscriber.Touched", None),
        ("Subscriber.EmailChanged", "new@example.com"),
    ]
    relayed = events.decode(events.store.read_stream(subscriber.id)[0])  # as a consumer would
    assert relayed.event.email == riverbed.ERASED

    # A snapshot sealed with the second key loads; deleting that key erases both addresses.
    events.handle(Subscriber, subscriber.id, lambda s: s.touch())  # version 4: a snapshot
    assert events.get(Subscriber, subscriber.id).email == "new@example.com"
    assert events.store.delete_stream_key(subscriber.id)
    shredded = events.get(Subscriber, subscriber.id)
    assert (shredded.email, shredded.touches, shredded.version) == (riverbed.ERASED, 2, 4)
    assert [e.event.email for e in events.read() if e.type != "Subscriber.Touched"] == [
        riverbed.ERASED,
        riverbed.ERASED,
    ]


def test_a_load_that_a_key_deletion_overtook_takes_no_snapshot_of_the_erased_data(
    events: EventSourcing, store_url: str
) -> None:
    subscriber = Subscriber("ada@example.com")
    subscriber.touch()  # version 2: a snapshot sealed with the first key
    events.save(subscriber)
    store, read_stream = events.store, events.store.read_stream
    other = EventSourcing("shop", store_url)  # another worker

    def deleted_meanwhile(stream: str, start: int, end: int | None) -> object:
        del store.read_stream  # type: ignore[method-assign]
        assert other.store.delete_stream_key(subscriber.id)
        other.handle(Subscriber, subscriber.id, lambda s: s.change("new@example.com"))  # key 2
        return read_stream(stream, start, end)

    store.read_stream = deleted_meanwhile  # type: ignore[method-assign]
    racing = events.get(Subscriber, subscriber.id)  # the snapshot read with the first key
    assert racing.version == 3
    racing.touch()
    events.save(racing)  # version 4: a snapshot is due, but no key fits both keys' data
    assert store.load_snapshot(subscriber.id, None).version == 2  # type: ignore[union-attr]
    assert other.get(Subscriber, subscriber.id).email == "new@example.com"
    other.handle(Subscriber, subscriber.id, lambda s: s.change("newer@example.com"))
    assert [e.event.email for e in other.read() if e.type != "Subscriber.Touched"] == [
        riverbed.ERASED, "new@example.com", "newer@example.com",
    ]  # fmt: skip
    other.close()


def test_a_snapshot_saved_from_async_code_is_sealed_too(events: EventSourcing) -> None:
    subscriber = Subscriber("ada@example.com")

    async def main() -> None:
        await events.save_async(subscriber)  # makes the stream's key
        await events.handle_async(Subscriber, subscriber.id, lambda s: s.touch())  # a snapshot
        await events.close_async()

    asyncio.run(main())
    snapshot = events.store.load_snapshot(subscriber.id)
    assert snapshot is not None and b"ada@example.com" not in snapshot.data
    assert events.store.delete_stream_key(subscriber.id)
    assert events.get(Subscriber, subscriber.id).email == riverbed.ERASED


def test_upcasters_see_an_erased_field_as_the_class_reads_it(events: EventSourcing) -> None:
    stream = "lowered-1"
    events.save(Subscriber.create("Ada@Example.com", id=stream))  # its key seals the address
    stored = events.store.read_stream(stream)[0]
    events.store.append([StreamAppend(stream, 1, [NewEvent(  # as version 1 of an event stored it
        str(uuid.uuid4()), stream, 2, "Subscriber.Emailed", 1,
        msgspec.msgpack.encode({"to": msgspec.msgpack.decode(stored.data)["email"]}),
        stored.metadata, stored.timestamp_ms,
    )])])  # fmt: skip

    def lowered(data: dict[str, Any]) -> dict[str, Any]:
        return {"to": data["to"].lower()}

    class Emailed(riverbed.DomainEvent):
        event_type = "Subscriber.Emailed"
        event_version = 2
        upcasters = {1: lowered}  # noqa: RUF012
        to: Annotated[str, riverbed.Personal]

        def apply(self, subscriber: Any) -> None:
            subscriber.email = self.to

    assert events.get(Subscriber, stream).email == "ada@example.com"
    assert events.store.delete_stream_key(stream)
    assert events.get(Subscriber, stream).email == riverbed.ERASED

    def failing(data: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("address")

    registry.of(Emailed(to="x")).upcasters[1] = failing
    with pytest.raises(riverbed.EventDecodeError, match=(
        r"Subscriber.Emailed at position 2: its upcaster from version 1 raised KeyError"
    )):  # fmt: skip
        events.get(Subscriber, stream)


def stored_as_older_code(
    events: EventSourcing, stream: str, event_type: str, **fields: str
) -> None:
    """Append to ``stream`` an event of ``event_type`` (version 1) whose fields are sealed
    with the stream's key (those given as "email": the address Ada joined with), as code that
    marked them personal stored them."""
    events.save(Subscriber.create("Ada@Example.com", id=stream))
    stored = events.store.read_stream(stream)[0]
    sealed = msgspec.msgpack.decode(stored.data)["email"]
    data = {name: sealed if value == "email" else value for name, value in fields.items()}
    events.store.append([StreamAppend(stream, 1, [NewEvent(
        str(uuid.uuid4()), stream, 2, event_type, 1, msgspec.msgpack.encode(data),
        stored.metadata, stored.timestamp_ms,
    )])])  # fmt: skip


def test_upcasters_may_treat_an_erased_field_they_move_as_a_str(events: EventSourcing) -> None:
    stream = "moved-1"
    stored_as_older_code(events, stream, "Subscriber.Forwarded", address="email")

    def moved(data: dict[str, Any]) -> dict[str, Any]:
        return {"to": data.pop("address").strip().lower(), "cc": data.get("cc")}

    class Forwarded(riverbed.DomainEvent):
        event_type = "Subscriber.Forwarded"
        event_version = 2
        upcasters = {1: moved}  # noqa: RUF012
        to: Annotated[str, riverbed.Personal]
        cc: Annotated[str | None, riverbed.Personal] = None

        def apply(self, subscriber: Any) -> None:
            subscriber.email = self.to

    assert events.get(Subscriber, stream).email == "ada@example.com"
    assert events.store.delete_stream_key(stream)
    assert events.get(Subscriber, stream).email == riverbed.ERASED  # a private marker's .strip
    assert events.read()[-1].event.to == riverbed.ERASED


def test_an_erased_field_an_upcaster_copies_into_a_list_reads_as_plain_text(
    events: EventSourcing,
) -> None:
    stream = "listed-1"
    stored_as_older_code(events, stream, "Subscriber.Listed", address="email")

    def listed(data: dict[str, Any]) -> dict[str, Any]:
        data = copy.deepcopy(data)  # a defensive habit: the marker copies too
        return {"emails": [data.pop("address")]}

    class Listed(riverbed.DomainEvent):
        event_type = "Subscriber.Listed"
        event_version = 2
        upcasters = {1: listed}  # noqa: RUF012
        emails: Annotated[list[str] | None, riverbed.Personal]

        def apply(self, subscriber: Any) -> None:
            subscriber.email = self.emails[0] if self.emails else ""

    assert events.store.delete_stream_key(stream)
    loaded = events.get(Subscriber, stream)
    assert loaded.email == riverbed.ERASED and type(loaded.email) is str
    pickle.loads(pickle.dumps(loaded))
    events.handle(Subscriber, stream, lambda s: s.change(s.email))  # it saves as any str


def test_a_field_whose_type_changed_without_an_upcaster_is_still_an_error(
    events: EventSourcing,
) -> None:
    events.save(Subscriber.create("ada@example.com", id="hashed-1"))
    stored = events.store.read_stream("hashed-1")[0]
    hexdigest = "ab" * 32  # valid base64 too, which bytes would take without a word
    events.store.append([StreamAppend("hashed-1", 1, [NewEvent(
        str(uuid.uuid4()), "hashed-1", 2, "Subscriber.Hashed", 1,
        msgspec.msgpack.encode({"digest": hexdigest}), stored.metadata, stored.timestamp_ms,
    )])])  # fmt: skip

    class Hashed(riverbed.DomainEvent):  # stored when it was `digest: str`
        event_type = "Subscriber.Hashed"
        digest: bytes

        def apply(self, subscriber: Any) -> None:
            pass

    with pytest.raises(riverbed.EventDecodeError, match=(
        r"Subscriber.Hashed at position \d+ does not decode .*Expected `bytes`, got `str`"
    )):  # fmt: skip
        events.get(Subscriber, "hashed-1")


def test_a_field_no_longer_marked_personal_reads_as_sealed_or_erased(
    events: EventSourcing,
) -> None:
    stream = "unmarked-1"
    stored_as_older_code(
        events, stream, "Subscriber.Noted", email="email", note="email", details="email"
    )

    class Noted(riverbed.DomainEvent):  # no field is personal any more
        event_type = "Subscriber.Noted"
        email: str
        note: str | None
        details: Any  # which takes the sealed value as it is, unless riverbed opens it

        def apply(self, subscriber: Any) -> None:
            subscriber.email = self.email

    assert events.get(Subscriber, stream).email == "Ada@Example.com"
    assert events.read()[-1].event.details == "Ada@Example.com"
    assert events.store.delete_stream_key(stream)
    assert events.get(Subscriber, stream).email == riverbed.ERASED
    assert events.read()[-1].event == Noted(email=riverbed.ERASED, note=None, details=None)

    class Detailed(riverbed.DomainEvent):  # no other field fails to decode sealed
        event_type = "Subscriber.Detailed"
        details: Any

        def apply(self, subscriber: Any) -> None:
            subscriber.details = self.details

    stored_as_older_code(events, "detailed-1", "Subscriber.Detailed", details="email")
    assert events.get(Subscriber, "detailed-1").details == "Ada@Example.com"  # not the Ext
    assert events.store.delete_stream_key("detailed-1")
    assert events.get(Subscriber, "detailed-1").details is None

    class Counted(riverbed.DomainEvent):
        event_type = "Subscriber.Counted"
        count: int

        def apply(self, subscriber: Any) -> None:
            pass

    stored_as_older_code(events, "counted-1", "Subscriber.Counted", count="email")
    assert events.store.delete_stream_key("counted-1")
    with pytest.raises(riverbed.EventDecodeError, match=(
        r"field 'count' was personal when it was stored, and its stream's key is deleted, but "
        r"its type now has no erased value"
    )):  # fmt: skip
        events.get(Subscriber, "counted-1")


def test_a_personal_field_altered_since_sealed_is_an_error_not_erased(
    events: EventSourcing,
) -> None:
    subscriber = Subscriber("ada@example.com")
    events.save(subscriber)
    stored = events.store.read_stream(subscriber.id)[0]
    fields = msgspec.msgpack.decode(stored.data)
    sealed = fields["email"]
    assert isinstance(sealed, msgspec.msgpack.Ext)
    altered = bytes(sealed.data[:-1]) + bytes([sealed.data[-1] ^ 1])
    fields["email"] = msgspec.msgpack.Ext(sealed.code, altered)
    events.store.append([StreamAppend(subscriber.id, 1, [NewEvent(
        str(uuid.uuid4()), subscriber.id, 2, stored.type, stored.schema,
        msgspec.msgpack.encode(fields), stored.metadata, stored.timestamp_ms,
    )])])  # fmt: skip
    with pytest.raises(riverbed.EventDecodeError, match=r"at position 2 .*altered"):
        events.read()


def test_a_snapshot_altered_since_sealed_is_ignored(
    events: EventSourcing, caplog: pytest.LogCaptureFixture
) -> None:
    subscriber = Subscriber("ada@example.com")
    subscriber.touch()  # version 2: a sealed snapshot
    events.save(subscriber)
    snapshot = events.store.load_snapshot(subscriber.id)
    assert snapshot is not None
    altered = snapshot.data[:-1] + bytes([snapshot.data[-1] ^ 1])
    events.store.save_snapshot(msgspec.structs.replace(snapshot, data=altered))
    loaded = events.get(Subscriber, subscriber.id)  # replayed from the events
    assert (loaded.email, loaded.touches) == ("ada@example.com", 1)
    assert "ignoring a snapshot altered since it was sealed" in caplog.text


def test_a_field_sealed_before_key_ids_with_a_deleted_key_reads_as_erased(
    events: EventSourcing,
) -> None:
    # Sealed as riverbed did before key ids: a nonce and the ciphertext, under a key that was
    # deleted and then replaced by the stream's current one.
    subscriber = Subscriber("ada@example.com")
    events.save(subscriber)
    deleted = AESGCM(AESGCM.generate_key(bit_length=256))
    nonce = os.urandom(12)
    sealed = nonce + deleted.encrypt(nonce, msgspec.msgpack.encode("old@example.com"), None)
    stored = events.store.read_stream(subscriber.id)[0]
    events.store.append([StreamAppend(subscriber.id, 1, [NewEvent(
        str(uuid.uuid4()), subscriber.id, 2, "Subscriber.EmailChanged", 1,
        msgspec.msgpack.encode({"email": msgspec.msgpack.Ext(1, sealed)}), stored.metadata,
        stored.timestamp_ms,
    )])])  # fmt: skip
    assert [e.event.email for e in events.read()] == ["ada@example.com", riverbed.ERASED]


@pytest.mark.parametrize(
    ("hint", "shown"),
    [(int, "int"), (date, "date"), (Literal["gold", "basic"], "Literal['gold', 'basic']")],
)
def test_a_personal_field_with_no_erased_value_is_refused_at_definition(
    hint: Any, shown: str
) -> None:
    with pytest.raises((EventSourcingError, RuntimeError)) as raised:

        class Donor(riverbed.Aggregate):
            @riverbed.event("Registered")
            def __init__(self, detail: Annotated[hint, riverbed.Personal]) -> None:  # type: ignore[valid-type]
                self.detail = detail

    message = cause(raised)
    assert "Donor.Registered: personal field 'detail'" in message
    assert f"make it optional (`detail: Annotated[{shown} | None, riverbed.Personal]`)" in message

    with pytest.raises(EventSourcingError, match=r"Consented: personal field 'on' \(date\)"):

        class Consented(riverbed.DomainEvent):
            on: Annotated[date, riverbed.Personal]


class Address(msgspec.Struct):
    street: Annotated[str, riverbed.Personal]
    city: str


@dataclasses.dataclass
class Contact:
    phone: Annotated[str, riverbed.Personal]


class Route(msgspec.Struct):
    stops: list[Address]


class Patient(riverbed.Aggregate):
    @riverbed.event("Admitted")
    def __init__(
        self,
        name: Annotated[str, riverbed.Personal],
        age: Annotated[int | None, riverbed.Personal],
        born: Annotated[date | None, riverbed.Personal] = None,
        ward: str = "",
        # Whole: a field of its type may be marked personal, encrypted with the rest.
        address: Annotated[Address | None, riverbed.Personal] = None,
    ) -> None:
        self.name, self.age, self.born, self.ward = name, age, born, ward
        self.address = address


def test_optional_personal_fields_of_any_type_erase_to_none(events: EventSourcing) -> None:
    assert registry.named("Patient.Admitted").personal == {
        "name": riverbed.ERASED,
        "age": None,
        "born": None,
        "address": None,
    }
    patient = Patient("Ada", 36, date(1990, 12, 10), "east", Address("1 Rue Royale", "Paris"))
    events.save(patient)
    assert b"Ada" not in events.store.read_stream(patient.id)[0].data
    assert b"Rue Royale" not in events.store.read_stream(patient.id)[0].data
    assert events.get(Patient, patient.id).address == Address("1 Rue Royale", "Paris")
    assert events.store.delete_stream_key(patient.id)
    shredded = events.get(Patient, patient.id)
    erased = (shredded.name, shredded.age, shredded.born, shredded.address, shredded.ward)
    assert erased == (riverbed.ERASED, None, None, None, "east")


class Mailbox(pydantic.BaseModel):
    street: Annotated[str, riverbed.Personal]


@pytest.mark.parametrize(
    ("hint", "where", "whole"),
    [
        (Address, "address.street", "Address | None"),
        (Mailbox, "address.street", "Mailbox | None"),
        (Address | None, "address.street", "Address | None"),
        (Contact, "address.phone", "Contact | None"),
        (Route, "address.stops.street", "Route | None"),
        (dict[str, list[Address]], "address.street", "dict[str, list[Address]] | None"),
        (Annotated[str, riverbed.Personal] | None, "address", "str | None"),
    ],
)
def test_a_personal_field_nested_in_a_fields_type_is_refused(
    hint: Any, where: str, whole: str
) -> None:
    with pytest.raises((EventSourcingError, RuntimeError)) as raised:

        class Courier(riverbed.Aggregate):
            @riverbed.event("Hired")
            def __init__(self, address: hint) -> None:  # type: ignore[valid-type]
                self.address = address

    message = cause(raised)
    assert f"Courier.Hired: field 'address' marks {where} riverbed.Personal" in message
    assert f"mark the whole field (`address: Annotated[{whole}" in message


class Signup(riverbed.DomainEvent):
    event_type = "Shredding.Signup"
    email: Annotated[str, riverbed.Personal]
    plan: "Plan"  # defined below: the personal field is found on first use

    def apply(self, aggregate: Any) -> None:
        aggregate.email = self.email


class Plan(msgspec.Struct):
    name: str


class Member(riverbed.Aggregate):
    email: str


def test_personal_fields_of_an_event_defined_before_its_field_types_are_encrypted(
    events: EventSourcing,
) -> None:
    member = Member()
    member.trigger(Signup(email="ada@example.com", plan=Plan("gold")))
    events.save(member)
    assert b"ada@example.com" not in events.store.read_stream(member.id)[0].data
    assert events.store.delete_stream_key(member.id)
    assert events.get(Member, member.id).email == riverbed.ERASED


class Moved(riverbed.DomainEvent, rename="camel"):
    event_type = "Member.Moved"
    street_address: Annotated[str, riverbed.Personal]
    city: Annotated[str, riverbed.Personal] = msgspec.field(name="town")

    def apply(self, member: Any) -> None:
        member.street_address, member.city = self.street_address, self.city


def test_personal_fields_stored_under_other_names_are_encrypted(events: EventSourcing) -> None:
    member = Member()
    member.trigger(Moved(street_address="1 Main St", city="Springfield"))
    events.save(member)
    (stored,) = events.store.read_stream(member.id)
    assert b"1 Main St" not in stored.data and b"Springfield" not in stored.data
    assert set(msgspec.msgpack.decode(stored.data)) == {"streetAddress", "town"}
    assert events.get(Member, member.id).city == "Springfield"
    assert events.store.delete_stream_key(member.id)
    loaded = events.get(Member, member.id)
    assert (loaded.street_address, loaded.city) == (riverbed.ERASED, riverbed.ERASED)


class Packed(riverbed.DomainEvent, array_like=True):
    event_type = "Member.Packed"
    email: Annotated[str, riverbed.Personal]

    def apply(self, member: Any) -> None:
        member.email = self.email


def test_an_array_like_event_class_is_refused_with_nothing_saved(events: EventSourcing) -> None:
    member = Member()
    member.trigger(Packed(email="ada@example.com"))
    with pytest.raises(EventSourcingError, match="Packed cannot be array_like=True: events are"):
        events.save(member)
    assert events.store.read_stream(member.id) == []
    packed = NewEvent(str(uuid.uuid4()), "m-1", 1, "Member.Packed", 1, b"\x91\xa3ada", b"\x80", 0)
    events.store.append([StreamAppend("m-1", 0, [packed])])  # as an older riverbed stored it
    with pytest.raises(EventSourcingError, match="Packed cannot be array_like=True"):
        events.get(Member, "m-1")
