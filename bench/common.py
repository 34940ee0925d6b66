"""What the benchmarks share: the machine and revision they ran on, the servers they start, their
common options, running systems, targets, tables and their sections of RESULTS.md, stopping.

Imports nothing of riverbed (``import_riverbed`` says why it does not import instead), so a
benchmark can still run its peers while riverbed is mid-change.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, NoReturn, ParamSpec, Protocol, TypeVar

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient

    from tests.services.redis import RedisServer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
PEERS = ROOT / "bench" / "peers"
PEER_PYTHON = ROOT / "bench" / ".venv-peers" / "bin" / "python"

OutcomeT = TypeVar("OutcomeT")
ResultsT = TypeVar("ResultsT")  # one system's results, as each benchmark keeps them
ServerT = TypeVar("ServerT", bound="Server")
ReturnT = TypeVar("ReturnT")
Params = ParamSpec("Params")


class BenchError(Exception):
    """A system did not do what the benchmark asked (lost records, no progress, a crash, a
    server that did not start)."""


# The machine, the revision and the versions


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


def import_riverbed() -> tuple[Any, str | None]:
    """riverbed, or why it does not import (it may be mid-change; the peers still run)."""
    try:
        return importlib.import_module("riverbed"), None
    except Exception as exc:
        return None, f"import riverbed failed: {type(exc).__name__}: {exc}"


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


def kafka_broker_version() -> str:
    """The version of the Kafka jars tests/services/kafka.py runs (``?`` without them)."""
    version = "?"
    for jar in (ROOT / ".cache" / "kafka" / "libs").glob("kafka_2.13-*.jar"):
        version = jar.stem.removeprefix("kafka_2.13-")
    return version


def redis_server_version() -> str:
    with contextlib.suppress(OSError):
        output = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, check=False
        ).stdout
        return next((p.removeprefix("v=") for p in output.split() if p.startswith("v=")), "?")
    return "?"


# The servers: the test suite's own (tests/services), started and stopped by the benchmark

# Redis: no RDB snapshots; an append-only file written every event loop and fsynced once a
# second (survives a process crash, like SQLite's fsync=normal and Kafka's page cache); no AOF
# rewrites, whose fork would compete for the 2 cores mid-run.
REDIS_SETTINGS = [
    "--appendonly",
    "yes",
    "--appendfsync",
    "everysec",
    "--auto-aof-rewrite-percentage",
    "0",
]


class Server(Protocol):
    def stop(self) -> None: ...


def tests_importable() -> None:
    """Put the repository on ``sys.path``, for ``tests.services`` (python puts bench/ there)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


@contextlib.contextmanager
def running(start: Callable[[], ServerT]) -> Iterator[ServerT]:
    """The server ``start`` starts, stopped at the end; one that does not start is a BenchError."""
    try:
        server = start()
    except RuntimeError as error:
        raise BenchError(str(error)) from None
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def redis_server(root: Path) -> Iterator[RedisServer]:
    """Debian's redis-server with REDIS_SETTINGS on a free loopback port, its files in ``root``."""
    tests_importable()
    from tests.services.redis import start_redis

    with running(lambda: start_redis(root, REDIS_SETTINGS)) as server:
        yield server


@contextlib.contextmanager
def kafka_server(root: Path) -> Iterator[str]:
    """The tests' single-node Kafka broker (tests/services/kafka.py); yields its bootstrap."""
    tests_importable()
    from tests.services.kafka import start_kafka

    with running(lambda: start_kafka(root)) as server:
        try:
            yield server.bootstrap
        finally:
            gc.collect()  # destroy the clients first, or librdkafka logs the broker going away


def create_kafka_topic(admin: AdminClient, topic: str, partitions: int) -> None:
    """Create ``topic`` (one replica) and wait until each of its partitions has a leader."""
    from confluent_kafka.cimpl import NewTopic

    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metadata = admin.list_topics(topic, timeout=5).topics.get(topic)
        if metadata is not None and metadata.error is None:
            leaders = [p.leader for p in metadata.partitions.values()]
            if len(leaders) == partitions and all(leader >= 0 for leader in leaders):
                return
        time.sleep(0.05)
    raise BenchError(f"topic '{topic}' has no leaders 30 s after it was created")


