"""``riverbed demo``: the log demo (``riverbed.demo.run_log_demo``)."""

from __future__ import annotations

from typing import Annotated

import typer

from riverbed.cli.common import out
from riverbed.demo import run_log_demo


def demo(
    ctx: typer.Context,
    records: Annotated[int, typer.Option(min=1, help="How many records to produce.")] = 1_000_000,
) -> None:
    """Produce records to a fresh 4-partition topic, consume them with a two-member group."""
    run_log_demo(ctx.obj, records, out)
