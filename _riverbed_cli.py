"""The ``riverbed`` command's entry point, outside the package so that it loads before riverbed
does: importing riverbed takes about half a second, and a Ctrl-C meanwhile ends the command as
one during a command does (exit status 130), not with the interpreter's traceback."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from riverbed.cli.main import main as run
    except KeyboardInterrupt:
        sys.exit(130)  # 128 + SIGINT, as a shell reports a command Ctrl-C ended
    run()
