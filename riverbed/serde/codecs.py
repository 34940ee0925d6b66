"""Codecs chosen from a Python type: how a topic's keys and values become bytes and back.

msgspec Structs, dataclasses, dicts, lists and other JSON-able types are JSON through msgspec,
validated on decode (JSON has no infinity or NaN: msgspec writes them as null); pydantic models
use their own JSON methods; ``str`` is UTF-8; ``bytes`` passes through. Encoding refuses a value
of the wrong type before anything is written, and decoding raises ``DeserializationError`` with
the reason, which the stream layer routes to the topic's dead-letter topic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from itertools import repeat
from typing import Any, Generic, Protocol, TypeVar, cast, get_origin

import msgspec

from riverbed.errors import RiverbedError

T = TypeVar("T")


class SerializationError(RiverbedError, TypeError):
    """A value that cannot be encoded with its topic's codec."""


class DeserializationError(RiverbedError, ValueError):
    """Bytes that do not decode to the topic's type; the message says why."""


class Codec(Protocol[T]):
    """Turns values of one type into bytes and back."""

    @property
    def type_name(self) -> str: ...

    def encode(self, value: T) -> bytes: ...

    def encode_many(self, values: Sequence[T]) -> list[bytes]: ...

    def decode(self, data: bytes) -> T: ...

    def decode_many(self, datas: Sequence[bytes]) -> list[T]: ...


class BytesCodec:
    type_name = "bytes"

    def encode(self, value: bytes) -> bytes:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise SerializationError(
                f"cannot encode a {type(value).__name__} as bytes; pass bytes, "
                "or declare the topic with value=<its type>"
            )
        return bytes(value)

    def encode_many(self, values: Sequence[bytes]) -> list[bytes]:
        return list(map(self.encode, values))

    def decode(self, data: bytes) -> bytes:
        return data

    def decode_many(self, datas: Sequence[bytes]) -> list[bytes]:
        return list(datas)


class StrCodec:
    type_name = "str"

    def encode(self, value: str) -> bytes:
        if not isinstance(value, str):
            raise SerializationError(f"cannot encode a {type(value).__name__} as str")
        return value.encode()

    def encode_many(self, values: Sequence[str]) -> list[bytes]:
        try:
            return list(map(str.encode, values))
        except TypeError:
            return list(map(self.encode, values))  # names the value that is not a str

    def decode(self, data: bytes) -> str:
        try:
            return data.decode()
        except UnicodeDecodeError as error:
            raise DeserializationError(f"not UTF-8 text: {error}") from None

    def decode_many(self, datas: Sequence[bytes]) -> list[str]:
        return [self.decode(data) for data in datas]


class JsonCodec(Generic[T]):
    """msgspec JSON for Structs, dataclasses, dicts, lists and other JSON-able types."""

    def __init__(self, tp: type[T]) -> None:
        self._type = tp
        self.type_name = getattr(tp, "__name__", str(tp))
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(tp)
        # Structs and dataclasses are checked by class on encode; msgspec itself would encode
        # any object with the right attributes.
        origin = get_origin(tp) or tp
        self._instance_of = origin if isinstance(origin, type) else object

    def encode(self, value: T) -> bytes:
        if not isinstance(value, self._instance_of):
            raise SerializationError(
                f"cannot encode a {type(value).__name__} as {self.type_name}; "
                f"pass a {self.type_name}"
            )
        try:
            return self._encoder.encode(value)
        except (TypeError, msgspec.EncodeError) as error:
            raise SerializationError(f"cannot encode as {self.type_name}: {error}") from None

    def encode_many(self, values: Sequence[T]) -> list[bytes]:
        if all(map(isinstance, values, repeat(self._instance_of))):
            try:
                return list(map(self._encoder.encode, values))
            except (TypeError, msgspec.EncodeError):
                pass
        return list(map(self.encode, values))  # names the value that does not encode

    def decode(self, data: bytes) -> T:
        try:
            return self._decoder.decode(data)
        except msgspec.DecodeError as error:
            raise DeserializationError(f"not a valid {self.type_name}: {error}") from None

    def decode_many(self, datas: Sequence[bytes]) -> list[T]:
        decode = self._decoder.decode
        try:
            return [decode(data) for data in datas]
        except msgspec.DecodeError:
            return [self.decode(data) for data in datas]  # names the record that failed


class PydanticCodec(Generic[T]):
    """pydantic v2 models, through their own JSON validation."""

    def __init__(self, model: type[T]) -> None:
        self._model: Any = model
        self.type_name = model.__name__

    def encode(self, value: T) -> bytes:
        if not isinstance(value, self._model):
            raise SerializationError(
                f"cannot encode a {type(value).__name__} as {self.type_name}; "
                f"pass a {self.type_name}"
            )
        return cast(bytes, self._model.model_dump_json(value).encode())

    def encode_many(self, values: Sequence[T]) -> list[bytes]:
        return list(map(self.encode, values))

    def decode(self, data: bytes) -> T:
        try:
            return cast(T, self._model.model_validate_json(data))
        except ValueError as error:  # pydantic's ValidationError is a ValueError
            raise DeserializationError(f"not a valid {self.type_name}: {error}") from None

    def decode_many(self, datas: Sequence[bytes]) -> list[T]:
        return [self.decode(data) for data in datas]


def _is_pydantic_model(tp: object) -> bool:
    return isinstance(tp, type) and hasattr(tp, "model_validate_json")


def codec_for(tp: object) -> Codec[Any]:
    """The codec for values of type ``tp`` (None means raw bytes)."""
    if tp is None or tp is bytes:
        return BytesCodec()
    if tp is str:
        return StrCodec()
    if _is_pydantic_model(tp):
        return PydanticCodec(cast(type[Any], tp))
    is_model = isinstance(tp, type) and (
        issubclass(tp, msgspec.Struct) or dataclasses.is_dataclass(tp)
    )
    if is_model or get_origin(tp) is not None or tp in (dict, list, int, float, bool):
        try:
            return JsonCodec(cast(type[Any], tp))
        except TypeError as error:
            raise SerializationError(f"no codec for {tp!r}: {error}") from None
    raise SerializationError(
        f"no codec for {tp!r}: use a msgspec Struct, a dataclass, a pydantic model, "
        "dict, list, str or bytes"
    )
