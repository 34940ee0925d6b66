"""Event-time windows: one module per kind, sharing ``base``."""

from riverbed.streams.windows.base import Windowed
from riverbed.streams.windows.session import SessionWindows, session
from riverbed.streams.windows.sliding import SlidingWindows, sliding
from riverbed.streams.windows.time_based import Hopping, Tumbling, hopping, tumbling

WindowSpec = Tumbling | Hopping | SlidingWindows | SessionWindows

__all__ = [
    "Hopping",
    "SessionWindows",
    "SlidingWindows",
    "Tumbling",
    "WindowSpec",
    "Windowed",
    "hopping",
    "session",
    "sliding",
    "tumbling",
]