# The command line


def add_runs_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=3, help="runs; figures are their median")


def add_systems_argument(
    parser: argparse.ArgumentParser, systems: tuple[str, ...], aliases: dict[str, tuple[str, ...]]
) -> None:
    """``--systems``, all of ``systems`` by default; ``chosen_systems`` reads it."""
    parser.add_argument(
        "--systems",
        default=",".join(systems),
        help=f"comma-separated, from {','.join(systems)} or {','.join(aliases)} (default: all)",
    )


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


def add_no_results_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-results", action="store_true", help="print only; do not append to bench/RESULTS.md"
    )


# Running the systems


def stop_on_signals() -> None:
    """SIGTERM and SIGINT raise in the main thread, so servers and peers stop in ``finally``.

    (A background job of a non-interactive shell starts with SIGINT ignored; Python keeps that.)
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def outcome_or_failure(
    run: Callable[Params, ReturnT], *args: Params.args, **kwargs: Params.kwargs
) -> ReturnT | str:
    """What ``run`` returns, or why it failed: any exception, so that the other systems go on
    (an interrupt is no exception; it still stops the benchmark)."""
    try:
        return run(*args, **kwargs)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def last_error(log_path: Path) -> str:
    """The last line of a subprocess's log that mentions an error, else its last line."""
    lines = log_path.read_text(errors="replace").strip().splitlines()
    reason = next(
        (line for line in reversed(lines) if "Error" in line or "error" in line),
        lines[-1] if lines else "no output",
    )
    return reason.strip()[:300]


class Unavailable:
    """A system that cannot run here; every run fails with the reason."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason

    def run(self, *workload: object) -> NoReturn:  # whatever the benchmark's systems take
        raise BenchError(self.reason)


@dataclass
class Runs(Generic[OutcomeT]):
    """One system's runs: the outcome of each, or why it failed."""

    outcomes: list[OutcomeT] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def tally(self) -> str:
        """The table's ``runs`` cell: ``3 ok``, ``2 ok, 1 failed``."""
        return f"{len(self.outcomes)} ok" + (
            f", {len(self.failures)} failed" if self.failures else ""
        )

    def failed_row(self, name: str, columns: int) -> list[str]:
        """The table row of a system without an outcome: why its first run failed."""
        reason = self.failures[0] if self.failures else "not run"
        return [name, f"failed: {short(reason)}", *["-"] * (columns - 3), self.tally()]

    def runs_line(self, name: str, runs: list[str], separator: str) -> str:
        """The system's line in RESULTS.md's list of all runs: ``runs`` (the figures of each
        outcome), then why the other runs failed."""
        failed = [f"failed: {short(reason, 300)}" for reason in self.failures]
        return f"- {name}: " + separator.join(runs + failed)


# Targets

# What a target's check measured and whether that met it, from every system's results.
Check = Callable[[dict[str, ResultsT]], tuple[str, bool] | None]


@dataclass(frozen=True)
class Target(Generic[ResultsT]):
    """A goal for one of a system's figures; ``check`` gives None where it was not measured."""

    system: str
    figure: str  # the figure whose cell in the table gets the ✓/✗ mark
    description: str
    check: Check[ResultsT]


TARGET_COLUMNS = ("system", "target", "measured", "status")


def ratio_check(
    system: str, peer: str, factor: float, rate: Callable[[ResultsT], float | None]
) -> Check[ResultsT]:
    """A check that ``system``'s rate is at least ``factor`` times ``peer``'s."""

    def check(results: dict[str, ResultsT]) -> tuple[str, bool] | None:
        if system not in results or peer not in results:
            return None
        ours, theirs = rate(results[system]), rate(results[peer])
        if ours is None or not theirs:
            return None
        return f"{ours / theirs:.2f}x {peer}", ours >= factor * theirs

    return check


