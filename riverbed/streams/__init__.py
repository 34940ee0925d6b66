"""Layer 1: stream processing on the log: the App, typed topics, pipelines, handlers, the runner."""

from riverbed.streams.app import App
from riverbed.streams.topics import Topic, TypedRecord

__all__ = ["App", "Topic", "TypedRecord"]
