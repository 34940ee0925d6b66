"""Codecs chosen from a Python type: how a topic's keys and values become bytes and back.

msgspec Structs, dataclasses, dicts, lists and other JSON-able types are JSON through msgspec,
validated on decode (JSON has no infinity or NaN: msgspec writes them as null); pydantic models
use their own JSON methods; ``str`` is UTF-8; ``bytes`` passes through. Encoding refuses a value
of the wrong type before anything is written, and decoding raises ``DeserializationError`` with
the reason, which the stream layer routes to the topic's dead-letter topic.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Sequence
from itertools import repeat
from typing import Annotated, Any, Generic, Protocol, TypeVar, cast, get_args, get_origin

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
                f"cannot encode a {type(value).__name__} as bytes; pass bytes, or declare the "
                "topic with the type (value=..., or key=... for keys)"
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
        self.type_name = type_name(tp)
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(tp)
        self._list_decoder = msgspec.json.Decoder(list[tp])  # type: ignore[valid-type]
        # Structs and dataclasses are checked by class on encode; msgspec itself would encode
        # any object with the right attributes.
        self._instance_of = _outer_class(tp)

    def encode(self, value: T) -> bytes:
        if not isinstance(value, self._instance_of):
            raise SerializationError(
                f"cannot encode a {type(value).__name__} as {self.type_name}; "
                f"pass a {self.type_name}"
            )
        try:
            data = self._encoder.encode(value)
        except (TypeError, msgspec.EncodeError) as error:
            raise SerializationError(f"cannot encode as {self.type_name}: {error}") from None
        try:
            # Python does not check annotations, nor msgspec when it encodes: a field holding a
            # value of another type would be written, and every reader refuse the record.
            self._decoder.decode(data)
        except msgspec.ValidationError as error:
            raise _invalid(self.type_name, error) from None
        return data

    def encode_many(self, values: Sequence[T]) -> list[bytes]:
        if all(map(isinstance, values, repeat(self._instance_of))):
            try:
                datas = list(map(self._encoder.encode, values))
                self._list_decoder.decode(b"[" + b",".join(datas) + b"]")  # one check for all
                return datas
            except (TypeError, msgspec.EncodeError, msgspec.ValidationError):
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


def _invalid(name: str, error: msgspec.ValidationError) -> SerializationError:
    reason = str(error)
    if "got `null`" in reason:
        reason += " (a None, or a NaN or infinity, which JSON can only write as null)"
    return SerializationError(f"cannot encode as {name}: {reason}")


def type_name(tp: object) -> str:
    """``Payment``, ``list[int]``, ``int | None``, ``Annotated[int, Meta(ge=0)]``."""
    if isinstance(tp, type) and get_origin(tp) is None:
        return tp.__name__
    return str(tp).replace("typing.", "").replace("msgspec.", "")


def _outer_class(tp: object) -> type | tuple[type, ...]:
    """The class every value of ``tp`` is an instance of (object for a union): ``list`` for
    ``list[int]``, ``int`` for ``Annotated[int, ...]``; a float may be given as an int."""
    if get_origin(tp) is Annotated:
        return _outer_class(get_args(tp)[0])
    origin = get_origin(tp) or tp
    if origin is float:
        return (int, float)
    if isinstance(origin, type) and origin is not types.UnionType:
        return origin
    return object


class PydanticCodec(Generic[T]):
    """pydantic v2 models, through their own JSON validation."""

    def __init__(self, model: type[T]) -> None:
        self._model: Any = model
        self.type_name = model.__name__
        # Written as read: fields by their aliases, computed fields left out (a model that
        # forbids extra fields would refuse them back).
        computed = set(getattr(model, "model_computed_fields", ()))
        self._dump: dict[str, Any] = {"by_alias": True, "exclude": computed or None}

    def encode(self, value: T) -> bytes:
        if not isinstance(value, self._model):
            raise SerializationError(
                f"cannot encode a {type(value).__name__} as {self.type_name}; "
                f"pass a {self.type_name}"
            )
        return cast(bytes, self._model.model_dump_json(value, **self._dump).encode())

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
