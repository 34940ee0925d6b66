"""Layer 0: codecs from Python types, and schema compatibility."""

from riverbed.serde.codecs import (
    Codec,
    DeserializationError,
    SerializationError,
    codec_for,
)

__all__ = ["Codec", "DeserializationError", "SerializationError", "codec_for"]
