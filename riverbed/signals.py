"""Signal handlers for the length of a block."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import FrameType

Handler = Callable[[int, FrameType | None], object]


@contextmanager
def handling(signums: Iterable[signal.Signals], handler: Handler) -> Iterator[None]:
    """Run the block with ``handler`` for ``signums`` (from the main thread only), then the
    handlers they had before."""
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, handled_before in previous.items():
            signal.signal(signum, handled_before)
