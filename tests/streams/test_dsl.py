"""The stateless Stream DSL, run through riverbed.testing on a throwaway log."""

from __future__ import annotations

import msgspec
import pytest

import riverbed
from riverbed.serde import SerializationError
from riverbed.testing import run_app


class Payment(msgspec.Struct):
    card: str
    amount: int


class Alert(msgspec.Struct):
    card: str
    reason: str


@pytest.fixture
def app() -> riverbed.App:
    return riverbed.App("test")


def test_filter_map_to(app: riverbed.App) -> None:
    payments = app.topic("payments", value=Payment, key=str)
    alerts = app.topic("alerts", value=Alert, key=str)
    app.stream(payments).filter(lambda p: p.amount > 1000).map(
        lambda p: Alert(p.card, f"large payment of {p.amount}")
    ).to(alerts)
    inputs = [("c1", Payment("c1", 5)), ("c2", Payment("c2", 5000)), ("c3", Payment("c3", 1001))]
    result = run_app(app, {payments: inputs})
    assert result.outputs == {
        "alerts": [
            ("c2", Alert("c2", "large payment of 5000")),
            ("c3", Alert("c3", "large payment of 1001")),
        ]
    }


def test_flat_map_peek_and_sink(app: riverbed.App) -> None:
    lines = app.topic("lines", value=str)
    words = app.topic("words", value=str)
    seen: list[str] = []
    sunk: list[tuple[object, str]] = []
    (
        app.stream(lines)
        .flat_map(str.split)
        .peek(lambda _key, word: seen.append(word))
        .filter(lambda word: word != "the")
        .to(words)
        .sink(lambda key, word: sunk.append((key, word)))
    )
    result = run_app(app, {lines: [(None, "the quick fox"), (None, ""), (None, "jumps")]})
    assert result.outputs == {"words": [(None, "quick"), (None, "fox"), (None, "jumps")]}
    assert seen == ["the", "quick", "fox", "jumps"]
    assert sunk == [(None, "quick"), (None, "fox"), (None, "jumps")]


def test_output_type_is_checked(app: riverbed.App) -> None:
    payments = app.topic("payments", value=Payment)
    alerts = app.topic("alerts", value=Alert)
    app.stream(payments).to(alerts)  # forgot the map: Payments are not Alerts
    with pytest.raises(SerializationError, match="cannot encode a Payment as Alert"):
        run_app(app, {payments: [(None, Payment("c1", 1))]})


def test_output_keys_are_encoded_a_batch_at_a_time(app: riverbed.App) -> None:
    """Keys of a batch are encoded together; a record without a key keeps none, and a key of
    the wrong type is named."""
    words = app.topic("words", value=str, key=str)
    lengths = app.topic("lengths", value=str, key=str)
    app.stream(words).to(lengths)
    result = run_app(app, {words: [("a", "one"), (None, "two"), ("c", "three")]})
    assert result.outputs["lengths"] == [("a", "one"), (None, "two"), ("c", "three")]


def test_output_key_type_is_checked(app: riverbed.App) -> None:
    words = app.topic("words", value=str)
    keyed = app.topic("keyed", value=str, key=str)
    app.stream(words).key_by(len).to(keyed)  # int keys for a topic of str keys
    with pytest.raises(SerializationError, match="cannot encode a int as str"):
        run_app(app, {words: [(None, "one"), (None, "three")]})


def test_misuse_is_refused(app: riverbed.App) -> None:
    payments = app.topic("payments", value=Payment)
    other = riverbed.App("other", url="sqlite:///never-opened.db")
    with pytest.raises(riverbed.RiverbedError, match="not declared on app 'other'"):
        other.stream(payments)
