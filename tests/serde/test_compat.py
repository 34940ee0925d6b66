"""Schema compatibility: which changes of a topic's type each mode accepts, and the messages."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import msgspec
import pytest

from riverbed.serde.compat import Compatibility, incompatibilities, schema_of

BACKWARD, FORWARD, FULL, NONE = (
    Compatibility.BACKWARD,
    Compatibility.FORWARD,
    Compatibility.FULL,
    Compatibility.NONE,
)


class V1(msgspec.Struct):
    card: str
    amount: int


class AddedWithDefault(msgspec.Struct):
    card: str
    amount: int
    currency: str = "EUR"


class AddedRequired(msgspec.Struct):
    card: str
    amount: int
    currency: str


class Removed(msgspec.Struct):
    card: str


class Retyped(msgspec.Struct):
    card: str
    amount: str


class Widened(msgspec.Struct):
    card: str
    amount: float


class Optional(msgspec.Struct):
    card: str
    amount: int | None


def problems(old: type, new: type, mode: Compatibility) -> list[str]:
    return incompatibilities(schema_of(old), schema_of(new), mode)


@pytest.mark.parametrize(
    ("new", "mode", "expected"),
    [
        (AddedWithDefault, FULL, None),
        (AddedRequired, BACKWARD, "field 'currency' is required by the new schema"),
        (AddedRequired, FORWARD, None),
        (Removed, BACKWARD, None),
        (Removed, FORWARD, "field 'amount' is required by the old schema"),
        (Retyped, BACKWARD, "field 'amount': the new schema accepts string"),
        (Retyped, FORWARD, "field 'amount': the old schema accepts integer"),
        (Widened, BACKWARD, None),
        (Widened, FORWARD, "may hold number"),
        (Optional, BACKWARD, None),
        (Optional, FORWARD, "may hold null"),
        (Retyped, NONE, None),
    ],
)
def test_changes_per_mode(new: type, mode: Compatibility, expected: str | None) -> None:
    found = problems(V1, new, mode)
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1
        assert expected in found[0]


def test_full_reports_both_directions() -> None:
    assert len(problems(V1, Retyped, FULL)) == 2


class Address(msgspec.Struct):
    city: str


class AddressWithZip(msgspec.Struct):
    city: str
    zip: str


class Customer(msgspec.Struct):
    name: str
    address: Address
    tags: list[str] = []


class CustomerV2(msgspec.Struct):
    name: str
    address: AddressWithZip
    tags: list[int] = []


def test_nested_fields_are_named_by_path() -> None:
    found = problems(Customer, CustomerV2, BACKWARD)
    assert any("field 'address.zip' is required" in p for p in found)
    assert any("field 'tags[]'" in p for p in found)


class Node(msgspec.Struct):
    value: int
    children: list[Node] = []


def test_recursive_types_terminate() -> None:
    assert problems(Node, Node, FULL) == []


class Account(msgspec.Struct):
    scores: dict[str, int]
    pair: tuple[str, int] = ("a", 1)
    address: Address | None = None


class AccountScoresAsText(msgspec.Struct):
    scores: dict[str, str]
    pair: tuple[str, int] = ("a", 1)
    address: Address | None = None


class AccountPairRetyped(msgspec.Struct):
    scores: dict[str, int]
    pair: tuple[str, str] = ("a", "1")
    address: Address | None = None


class AccountZipRequired(msgspec.Struct):
    scores: dict[str, int]
    pair: tuple[str, int] = ("a", 1)
    address: AddressWithZip | None = None


class AccountWidened(msgspec.Struct):
    scores: dict[str, float]
    pair: tuple[str, float] = ("a", 1.0)
    address: Address | None = None


def test_dict_values_tuple_items_and_optional_structs_are_compared() -> None:
    assert any("field 'scores[...]'" in p for p in problems(Account, AccountScoresAsText, BACKWARD))
    assert any("field 'pair[1]'" in p for p in problems(Account, AccountPairRetyped, BACKWARD))
    found = problems(Account, AccountZipRequired, BACKWARD)
    assert any("field 'address.zip' is required" in p for p in found)
    assert problems(Account, AccountWidened, BACKWARD) == []  # ints read as floats
    assert problems(Account, Account, FULL) == []


class Tally(msgspec.Struct):
    count: int
    tags: list[str]
    extra: dict[str, int]
    anything: Any = None


class TallyBounded(msgspec.Struct):
    count: Annotated[int, msgspec.Meta(ge=0, le=100)]
    tags: Annotated[list[Annotated[str, msgspec.Meta(max_length=8)]], msgspec.Meta(min_length=1)]
    extra: dict[str, int]
    anything: Any = None


class TallyAnythingNarrowed(msgspec.Struct):
    count: int
    tags: list[str]
    extra: dict[str, int]
    anything: int | None = None


class Loose(msgspec.Struct):
    values: list  # type: ignore[type-arg]
    mapping: dict  # type: ignore[type-arg]
    label: str


class LooseNarrowed(msgspec.Struct):
    values: list[int]
    mapping: dict[str, int]
    label: uuid.UUID


class Strict(msgspec.Struct, forbid_unknown_fields=True):
    count: int


def test_constraints_narrowing_and_forbidden_fields_are_refused_where_they_break_reading() -> None:
    found = problems(Tally, TallyBounded, BACKWARD)
    assert any("field 'count': the new schema requires minimum 0, maximum 100" in p for p in found)
    assert any("field 'tags': the new schema requires minItems 1" in p for p in found)
    assert any("field 'tags[]': the new schema requires maxLength 8" in p for p in found)
    assert problems(Tally, TallyBounded, FORWARD) == []  # the old schema reads the new data
    found = problems(Tally, TallyAnythingNarrowed, BACKWARD)
    assert found == [
        "field 'anything': the new schema accepts integer or null but data written with the old "
        "schema may hold any value"
    ]
    assert problems(Tally, TallyAnythingNarrowed, FORWARD) == []
    found = problems(Loose, LooseNarrowed, BACKWARD)
    assert any("field 'values[]': the new schema accepts integer" in p for p in found)
    assert any("field 'mapping[...]': the new schema accepts integer" in p for p in found)
    assert any("field 'label': the new schema requires format 'uuid'" in p for p in found)
    assert problems(V1, Strict, BACKWARD) == [
        "field 'count' is required by the new schema but missing from data written with the "
        "old schema; give it a default",
        *(
            f"field '{name}' of data written with the old schema is refused by the new schema, "
            "which forbids unknown fields"
            for name in ("amount", "card")
        ),
    ]
    assert problems(bytes, str, BACKWARD) == [
        "the value: data written with the old schema is raw bytes, which the new schema reads "
        "as text (they need not be UTF-8)"
    ]
    assert problems(str, bytes, BACKWARD) == []  # text is bytes
