"""The schema registry stored in the log, on every backend."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import pytest

import riverbed
from riverbed.serde.compat import Compatibility, schema_of
from riverbed.serde.registry import IncompatibleSchemaError, SchemaRegistry


class V1(msgspec.Struct):
    card: str
    amount: int


class V2(msgspec.Struct):
    card: str
    amount: int
    currency: str = "EUR"


class V3Bad(msgspec.Struct):
    card: str
    amount: int
    currency: str
    country: str


def test_versions_compatibility_and_persistence(
    log: riverbed.Log, log_url: str, topic_name: Callable[[str], str]
) -> None:
    topic = topic_name("schemas")
    registry = SchemaRegistry(log, topic=topic)
    assert registry.register("payments", schema_of(V1)).version == 1
    assert registry.register("payments", schema_of(V1)).version == 1  # idempotent
    assert registry.register("payments", schema_of(V2)).version == 2
    with pytest.raises(IncompatibleSchemaError, match="field 'country' is required") as caught:
        registry.register("payments", schema_of(V3Bad))
    assert "BACKWARD-compatible with version 2" in str(caught.value)
    assert registry.register("clicks", schema_of(V2), Compatibility.NONE).version == 1
    with riverbed.connect(log_url) as other:  # another process sees the same versions
        again = SchemaRegistry(other, topic=topic)
        assert [v.version for v in again.versions("payments")] == [1, 2]
        assert again.get("payments", 2).schema == schema_of(V2)
        assert again.versions("clicks")[0].compatibility is Compatibility.NONE
        with pytest.raises(riverbed.RiverbedError, match="has no schema version 3"):
            again.get("payments", 3)


def test_the_first_registration_sets_the_mode(
    log: riverbed.Log, topic_name: Callable[[str], str]
) -> None:
    registry = SchemaRegistry(log, topic=topic_name("schemas"))
    registry.register("orders", schema_of(V1), Compatibility.FORWARD)
    # Adding required fields is FORWARD-compatible (old readers ignore them), though a later call
    # asks for BACKWARD, under which it is not.
    assert registry.register("orders", schema_of(V3Bad), Compatibility.BACKWARD).version == 2
    # Dropping a field that readers of version 2 require breaks FORWARD.
    with pytest.raises(IncompatibleSchemaError, match=r"FORWARD.*field 'country'") as caught:
        registry.register("orders", schema_of(V2), Compatibility.NONE)
    assert "the NONE declared now applies to new subjects only" in str(caught.value)
