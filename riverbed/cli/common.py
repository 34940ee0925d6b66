"""What every command shares: the log from the global ``--url``, consoles, error reporting."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from typer._click import Context as ClickContext
from typer.core import TyperGroup

from riverbed.errors import RiverbedError
from riverbed.log import Log, connect

# Rich output for people (tables, summaries) goes to stdout; progress bars and errors to stderr, so
# that piping records or summaries never mixes in either. No markup: topic, group and member names
# are printed as they are, even when they contain brackets.
out = Console(highlight=False, markup=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)


@contextmanager
def open_log(ctx: typer.Context, create: bool = False) -> Iterator[Log]:
    """The log named by the global ``--url`` (or ``$RIVERBED_URL``, or the embedded default).
    An embedded log's file must exist unless ``create``: opening one makes it, so a mistyped
    path would answer with an empty new log, and leave its file behind."""
    url: str | None = ctx.obj
    with connect(url, create=create) as log:
        yield log


def report_error(message: str) -> None:
    # One line, whatever the message holds, so scripts can grep it and people read it at a glance.
    typer.echo(f"error: {' '.join(message.split())}", err=True)


class RiverbedGroup(TyperGroup):
    """The root command: turns riverbed's errors into one ``error:`` line and exit code 1.

    Sub-groups run inside the root's ``invoke``, so this one place covers every command. Typer's
    usage errors (exit code 2) are raised while parsing and never reach here as these types.
    """

    def invoke(self, ctx: ClickContext) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # The reader of stdout went away (``riverbed consume t | head``): stop quietly, as
            # ``cat`` does, and keep Python from complaining when it flushes stdout at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(1) from None
        except (RiverbedError, OSError) as error:
            report_error(str(error))
            raise typer.Exit(1) from None
