"""A task's arguments and result on the wire: msgpack, checked when sent, typed when received.

``delay`` binds the arguments to the function's signature and encodes them once, so a call that
could never run fails in the caller with a clear error. The worker converts each argument to its
parameter's annotation (msgspec Structs, dataclasses, datetimes, pydantic models ...), and a
handle converts the result to the return annotation.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from riverbed.tasks.errors import TaskArgumentsError


def _enc_hook(value: object) -> object:
    dump = getattr(value, "model_dump", None)  # pydantic v2 models
    if callable(dump):
        return dump(mode="json")
    raise NotImplementedError(f"objects of type {type(value).__name__} are not supported")


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_call_decoder = msgspec.msgpack.Decoder(tuple[list[msgspec.Raw], dict[str, msgspec.Raw]])
_any_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder()

NO_ARGS = _encoder.encode(((), {}))


def encode_value(what: str, value: object) -> bytes:
    try:
        return _encoder.encode(value)
    except (TypeError, NotImplementedError, OverflowError) as error:
        raise TaskArgumentsError(
            f"{what} cannot be serialized: {error}; use JSON-like values, msgspec Structs, "
            "dataclasses, datetimes, UUIDs or pydantic models"
        ) from None


class CallCodec:
    """Encodes calls to one function and decodes them for it, per its signature."""

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        self.name = name
        self.signature = inspect.signature(fn)
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # unresolvable forward references: pass values through undecoded
            hints = {}
        self._result_type: Any = hints.get("return", Any)
        self._hints = {
            parameter.name: hints.get(parameter.name, Any)
            for parameter in self.signature.parameters.values()
        }
        self._positional = [
            parameter.name
            for parameter in self.signature.parameters.values()
            if parameter.kind
            in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        ]
        self._var_positional = next(
            (
                parameter.name
                for parameter in self.signature.parameters.values()
                if parameter.kind is inspect.Parameter.VAR_POSITIONAL
            ),
            None,
        )
        self._decoders = {name: _decoder(hint) for name, hint in self._hints.items()}
        self._result_decoder = _decoder(
            Any if self._result_type in (None, type(None)) else self._result_type
        )

    def encode(
        self, args: Sequence[object], kwargs: dict[str, object], *, partial: bool = False
    ) -> bytes:
        """``partial``: leading arguments only, the rest arrive later (a chain's later step gets
        the previous result, a chord callback the header results)."""
        try:
            if partial:
                self.signature.bind_partial(*args, **kwargs)
            else:
                self.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TaskArgumentsError(f"task {self.name}: {error}") from None
        if not args and not kwargs:
            return NO_ARGS
        try:
            return _encoder.encode((args, kwargs))
        except (TypeError, NotImplementedError, OverflowError):
            pass
        # Name the argument that cannot be sent.
        for where, value in [*enumerate(args), *kwargs.items()]:
            encode_value(f"argument {where!r} of task {self.name}", value)
        raise TaskArgumentsError(f"the arguments of task {self.name} cannot be serialized")

    def decode(self, payload: bytes) -> tuple[list[Any], dict[str, Any]]:
        raw_args, raw_kwargs = _call_decoder.decode(payload)
        args = [self._decoder_at(i).decode(raw) for i, raw in enumerate(raw_args)]
        kwargs = {
            key: self._decoders.get(key, _any_decoder).decode(raw)
            for key, raw in raw_kwargs.items()
        }
        return args, kwargs

    def decode_result(self, result: bytes) -> Any:
        return self._result_decoder.decode(result) if result else None

    def _decoder_at(self, index: int) -> msgspec.msgpack.Decoder[Any]:
        if index < len(self._positional):
            return self._decoders[self._positional[index]]
        if self._var_positional is not None:
            return self._decoders[self._var_positional]
        return _any_decoder


def _decoder(hint: Any) -> msgspec.msgpack.Decoder[Any]:
    return _any_decoder if hint is Any else msgspec.msgpack.Decoder(hint, dec_hook=_dec_hook)


def _dec_hook(kind: type, value: object) -> object:
    validate = getattr(kind, "model_validate", None)
    if callable(validate):
        return validate(value)
    raise NotImplementedError(f"cannot decode a {kind.__name__}")


def prepend(payload: bytes, first: list[bytes] | bytes) -> bytes:
    """The call ``payload`` with one more first argument: a result (chain), or a list of results
    (chord callback), each msgpack bytes passed through without decoding."""
    raw_args, raw_kwargs = _call_decoder.decode(payload)
    head: object = (
        [msgspec.Raw(item) for item in first] if isinstance(first, list) else msgspec.Raw(first)
    )
    return _encoder.encode(([head, *raw_args], raw_kwargs))
