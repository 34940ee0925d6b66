"""The ``riverbed`` command's root: the global ``--url`` option and the command groups."""

from __future__ import annotations

from typing import Annotated

import typer

from riverbed.cli import demo, groups, projections, tasks, topics, worker
from riverbed.cli.common import RiverbedGroup
from riverbed.cli.consume import consume
from riverbed.cli.produce import produce
from riverbed.urls import DEFAULT_LOG_URL, LOG_URL_ENV

app = typer.Typer(
    cls=RiverbedGroup,
    help="Riverbed: a partitioned, replayable log and the platform built on it.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    # Markdown reflows docstring paragraphs to the terminal's width.
    rich_markup_mode="markdown",
)
app.add_typer(topics.app, name="topics")
app.add_typer(groups.app, name="groups")
app.add_typer(tasks.app, name="tasks")
app.add_typer(projections.app, name="projections")
app.command("produce")(produce)
app.command("consume")(consume)
app.command("demo")(demo.demo)
app.command("worker")(worker.worker)


@app.callback()
def root(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option(
            envvar=LOG_URL_ENV,
            help=f"Log URL: sqlite:///path.db or kafka://host:9092 (default: {DEFAULT_LOG_URL}).",
        ),
    ] = None,
) -> None:
    # Commands open the log themselves (riverbed.connect), so --help never touches a file.
    ctx.obj = url


def main() -> None:
    app(prog_name="riverbed")


if __name__ == "__main__":
    main()
