"""Helpers for users' unit tests: run a pipeline over a list of inputs, without a log."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from riverbed.streams.dsl import Stream


class StreamResult(msgspec.Struct):
    """What a pipeline wrote: per output topic, its ``(key, value)`` pairs in order."""

    outputs: dict[str, list[tuple[Any, Any]]]


def run_stream(stream: Stream[Any, Any], inputs: Iterable[tuple[Any, Any]]) -> StreamResult:
    """Run ``inputs`` (``(key, value)`` pairs) through ``stream`` as one batch.

    Keys and values go through the topics' codecs both ways, as on a real log, so a value that
    would not encode or decode fails here too. Sinks are called.
    """
    source = stream.source
    pairs = []
    for key, value in inputs:
        key_bytes, value_bytes, _ = source.encode(value, key)
        decoded_key = None if key_bytes is None else source.key_codec.decode(key_bytes)
        pairs.append((decoded_key, source.value_codec.decode(value_bytes)))
    results = stream.process(pairs)
    outputs: dict[str, list[tuple[Any, Any]]] = {}
    for output in stream.outputs:
        if output.sink is not None:
            for key, value in results:
                output.sink(key, value)
        if output.topic is not None:
            topic = output.topic
            written = outputs.setdefault(topic.name, [])
            for key, value in results:
                key_bytes, value_bytes, _ = topic.encode(value, key)
                written.append(
                    (
                        None if key_bytes is None else topic.key_codec.decode(key_bytes),
                        topic.value_codec.decode(value_bytes),
                    )
                )
    return StreamResult(outputs)
