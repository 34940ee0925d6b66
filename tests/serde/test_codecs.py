"""Codecs chosen from types: round trips, and clear errors for wrong values and bad bytes."""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any

import msgspec
import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from riverbed.serde import DeserializationError, SerializationError, codec_for


class Payment(msgspec.Struct):
    card: str
    amount: int
    ts: float = 0.0


@dataclasses.dataclass
class Click:
    page: str
    user: int


class Order(pydantic.BaseModel):
    id: int
    total: float


@pytest.mark.parametrize(
    ("tp", "value"),
    [
        (Payment, Payment("c1", 5, 1.5)),
        (Click, Click("home", 7)),
        (Order, Order(id=1, total=9.5)),
        (dict[str, int], {"a": 1}),
        (list[str], ["x", "y"]),
        (str, "héllo"),
        (bytes, b"\x00\xff"),
        (None, b"raw"),
    ],
)
def test_round_trip(tp: Any, value: Any) -> None:
    codec = codec_for(tp)
    data = codec.encode(value)
    assert isinstance(data, bytes)
    assert codec.decode(data) == value
    assert codec.decode_many([data, data]) == [value, value]


# JSON has no infinity or NaN (msgspec writes them as null), so the property keeps to finite floats.
@given(
    st.builds(
        Payment,
        st.text(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
    )
)
def test_struct_round_trip_property(payment: Payment) -> None:
    codec = codec_for(Payment)
    assert codec.decode(codec.encode(payment)) == payment


class Customer(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    customer_id: int = pydantic.Field(alias="customerId")
    net: int

    @pydantic.computed_field  # type: ignore[prop-decorator]
    @property
    def gross(self) -> int:
        return 2 * self.net


@pytest.mark.parametrize(
    ("tp", "value"),
    [
        (Payment | None, Payment("c1", 5)),
        (Payment | None, None),
        (int | str, "five"),
        (Annotated[int, msgspec.Meta(ge=0)], 5),
        (float, 3),  # an int is a float, as msgspec decodes it
        (Customer, Customer(customerId=7, net=2)),  # aliases written, computed fields not
    ],
)
def test_unions_annotated_types_and_pydantic_aliases_round_trip(tp: Any, value: Any) -> None:
    codec = codec_for(tp)
    assert codec.decode(codec.encode(value)) == value
    assert codec.decode_many(codec.encode_many([value, value])) == [value, value]


@pytest.mark.parametrize(
    ("tp", "value", "reason"),
    [
        (Payment, Payment(7, 5), r"Expected `str`, got `int` - at `\$.card`"),  # type: ignore[arg-type]
        (Payment, Payment("c", 2.5), r"Expected `int`, got `float` - at `\$.amount`"),  # type: ignore[arg-type]
        (Payment, Payment("c", 1, math.nan), "got `null`.*a NaN or infinity, which JSON can only"),
        (Click, Click("home", "7"), r"Expected `int`, got `str` - at `\$.user`"),  # type: ignore[arg-type]
        (dict[str, int], {"a": "x"}, "Expected `int`, got `str`"),
        (int, True, "Expected `int`, got `bool`"),
        (Annotated[int, msgspec.Meta(ge=0)], -1, "Expected `int` >= 0"),
        (int | None, "five", "Expected `int | null`, got `str`"),
    ],
)
def test_a_value_whose_fields_have_the_wrong_types_is_refused_on_encode(
    tp: Any, value: Any, reason: str
) -> None:
    codec = codec_for(tp)
    with pytest.raises(SerializationError, match=reason):
        codec.encode(value)
    with pytest.raises(SerializationError, match=reason):  # the batch names it too
        codec.encode_many([value])


def test_wrong_value_type_is_refused() -> None:
    with pytest.raises(SerializationError, match="cannot encode a Click as Payment"):
        codec_for(Payment).encode(Click("home", 1))
    with pytest.raises(SerializationError, match="as bytes"):
        codec_for(bytes).encode("text")
    with pytest.raises(SerializationError, match="as str"):
        codec_for(str).encode(b"bytes")
    with pytest.raises(SerializationError, match="as Order"):
        codec_for(Order).encode({"id": 1})


@pytest.mark.parametrize(
    ("tp", "data", "reason"),
    [
        (Payment, b'{"card": "c1"}', r"Object missing required field `amount`"),
        (Payment, b'{"card": "c1", "amount": "x"}', r"Expected `int`, got `str` - at `\$.amount`"),
        (Payment, b"not json", "not a valid Payment"),
        (Order, b'{"id": "x", "total": 1}', "not a valid Order"),
        (str, b"\xff\xfe", "not UTF-8"),
    ],
)
def test_bad_bytes_say_why(tp: Any, data: bytes, reason: str) -> None:
    with pytest.raises(DeserializationError, match=reason):
        codec_for(tp).decode(data)
    with pytest.raises(DeserializationError, match=reason):
        codec_for(tp).decode_many([codec_for(tp).encode(_sample(tp)), data])


def _sample(tp: Any) -> Any:
    return {Payment: Payment("c", 1), Order: Order(id=1, total=1.0), str: "ok"}[tp]


def test_unsupported_type() -> None:
    class Plain:
        pass

    with pytest.raises(SerializationError, match="no codec for"):
        codec_for(Plain)