def target_marks(
    targets: Iterable[Target[ResultsT]], results: dict[str, ResultsT]
) -> dict[tuple[str, str], str]:
    """Per (system, figure), a ✓ for every measured target met and a ✗ for every one missed."""
    marks: dict[tuple[str, str], str] = {}
    for target in targets:
        outcome = target.check(results)
        if outcome is not None:
            key = (target.system, target.figure)
            marks[key] = marks.get(key, "") + (" ✓" if outcome[1] else " ✗")
    return marks


def target_rows(
    targets: Iterable[Target[ResultsT]], results: dict[str, ResultsT]
) -> list[list[str]]:
    """The targets of the systems that ran, with what was measured, or ``not measured``."""
    rows = []
    for target in targets:
        if target.system not in results:
            continue
        outcome = target.check(results)
        if outcome is None:
            rows.append([target.system, target.description, "-", "not measured"])
        else:
            rows.append(
                [target.system, target.description, outcome[0], "met" if outcome[1] else "MISSED"]
            )
    return rows


# Tables and RESULTS.md


def short(reason: str, limit: int = 160) -> str:
    """``reason`` on one line, without Markdown cell breaks, at most ``limit`` characters."""
    reason = " ".join(reason.split()).replace("|", "/")
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"


def markdown_table(header: Sequence[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


@dataclass(frozen=True)
class Tables:
    """A benchmark's figures, a row a system, and its targets, a row a target: printed on the
    console, then written to RESULTS.md."""

    title: str  # of the figures on the console
    columns: Sequence[str]
    rows: list[list[str]]
    targets: list[list[str]]

    def figures_table(self) -> Table:
        table = Table(title=self.title)
        for column in self.columns:
            table.add_column(column, justify="left" if column == "system" else "right")
        for row in self.rows:
            table.add_row(*row)
        return table

    def targets_table(self) -> Table:
        table = Table(title="targets")
        for column in TARGET_COLUMNS:
            table.add_column(column)
        for row in self.targets:
            table.add_row(*row)
        return table

    def print(self, console: Console) -> None:
        console.print(self.figures_table())
        console.print(self.targets_table())

    def markdown(self) -> list[str]:
        return [
            *markdown_table(self.columns, self.rows),
            "",
            *markdown_table(TARGET_COLUMNS, self.targets),
        ]


class Report:
    """A benchmark's section of RESULTS.md and what it says about the run: the date, how long
    the runs took and the load averages before and after them (other work on the machine skews
    the figures). Made when the benchmark starts; ``stop`` it when the runs are over."""

    def __init__(self, title: str, script: str, targets_note: str, runs_heading: str) -> None:
        self.title = title  # the section's: ``## <title>: <date>``
        self.script = script  # bench/<name>.py, for the command line
        self.targets_note = targets_note  # the targets in a sentence
        self.runs_heading = runs_heading  # what the figures in the list of all runs are
        self.date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        self.load_start = loadavg()
        self.elapsed = 0.0  # seconds until ``stop``
        self.load_end = "?"
        self._started = time.monotonic()

    def stop(self) -> None:
        self.elapsed = time.monotonic() - self._started
        self.load_end = loadavg()

    def summary(self) -> str:
        return (
            f"took {self.elapsed / 60:.1f} min; load average at start {self.load_start}, "
            f"at end {self.load_end}"
        )

    def section(self, versions: str, tables: Tables, settings: list[str]) -> list[str]:
        """The section up to its list of all runs, which the caller adds (a line a system)."""
        command = f".venv/bin/python {self.script} " + shlex.join(sys.argv[1:])
        return [
            "",
            f"## {self.title}: {self.date}",
            "",
            f"- Machine: {machine()}; load average {self.load_start} at start, "
            f"{self.load_end} at end",
            f"- Command: `{command.strip()}` ({self.elapsed / 60:.1f} min)",
            f"- Versions: {versions}",
            f"- Targets: {self.targets_note}.",
            "",
            *tables.markdown(),
            "",
            "Settings:",
            "",
            *[f"- {note}" for note in settings],
            "",
            f"All runs ({self.runs_heading}):",
            "",
        ]


def write_results(lines: list[str]) -> None:
    """Append a benchmark's section to ``bench/RESULTS.md`` (created with its title if new)."""
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the scripts in bench/.\n")
    with RESULTS.open("a") as out:
        out.write("\n".join(lines) + "\n")
