"""Run the ``riverbed`` command in-process against a log file in a temp dir."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from riverbed.cli.main import app

Run = Callable[..., Result]


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/log.db"


@pytest.fixture
def run(url: str) -> Run:
    """``run("topics", "list", input=...)``: the command with ``--url`` set to the temp log."""
    runner = CliRunner()

    def invoke(*args: str, input: str | bytes | None = None) -> Result:
        return runner.invoke(app, ["--url", url, *args], input=input, catch_exceptions=False)

    return invoke
