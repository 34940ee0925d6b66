"""Tasks keep their function's signature for type checkers: mypy sees ``delay``'s parameters and
the handle's result type."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

CHECKED = textwrap.dedent(
    """
    import riverbed

    app = riverbed.App("typed")

    @app.task(retries=2)
    def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def greet(name: str) -> str:
        return "hi " + name

    reveal_type(add.delay(1, 2))
    reveal_type(add.delay(1, 2).result())
    reveal_type(greet.options(countdown=1).delay("ada").result(timeout=1))
    add.delay(1, "two")
    add.delay(1)
    greet.delay(name=3)
    """
)


def test_mypy_checks_delay_against_the_task_signature(tmp_path: Path) -> None:
    module = tmp_path / "typed.py"
    module.write_text(CHECKED)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(module)],
        capture_output=True,
        text=True,
        check=False,
    )
    # mypy versions differ in spelling builtins ("builtins.int" or "int").
    output = result.stdout.replace("builtins.", "")
    lines = [line.split(": ", 1)[1] for line in output.splitlines() if ": " in line]
    assert 'note: Revealed type is "riverbed.tasks.handle.TaskHandle[int]"' in lines
    assert 'note: Revealed type is "int"' in lines
    assert 'note: Revealed type is "str"' in lines
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 3, result.stdout
    assert 'Argument 2 to "delay" of "Task" has incompatible type "str"' in errors[0]
    assert "Missing positional argument" in errors[1]
    assert 'Argument "name" to "delay" of "Task" has incompatible type "int"' in errors[2]
