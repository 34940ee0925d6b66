"""The Stream DSL: ``app.stream(topic).filter(...).map(...).to(other)``.

A stream is a chain of steps over batches of ``(key, value)`` pairs: each step turns a whole
batch into the next one with one comprehension, so a pipeline costs a few Python calls per batch
per step, not per record per layer. The runner feeds it decoded batches; ``riverbed.testing``
feeds it plain lists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from riverbed.errors import RiverbedError
from riverbed.streams.topics import Topic

K = TypeVar("K")
V = TypeVar("V")
V2 = TypeVar("V2")

Pair = tuple[Any, Any]
Step = Callable[[list[Pair]], list[Pair]]


class Output:
    """Where a pipeline's pairs end: a topic, or a user function called with each batch."""

    def __init__(
        self, topic: Topic[Any, Any] | None, sink: Callable[[Any, Any], None] | None
    ) -> None:
        self.topic = topic
        self.sink = sink

    @property
    def name(self) -> str:
        return self.topic.name if self.topic is not None else "sink"


class Stream(Generic[K, V]):
    """A pipeline from ``source``: each operator returns a longer stream; ``to()`` and ``sink()``
    end it, and the first of them hands it to ``on_end`` (the app, which runs it)."""

    def __init__(
        self,
        source: Topic[Any, Any],
        on_end: Callable[[Stream[Any, Any]], None],
        steps: tuple[Step, ...] = (),
    ) -> None:
        self.source = source
        self.steps = steps
        self.outputs: list[Output] = []
        self._on_end = on_end

    def _then(self, step: Step) -> Stream[Any, Any]:
        if self.outputs:
            raise RiverbedError(
                f"the stream from '{self.source.name}' already ends in "
                f"{', '.join(o.name for o in self.outputs)}; add steps before .to()/.sink(), "
                "or start another app.stream()"
            )
        return Stream(self.source, self._on_end, (*self.steps, step))

    def map(self, fn: Callable[[V], V2]) -> Stream[K, V2]:
        """Replace each value with ``fn(value)``."""
        return self._then(lambda pairs: [(k, fn(v)) for k, v in pairs])

    def filter(self, fn: Callable[[V], bool]) -> Stream[K, V]:
        """Keep the records whose value passes ``fn``."""
        return self._then(lambda pairs: [(k, v) for k, v in pairs if fn(v)])

    def flat_map(self, fn: Callable[[V], Iterable[V2]]) -> Stream[K, V2]:
        """Replace each value with the values ``fn(value)`` yields (none, one or many)."""
        return self._then(lambda pairs: [(k, out) for k, v in pairs for out in fn(v)])

    def peek(self, fn: Callable[[K, V], None]) -> Stream[K, V]:
        """Call ``fn(key, value)`` for each record and pass it on unchanged."""

        def step(pairs: list[Pair]) -> list[Pair]:
            for k, v in pairs:
                fn(k, v)
            return pairs

        return self._then(step)

    def to(self, topic: Topic[K, V]) -> Stream[K, V]:
        """Write the records to ``topic`` (encoded with its codecs)."""
        return self._end(Output(topic, None))

    def sink(self, fn: Callable[[K, V], None]) -> Stream[K, V]:
        """Call ``fn(key, value)`` for each record that reaches the end of the pipeline."""
        return self._end(Output(None, fn))

    def _end(self, output: Output) -> Stream[K, V]:
        if not self.outputs:
            self._on_end(self)
        self.outputs.append(output)
        return self

    def process(self, pairs: list[Pair]) -> list[Pair]:
        """Run one batch through every step."""
        for step in self.steps:
            if not pairs:
                break
            pairs = step(pairs)
        return pairs
