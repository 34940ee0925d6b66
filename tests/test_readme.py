"""The README's examples are run as written: every Python block, and the CLI session."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README.read_text(), flags=re.DOTALL)
PYTHON_BLOCKS = [code for lang, code in BLOCKS if lang == "python"]
CLI_BLOCK = next(code for lang, code in BLOCKS if lang == "bash" and "riverbed topics" in code)


@pytest.fixture
def fresh_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RIVERBED_URL", raising=False)
    return tmp_path


@pytest.mark.parametrize(
    "code", PYTHON_BLOCKS, ids=[f"python-{i}" for i in range(len(PYTHON_BLOCKS))]
)
def test_python_example(code: str, fresh_dir: Path) -> None:
    # In a process of its own, as a user runs it: its classes (an `Order` aggregate, say) must
    # not meet the test suite's, whose event types have the same names.
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    # Where the example shows what it prints (`print(x)  # -> value`), it must print that.
    expected = re.findall(r"print\(.*\)\s+# -> (.*)$", code, flags=re.MULTILINE)
    printed = result.stdout.splitlines()
    for line in expected:
        assert line in printed, (line, printed)


def test_cli_session(fresh_dir: Path) -> None:
    riverbed = Path(sys.executable).with_name("riverbed")
    for line in CLI_BLOCK.strip().splitlines():
        command = line.replace("riverbed ", f"{shlex.quote(str(riverbed))} ")
        result = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, (line, result.stderr)
        if "--format json" in line:
            printed = [json.loads(record) for record in result.stdout.splitlines()]
            assert sorted(r["key"] for r in printed) == ["ada", "bob"]
            assert all(r["topic"] == "orders" for r in printed)
    assert (fresh_dir / ".riverbed" / "log.db").exists()


WORKER_BLOCK = next(code for lang, code in BLOCKS if lang == "bash" and "riverbed worker" in code)
WORKER_MODULE = next(code for code in PYTHON_BLOCKS if code.startswith("# card_totals.py"))


def test_worker_session(fresh_dir: Path) -> None:
    (fresh_dir / "card_totals.py").write_text(WORKER_MODULE)
    riverbed = shlex.quote(str(Path(sys.executable).with_name("riverbed")))
    script = WORKER_BLOCK.replace("riverbed ", f"{riverbed} ")
    result = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("{")]
    window = json.loads(json.loads(line)["value"])
    assert window == {"start_ms": 0, "end_ms": 10000, "value": {"count": 2, "total": 12.0}}


TASKS_BLOCK = next(
    code for lang, code in BLOCKS if lang == "bash" and "riverbed tasks worker" in code
)
TASKS_MODULE = next(code for code in PYTHON_BLOCKS if code.startswith("# emails.py"))


def run_session(directory: Path, module: str, code: str, session: str) -> str:
    """Write the README's ``module`` into ``directory``, run its shell ``session`` there (this
    venv's commands first on PATH, stopping at the first failing command); its output."""
    (directory / module).write_text(code)
    bin_dir = shlex.quote(str(Path(sys.executable).parent))
    result = subprocess.run(
        ["bash", "-c", f"set -e\nPATH={bin_dir}:$PATH\n{session}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_tasks_worker_session(fresh_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RIVERBED_TASKS_URL", raising=False)
    output = run_session(fresh_dir, "emails.py", TASKS_MODULE, TASKS_BLOCK)
    assert "receipt for order 42 sent to ada@example.com" in output
    assert "dead letters: 0" in output
    assert (fresh_dir / ".riverbed" / "tasks.db").exists()


PROJECTIONS_BLOCK = next(
    code for lang, code in BLOCKS if lang == "bash" and "riverbed projections" in code
)
PROJECTIONS_MODULE = next(code for code in PYTHON_BLOCKS if code.startswith("# stock.py"))


def test_projections_session(fresh_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RIVERBED_EVENTS_URL", raising=False)
    output = run_session(fresh_dir, "stock.py", PROJECTIONS_MODULE, PROJECTIONS_BLOCK)
    assert "rebuilt stock-levels: version 2 is active (was 1), at position 2" in output
    assert "Item.Received  parked=" in output
    assert "ValueError: cannot receive -1 of sku-2" in output
    assert "unparked 1 events of stock-levels" in output
    assert (fresh_dir / ".riverbed" / "events.db").exists()
