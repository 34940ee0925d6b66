"""``riverbed worker module:app``: run an app's pipelines in this process, with a status line."""

from __future__ import annotations

import importlib
import os
import sys
import time
from typing import Annotated

import typer

from riverbed.cli.common import err
from riverbed.errors import RiverbedError
from riverbed.streams import App
from riverbed.streams.runner import Runner
from riverbed.urls import LOG_URL_ENV


def load_app(target: str) -> App:
    """The ``riverbed.App`` named ``module:attribute``, imported from the current directory."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise RiverbedError(f"expected module:attribute, e.g. shop.streams:app, got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RiverbedError(f"cannot import module '{module_name}': {error}") from None
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        raise RiverbedError(
            f"{target} is {type(app).__name__ if app is not None else 'missing'}, "
            "not a riverbed.App"
        )
    return app


def worker(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="The app to run, as module:attribute.")],
) -> None:
    """Run the app's pipelines until SIGTERM or Ctrl-C, printing a status line every second.

    Start the same command in several processes to share the partitions (one consumer group per
    app). An app created without a URL uses the global --url.
    """
    if ctx.obj:
        os.environ[LOG_URL_ENV] = ctx.obj
    app = load_app(target)
    started = time.monotonic()

    def report(runner: Runner) -> None:
        elapsed = max(time.monotonic() - started, 1e-9)
        err.print(
            f"riverbed worker {app.name}: {runner.processed:,} records processed "
            f"({runner.processed / elapsed:,.0f}/s), {runner.dead_lettered:,} dead-lettered",
        )

    with app:
        app.run(report=report)
