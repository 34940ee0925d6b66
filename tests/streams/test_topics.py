"""Typed topics on an App, on every backend: codecs, schema versions, dead letters."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

import riverbed
from riverbed.log.api import Record
from riverbed.serde import DeserializationError
from riverbed.serde.registry import IncompatibleSchemaError
from riverbed.streams.topics import (
    ERROR_HEADER,
    SCHEMA_VERSION_HEADER,
    SOURCE_OFFSET_HEADER,
    SOURCE_TOPIC_HEADER,
    Topic,
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
        app.topic(name, value=PaymentV2, key=int)  # keys were raw bytes
        with pytest.raises(IncompatibleSchemaError, match=f"schema for '{name}-key'"):
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
    assert (
        f"DeserializationError: the value of record {name}[0]@0: not a valid Payment".encode()
        in parked.headers[ERROR_HEADER]
    )


def test_declaration_errors() -> None:
    with pytest.raises(riverbed.RiverbedError, match="needs a name"):
        riverbed.App("")
    app = riverbed.App("shop", url="sqlite:///unused.db")
    app.topic("orders", value=Payment)
    with pytest.raises(riverbed.RiverbedError, match="already declared"):
        app.topic("orders", value=Payment)
    with pytest.raises(riverbed.RiverbedError, match="no codec for"):
        app.topic("other", value=object)


def test_a_record_that_does_not_decode_is_named_with_its_key_or_value() -> None:
    payments = Topic("payments", 1, int, Payment, False, None, riverbed.Compatibility.BACKWARD)
    good = b'{"card": "c1", "amount": 5}'
    for key, value, reason in (
        (b"x", good, r"the key of record payments\[0\]@7: not a valid int"),
        (b"1", b"{}", r"the value of record payments\[0\]@7: not a valid Payment"),
        (b"1", None, r"record payments\[0\]@7 is a tombstone"),
    ):
        with pytest.raises(DeserializationError, match=reason):
            payments.decode(Record("payments", 0, 7, 0, key, value))
    with pytest.raises(riverbed.SerializationError, match="the key for topic 'payments': cannot"):
        payments.encode(Payment("c1", 5), key="1")  # type: ignore[arg-type]
    raw = Topic("raw", 1, None, None, False, None, riverbed.Compatibility.BACKWARD)
    with pytest.raises(riverbed.SerializationError, match=r"the key for .* or key=\.\.\. for"):
        raw.encode(b"v", key="k")  # type: ignore[arg-type]


def test_a_topic_that_exists_with_other_partitions_keeps_them_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path}/log.db"
    with riverbed.connect(url) as log:
        log.create_topic("orders", partitions=4)  # a relay, say, made it first
    with riverbed.App("shop", url=url) as app, caplog.at_level(logging.WARNING):
        app.topic("orders", partitions=8, value=str)
        app.start()
        assert app.log.topic("orders").partitions == 4
    assert "topic orders exists with 4 partitions; the app declares 8" in caplog.text
