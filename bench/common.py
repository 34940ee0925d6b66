"""What the benchmarks share: the machine and revision they ran on, Markdown tables, stopping.

Imports nothing of riverbed, so a benchmark can still run its peers while riverbed is mid-change.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / "bench" / ".venv-peers" / "bin" / "python"


class BenchError(Exception):
    """A system did not do what the benchmark asked (lost records, no progress, a crash, a
    server that did not start)."""


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "? GiB"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return f"{os.cpu_count()} CPUs (nproc), {cpu}, {memory} RAM, {platform.platform()}"


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages (other work on the machine skews the figures)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def git_revision() -> str:
    output = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return output.stdout.strip() or "unknown revision"


def markdown_table(header: list[str] | tuple[str, ...], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def stop_on_signals() -> None:
    """SIGTERM and SIGINT raise in the main thread, so servers and peers stop in ``finally``.

    (A background job of a non-interactive shell starts with SIGINT ignored; Python keeps that.)
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def peer_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """The versions of ``packages`` in the peers venv (empty when the venv is missing)."""
    if not PEER_PYTHON.exists():
        return {}
    code = (
        "import importlib.metadata as m, json\n"
        "found = {}\n"
        f"for name in {list(packages)!r}:\n"
        "    try:\n"
        "        found[name] = m.version(name)\n"
        "    except m.PackageNotFoundError:\n"
        "        pass\n"
        "print(json.dumps(found))\n"
    )
    output = subprocess.run(
        [str(PEER_PYTHON), "-c", code], capture_output=True, text=True, check=False
    )
    try:
        found: dict[str, str] = json.loads(output.stdout)
    except json.JSONDecodeError:
        return {}
    return found


def short(reason: str, limit: int = 160) -> str:
    """``reason`` on one line, without Markdown cell breaks, at most ``limit`` characters."""
    reason = " ".join(reason.split()).replace("|", "/")
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"


def write_results(results: Path, lines: list[str]) -> None:
    """Append a benchmark's section to ``bench/RESULTS.md`` (created with its title if new)."""
    if not results.exists():
        results.write_text("# Benchmark results\n\nAppended by the scripts in bench/.\n")
    with results.open("a") as out:
        out.write("\n".join(lines) + "\n")


def chosen_systems(
    parser: argparse.ArgumentParser,
    text: str,
    systems: tuple[str, ...],
    aliases: dict[str, tuple[str, ...]],
) -> list[str]:
    """The systems named in ``--systems`` (comma-separated names or aliases), in order, once."""
    chosen: list[str] = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        if name not in systems and name not in aliases:
            parser.error(
                f"unknown system {name!r}; choose from {', '.join(systems + tuple(aliases))}"
            )
        for system in aliases.get(name, (name,)):
            if system not in chosen:
                chosen.append(system)
    return chosen
