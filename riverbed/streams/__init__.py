"""Stream processing on the log: typed topics, the Stream DSL, windows, state, runner, handlers."""

from riverbed.streams.app import App
from riverbed.streams.topics import Topic, TypedRecord

__all__ = ["App", "Topic", "TypedRecord"]
