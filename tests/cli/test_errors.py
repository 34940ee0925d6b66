"""Every riverbed error is one ``error:`` line on stderr with exit code 1, never a traceback."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest
from typer.testing import CliRunner, Result

import _riverbed_cli
import riverbed
from riverbed.cli.main import app
from tests.cli.conftest import Run


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_a_log_file_that_does_not_exist_is_refused_not_made(run: Run, tmp_path: Path) -> None:
    for args in (
        ("topics", "list"),
        ("topics", "describe", "orders"),
        ("groups", "list"),
        ("consume", "orders", "--timeout", "0"),
    ):
        assert_one_line_error(run(*args), "no log at", "log.db': the file does not exist")
    assert_one_line_error(run("produce", "orders", input="a\n"), "no log at")
    assert not (tmp_path / "log.db").exists()
    assert run("topics", "create", "orders").exit_code == 0  # makes the log
    assert "orders" in run("topics", "list").stdout


def test_unknown_topic(run: Run) -> None:
    run("topics", "create", "other")  # the log exists; the topic does not
    for args in (
        ("topics", "describe", "nope"),
        ("topics", "delete", "nope"),
        ("consume", "nope", "--timeout", "0"),
    ):
        assert_one_line_error(run(*args), "topic 'nope' does not exist", "riverbed topics create")
    assert_one_line_error(run("produce", "nope", input="a\n"), "topic 'nope' does not exist")


def test_duplicate_topic(run: Run) -> None:
    assert run("topics", "create", "orders").exit_code == 0
    assert_one_line_error(run("topics", "create", "orders"), "topic 'orders' already exists")


def test_invalid_topic_name(run: Run) -> None:
    assert_one_line_error(run("topics", "create", "bad name"), "invalid topic name 'bad name'")


def test_unknown_group(run: Run) -> None:
    run("topics", "create", "other")
    assert_one_line_error(run("groups", "describe", "nobody"), "group 'nobody' does not exist")


def test_unknown_partition(run: Run) -> None:
    run("topics", "create", "orders", "--partitions", "2")
    result = run("produce", "orders", "--partition", "5", input="a\n")
    assert_one_line_error(result, "has no partition 5")


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("foo://x", "unsupported URL scheme 'foo'"),
        ("nonsense", "invalid URL 'nonsense'"),
        ("sqlite:///x.db?fsync=sometimes", "invalid fsync='sometimes'"),
    ],
)
def test_bad_url(url: str, fragment: str) -> None:
    result = CliRunner().invoke(app, ["--url", url, "topics", "list"])
    assert_one_line_error(result, fragment)


def test_url_from_environment(tmp_path: Path) -> None:
    env = {"RIVERBED_URL": f"sqlite:///{tmp_path}/env.db"}
    result = CliRunner().invoke(app, ["topics", "create", "t"], env=env)
    assert result.exit_code == 0
    assert (tmp_path / "env.db").exists()


def test_missing_file(run: Run, tmp_path: Path) -> None:
    run("topics", "create", "orders")
    result = run("produce", "orders", "--file", str(tmp_path / "missing.txt"))
    assert_one_line_error(result, "No such file or directory", "missing.txt")


def test_usage_errors_exit_2(run: Run) -> None:
    run("topics", "create", "orders")
    for args in (
        ("consume", "orders", "--format", "xml"),
        ("consume", "orders", "--max", "0"),
        ("consume", "orders", "--timeout", "-1"),
        ("produce", "orders", "--key", "k", "--key-field", "id"),
        ("produce", "orders", "--header", "no-equals-sign"),
        ("produce", "orders", "--partition", "-1"),
        ("topics", "create"),
        ("nonexistent-command",),
    ):
        result = run(*args, input="")
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output


def test_installed_command_prints_no_traceback(tmp_path: Path) -> None:
    """The real entry point, in a subprocess: what a user's shell sees."""
    script = Path(sys.executable).parent / "riverbed"
    with riverbed.connect(f"sqlite:///{tmp_path}/log.db") as log:
        log.create_topic("other")
    result = subprocess.run(
        [str(script), "--url", f"sqlite:///{tmp_path}/log.db", "topics", "describe", "nope"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "error: topic 'nope' does not exist; create it with: riverbed topics create nope\n"
    )


def test_ctrl_c_as_the_command_starts_ends_it_without_a_traceback(tmp_path: Path) -> None:
    """Importing riverbed takes a good part of a second: a Ctrl-C then (here 0.1 s in) ended
    the command with the interpreter's traceback. Later, the command's own handling ends it."""
    url = f"sqlite:///{tmp_path}/log.db"
    with riverbed.connect(url) as log:
        log.create_topic("orders")
    script = Path(sys.executable).parent / "riverbed"
    command = [str(script), "--url", url, "consume", "orders", "--timeout", "30"]
    started = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    time.sleep(0.1)
    started.send_signal(signal.SIGINT)
    _, stderr = started.communicate(timeout=30)
    assert "Traceback" not in stderr
    assert started.returncode == 130


class _Interrupting(importlib.abc.MetaPathFinder):
    """Ctrl-C (a real SIGINT) while ``riverbed.cli.main`` is imported."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name == "riverbed.cli.main":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the signal's handler runs meanwhile
        return None


class _ExitCalledError(Exception):
    """What ``os._exit`` raises here, where it must not end pytest."""


def test_ctrl_c_while_riverbed_imports_ends_the_process_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No KeyboardInterrupt: raised inside an extension's setup, one crashed the interpreter
    (msgspec, as a module built its decoders: the installed command died of SIGSEGV)."""

    def exit_now(status: int) -> None:
        raise _ExitCalledError(status)

    monkeypatch.setattr(os, "_exit", exit_now)
    monkeypatch.delitem(sys.modules, "riverbed.cli.main")
    monkeypatch.setattr(sys, "meta_path", [_Interrupting(), *sys.meta_path])
    started = time.monotonic()
    with pytest.raises(_ExitCalledError) as exited:
        _riverbed_cli.main()
    assert exited.value.args == (130,)
    assert time.monotonic() - started < 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_while_typer_builds_the_command_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the import, before the command's own handling: Typer reads the commands'
    signatures, a good part of a second."""

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("riverbed.cli.main.main", interrupted)
    with pytest.raises(SystemExit) as exited:
        _riverbed_cli.main()
    assert exited.value.code == 130
