"""What the benchmarks share: the machine, revision and versions they ran on, the servers they
start, Markdown tables, stopping.

Imports nothing of riverbed (``import_riverbed`` says why it does not import instead), so a
benchmark can still run its peers while riverbed is mid-change.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient

    from tests.services.redis import RedisServer

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / "bench" / ".venv-peers" / "bin" / "python"

ServerT = TypeVar("ServerT", bound="Server")


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


# Running the systems


def stop_on_signals() -> None:
    """SIGTERM and SIGINT raise in the main thread, so servers and peers stop in ``finally``.

    (A background job of a non-interactive shell starts with SIGINT ignored; Python keeps that.)
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def last_error(log_path: Path) -> str:
    """The last line of a subprocess's log that mentions an error, else its last line."""
    lines = log_path.read_text(errors="replace").strip().splitlines()
    reason = next(
        (line for line in reversed(lines) if "Error" in line or "error" in line),
        lines[-1] if lines else "no output",
    )
    return reason.strip()[:300]


# Tables and RESULTS.md


def short(reason: str, limit: int = 160) -> str:
    """``reason`` on one line, without Markdown cell breaks, at most ``limit`` characters."""
    reason = " ".join(reason.split()).replace("|", "/")
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"


def markdown_table(header: Sequence[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def write_results(results: Path, lines: list[str]) -> None:
    """Append a benchmark's section to ``bench/RESULTS.md`` (created with its title if new)."""
    if not results.exists():
        results.write_text("# Benchmark results\n\nAppended by the scripts in bench/.\n")
    with results.open("a") as out:
        out.write("\n".join(lines) + "\n")
