"""Layer 1: stream processing on the log (typed topics so far)."""

from riverbed.streams.app import App
from riverbed.streams.topics import Topic, TypedRecord

__all__ = ["App", "Topic", "TypedRecord"]
