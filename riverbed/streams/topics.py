"""Typed topics: a topic's name and settings, with codecs for its keys and values.

A topic knows how to turn ``(key, value)`` into bytes and back. Records carry the version of the
value schema they were written with in the ``riverbed-schema-version`` header, and a record that
does not decode goes to the topic's dead-letter topic with the error and where it came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Generic, TypeVar

import msgspec

from riverbed.log.api import Producer, Record, SendFuture
from riverbed.serde.codecs import (
    Codec,
    DeserializationError,
    JsonCodec,
    SerializationError,
    codec_for,
)
from riverbed.serde.compat import Compatibility, Schema, schema_of
from riverbed.streams.handlers import ATTEMPTS_HEADER, causal_headers

K = TypeVar("K")
V = TypeVar("V")

SCHEMA_VERSION_HEADER = "riverbed-schema-version"
DEAD_LETTER_SUFFIX = ".dlq"
# Headers of a dead-lettered record: why, and where it was.
ERROR_HEADER = "riverbed-error"
SOURCE_TOPIC_HEADER = "riverbed-source-topic"
SOURCE_PARTITION_HEADER = "riverbed-source-partition"
SOURCE_OFFSET_HEADER = "riverbed-source-offset"


class TypedRecord(msgspec.Struct, Generic[K, V], frozen=True):
    """A record with its key and value decoded, and the raw record it came from."""

    key: K
    value: V
    record: Record


class Topic(Generic[K, V]):
    """A topic of the app, declared with ``app.topic(name, value=Type, key=Type)``."""

    def __init__(
        self,
        name: str,
        partitions: int,
        key_type: Any,
        value_type: Any,
        compact: bool,
        retention_ms: int | None,
        compatibility: Compatibility,
    ) -> None:
        self.name = name
        self.partitions = partitions
        self.compact = compact
        self.retention_ms = retention_ms
        self.compatibility = compatibility
        self.key_type = key_type
        self.value_type = value_type
        self.key_codec: Codec[K] = codec_for(key_type)
        self.value_codec: Codec[V] = codec_for(value_type)
        self.value_schema: Schema = schema_of(value_type)
        # A tombstone (value None) decodes to None where the type holds None (V | None): on a
        # compacted topic it deletes the key, and a handler of such a topic sees it.
        self.tombstone_bytes = _null_if_accepted(self.value_codec)
        self.schema_version: int | None = None  # set when the app registers the schema

    @property
    def dead_letter_topic(self) -> str:
        return self.name + DEAD_LETTER_SUFFIX

    def encode(
        self, value: V, key: K | None = None
    ) -> tuple[bytes | None, bytes, dict[str, bytes]]:
        """Key bytes, value bytes and the headers to send them with."""
        try:
            key_bytes = None if key is None else self.key_codec.encode(key)
        except SerializationError as error:
            raise SerializationError(f"the key for topic {self.name!r}: {error}") from None
        headers = {}
        if self.schema_version is not None:
            headers[SCHEMA_VERSION_HEADER] = str(self.schema_version).encode()
        return key_bytes, self.value_codec.encode(value), headers

    def send(
        self,
        producer: Producer,
        value: V,
        key: K | None = None,
        headers: Mapping[str, bytes] | None = None,
    ) -> SendFuture:
        key_bytes, value_bytes, own_headers = self.encode(value, key)
        return producer.send(
            self.name,
            value_bytes,
            key=key_bytes,
            headers={**own_headers, **causal_headers(), **(headers or {})},
        )

    def value_bytes(self, record: Record) -> bytes | None:
        """What the record's value decodes from: a tombstone's is ``b"null"`` where the type
        holds None, else None (it has no value)."""
        return record.value if record.value is not None else self.tombstone_bytes

    def decode(self, record: Record) -> TypedRecord[K, V]:
        """The typed record; ``DeserializationError`` naming the record and whether its key or
        its value does not decode, and why."""
        where = f"{record.topic}[{record.partition}]@{record.offset}"
        try:
            key: Any = None if record.key is None else self.key_codec.decode(record.key)
        except DeserializationError as error:
            raise DeserializationError(f"the key of record {where}: {error}") from None
        raw = self.value_bytes(record)
        if raw is None:
            raise DeserializationError(
                f"record {where} is a tombstone (value None): it has no value to decode; "
                "declare the value as V | None to receive it as None"
            )
        try:
            value = self.value_codec.decode(raw)
        except DeserializationError as error:
            raise DeserializationError(f"the value of record {where}: {error}") from None
        return TypedRecord(key, value, record)

    def dead_letter(
        self, producer: Producer, record: Record, error: BaseException, attempts: int = 0
    ) -> SendFuture:
        """Send ``record`` as it was to the dead-letter topic, with the error, its origin and how
        many times a handler tried it."""
        headers = {
            **record.headers,
            ERROR_HEADER: f"{type(error).__name__}: {error}".encode(),
            SOURCE_TOPIC_HEADER: record.topic.encode(),
            SOURCE_PARTITION_HEADER: str(record.partition).encode(),
            SOURCE_OFFSET_HEADER: str(record.offset).encode(),
        }
        if attempts:
            headers[ATTEMPTS_HEADER] = str(attempts).encode()
        return producer.send(self.dead_letter_topic, record.value, key=record.key, headers=headers)


def _null_if_accepted(codec: Codec[Any]) -> bytes | None:
    """``b"null"`` if the codec is JSON's and its type holds None, else None."""
    if not isinstance(codec, JsonCodec):
        return None
    try:
        codec.decode(b"null")
    except DeserializationError:
        return None
    return b"null"
