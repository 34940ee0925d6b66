"""The ``riverbed`` command's entry point, outside the package so that it loads before riverbed
does: importing riverbed takes about half a second, and a Ctrl-C meanwhile ends the command as
one during a command does (exit status 130), not with the interpreter's traceback."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator

INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command Ctrl-C ended


def main() -> None:
    try:
        with _ctrl_c_exits_at_once():
            from riverbed.cli.main import main as run
        run()
    except KeyboardInterrupt:  # while Typer builds the command, before the command handles it
        sys.exit(INTERRUPTED)


@contextlib.contextmanager
def _ctrl_c_exits_at_once() -> Iterator[None]:
    """A Ctrl-C ends the process on the spot, with no exception: one raised inside an
    extension's setup can crash the interpreter (msgspec 0.22 segfaulted when a
    KeyboardInterrupt landed as a module built its decoders). Nothing has started yet that
    would need ending. A SIGINT the shell left ignored (``&``) stays ignored. (Not
    ``riverbed.signals.handling``: importing it would import riverbed first.)"""
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        yield
        return
    signal.signal(signal.SIGINT, _exit_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _exit_interrupted(signum: int, frame: object) -> None:
    os._exit(INTERRUPTED)
