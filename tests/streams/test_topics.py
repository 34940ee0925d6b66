"""Typed topics on an App, on every backend: codecs, schema versions, dead letters."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import pytest

import riverbed
from riverbed.serde import DeserializationError
from riverbed.serde.registry import IncompatibleSchemaError
from riverbed.streams.topics import (
    ERROR_HEADER,
    SCHEMA_VERSION_HEADER,
    SOURCE_OFFSET_HEADER,
    SOURCE_TOPIC_HEADER,
)
from tests.support import consume


class Payment(msgspec.Struct):
    card: str
    amount: int


class PaymentV2(msgspec.Struct):
    card: str
    amount: int
    currency: str = "EUR"


class PaymentBad(msgspec.Struct):
    card: str
    amount: int
    country: str


def test_typed_round_trip_with_schema_version(
    log_url: str, topic_name: Callable[[str], str]
) -> None:
    name = topic_name("payments")
    with riverbed.App("shop", url=log_url) as app:
        payments = app.topic(name, partitions=2, value=Payment, key=str)
        app.start()
        assert payments.schema_version == 1
        payments.send(app.producer, Payment("c1", 5), key="c1").result(timeout=30)
        with app.log.consumer(topics=[name], from_beginning=True) as consumer:
            (record,) = consume(consumer, 1)
        typed = payments.decode(record)
        assert (typed.key, typed.value) == ("c1", Payment("c1", 5))
        assert record.headers[SCHEMA_VERSION_HEADER] == b"1"
        assert {t.name for t in app.log.list_topics()} >= {name, name + ".dlq"}


def test_schema_evolution_is_checked_at_start(
    log_url: str, topic_name: Callable[[str], str]
) -> None:
    name = topic_name("payments")
    with riverbed.App("shop", url=log_url) as app:
        payments = app.topic(name, value=Payment)
        app.start()
        payments.send(app.producer, Payment("old", 1)).result(timeout=30)
    with riverbed.App("shop", url=log_url) as app:
        app.topic(name, value=PaymentBad)
        with pytest.raises(IncompatibleSchemaError, match="field 'country' is required"):
            app.start()
    with riverbed.App("shop", url=log_url) as app:
        evolved = app.topic(name, value=PaymentV2)
        app.start()
        assert evolved.schema_version == 2
        with app.log.consumer(topics=[name], from_beginning=True) as consumer:
            (old,) = consume(consumer, 1)
        assert evolved.decode(old).value == PaymentV2("old", 1, "EUR")  # old records still decode


def test_undecodable_record_goes_to_the_dead_letter_topic(
    log_url: str, topic_name: Callable[[str], str]
) -> None:
    name = topic_name("payments")
    with riverbed.App("shop", url=log_url) as app:
        payments = app.topic(name, value=Payment)
        app.start()
        app.producer.send(name, b'{"card": "c1", "amount": "lots"}').result(timeout=30)
        with app.log.consumer(topics=[name], from_beginning=True) as consumer:
            (bad,) = consume(consumer, 1)
        with pytest.raises(DeserializationError, match=r"Expected `int`, got `str`") as caught:
            payments.decode(bad)
        payments.dead_letter(app.producer, bad, caught.value).result(timeout=30)
        with app.log.consumer(topics=[payments.dead_letter_topic], from_beginning=True) as dlq:
            (parked,) = consume(dlq, 1)
    assert parked.value == bad.value
    assert parked.headers[SOURCE_TOPIC_HEADER] == name.encode()
    assert parked.headers[SOURCE_OFFSET_HEADER] == str(bad.offset).encode()
    assert b"DeserializationError: not a valid Payment" in parked.headers[ERROR_HEADER]


def test_declaration_errors() -> None:
    with pytest.raises(riverbed.RiverbedError, match="needs a name"):
        riverbed.App("")
    app = riverbed.App("shop", url="sqlite:///unused.db")
    app.topic("orders", value=Payment)
    with pytest.raises(riverbed.RiverbedError, match="already declared"):
        app.topic("orders", value=Payment)
    with pytest.raises(riverbed.RiverbedError, match="no codec for"):
        app.topic("other", value=object)
