"""The tasks benchmark: riverbed's task queue against Celery, Dramatiq, RQ, arq, Taskiq and Huey.

Every system runs the same no-op task on the same Redis server, which the script starts itself
(riverbed-sqlite uses its own SQLite file instead), one system at a time in the same run:

- enqueue: ``--tasks`` tasks, one call each (the library's normal enqueue call), and separately
  through the library's bulk enqueue where it has one;
- processing: workers started after all tasks are queued, timed from their start until every
  task's result is stored;
- round trip: with the workers running, enqueue one task and wait for its result, 200 times.

Producers run as subprocesses (``bench/peers/tasks_driver.py``) with the system's own Python:
bench/.venv-peers (``make bench-peers``) for the peers, this venv for riverbed; workers run as
subprocesses with each library's worker command. It prints the medians of ``--runs`` runs and
appends them to ``bench/RESULTS.md``; ``bench/README.md`` explains the figures. Run it with::

    .venv/bin/python bench/tasks.py [--tasks N] [--runs R] [--systems riverbed,celery]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import common  # bench/common.py: python puts bench/ first on sys.path
import redis
from rich.console import Console

DRIVER = common.PEERS / "tasks_driver.py"
PEER_BIN = common.PEER_PYTHON.parent
RIVERBED_PYTHON = Path(sys.executable)
RIVERBED_CLI = RIVERBED_PYTHON.parent / "riverbed"
PEER_PACKAGES = ("celery", "kombu", "dramatiq", "rq", "arq", "taskiq", "taskiq-redis", "huey")

# The workload and the measurements
TASKS = 10_000
ROUND_TRIPS = 200
ROUND_TRIP_WARMUP = 10  # untimed round trips before the timed ones
BULK_CHUNK = 1_000  # tasks per bulk enqueue call
WARMUP_TASKS = 1_000
POLL = 0.01  # s between completion checks while workers process
TIMEOUT = 300.0  # s for one phase (enqueue, processing, round trips)
RESULT_TIMEOUT = 10.0  # s a round trip may wait for its result
STOP_TIMEOUT = 10.0  # s for workers to exit on SIGTERM before SIGKILL

# riverbed's worker per backend: the fastest of the pools (thread, async, process) and
# concurrencies (2-8) tried on 2 cores (README); --riverbed-pool/--riverbed-concurrency override.
RIVERBED_WORKER = {"riverbed-redis": ("thread", 8), "riverbed-sqlite": ("thread", 4)}

RIVERBED_SYSTEMS = ("riverbed-redis", "riverbed-sqlite")
PEER_SYSTEMS = ("celery", "dramatiq", "rq", "arq", "taskiq", "huey")
SYSTEMS = RIVERBED_SYSTEMS + PEER_SYSTEMS
ALIASES = {"riverbed": RIVERBED_SYSTEMS, "peers": PEER_SYSTEMS}
PEER_PACKAGE = {
    "celery": "celery",
    "dramatiq": "dramatiq",
    "rq": "rq",
    "arq": "arq",
    "taskiq": "taskiq-redis",
    "huey": "huey",
}

TARGETS_NOTE = (
    "riverbed-redis processing >= 3x Celery and >= 1.2x the fastest peer; round trip p50 <= 2 ms "
    "on riverbed-redis and on riverbed-sqlite"
)


# The systems


@dataclass(frozen=True)
class Spec:
    """One system: its producer module in bench/peers, its Python and its worker commands."""

    name: str
    module: str  # bench/peers/<module>.py, imported by the driver and by the workers
    python: Path
    workers: Callable[[str], list[list[str]]]  # task URL -> commands, run from bench/peers
    env: dict[str, str]  # for the driver and the workers (the URL is added per run)
    settings: str  # for the notes
    sqlite: bool = False  # a fresh SQLite file per phase instead of the shared Redis


def riverbed_worker(pool: str, concurrency: int) -> Callable[[str], list[list[str]]]:
    def commands(url: str) -> list[list[str]]:
        return [
            [
                str(RIVERBED_CLI), "tasks", "worker", "riverbed_tasks:app",
                "--concurrency", str(concurrency), "--pool", pool,
            ]
        ]  # fmt: skip

    return commands


def peer(*command: str, processes: int = 1) -> Callable[[str], list[list[str]]]:
    """``processes`` copies of a command from bench/.venv-peers/bin (the URL goes by env)."""
    first, *rest = command
    argv = [str(PEER_BIN / first), *rest]
    return lambda url: [argv] * processes


def riverbed_spec(name: str, args: argparse.Namespace) -> Spec:
    default_pool, default_concurrency = RIVERBED_WORKER[name]
    pool = args.riverbed_pool or default_pool
    concurrency = args.riverbed_concurrency or default_concurrency
    settings = (
        f"`riverbed tasks worker riverbed_tasks:app --pool {pool} --concurrency {concurrency}`"
        + (
            " (the fastest of the thread, async and process pools at concurrency 2-8 tried on "
            "this machine)"
            if (pool, concurrency) == RIVERBED_WORKER[name]
            else " (set on the command line)"
        )
        + "; `noop.delay()`, bulk `noop.delay_many(...)`, `handle.result(timeout=10)`; done: "
        "the broker's `stats()` show no task queued, scheduled or running (then, untimed, "
        "`broker.info` shows that every task succeeded)"
    )
    sqlite = name == "riverbed-sqlite"
    if sqlite:
        settings += "; a new SQLite file `sqlite:///<tmpdir>/tasks.db` per phase"
    return Spec(
        name,
        "riverbed_tasks",
        RIVERBED_PYTHON,
        riverbed_worker(pool, concurrency),
        {},
        settings,
        sqlite=sqlite,
    )


def specs(args: argparse.Namespace) -> dict[str, Spec]:
    """Each system with its worker settings for 2 cores (bench/README.md says why)."""
    return {
        "riverbed-redis": riverbed_spec("riverbed-redis", args),
        "riverbed-sqlite": riverbed_spec("riverbed-sqlite", args),
        "celery": Spec(
            "celery", "celery_tasks", common.PEER_PYTHON,
            peer(
                "celery", "-A", "celery_tasks", "worker", "--pool", "solo",
                "--prefetch-multiplier", "128", "--loglevel", "WARNING",
                "--without-gossip", "--without-mingle", "--without-heartbeat", processes=2,
            ),
            {"BENCH_CELERY_PREFETCH": "128"},
            "Celery, Redis broker and Redis result backend: two worker processes (one per "
            "core), each `celery worker --pool solo --prefetch-multiplier 128 --loglevel "
            "WARNING --without-gossip --without-mingle --without-heartbeat` (solo runs tasks "
            "in the worker process: ~1.5x `--pool prefork --concurrency 2`, which hands every "
            "task to a child process, and `--pool threads`, on these no-op tasks); "
            "`noop.delay()`, `AsyncResult.get(timeout=10)`; no bulk enqueue; done: every "
            "task's `celery-task-meta-<id>` key exists",
        ),
        "dramatiq": Spec(
            "dramatiq", "dramatiq_tasks", common.PEER_PYTHON,
            peer("dramatiq", "dramatiq_tasks", "--processes", "2", "--threads", "8"),
            {},
            "Dramatiq, RedisBroker with the Results middleware (RedisBackend), "
            "`@actor(store_results=True)`: `dramatiq dramatiq_tasks --processes 2 --threads 8` "
            "(its defaults on 2 cores; 16 threads or 1 process were no faster); "
            "`noop.send()`, `message.get_result(block=True)`; no bulk enqueue; done: every "
            "message's result key exists",
        ),
        "rq": Spec(
            "rq", "rq_tasks", common.PEER_PYTHON,
            lambda url: [
                [
                    str(PEER_BIN / "rq"), "worker-pool", "--num-workers", "3", "--worker-class",
                    "rq.worker.SimpleWorker", "--logging-level", "WARNING", "--url", url,
                    "default",
                ]
            ],
            {},
            "`rq worker-pool --num-workers 3 --worker-class rq.worker.SimpleWorker "
            "--logging-level WARNING` (SimpleWorker runs jobs in the worker process instead of "
            "a fork per job: ~5x the default Worker here; one job at a time per worker, and 3 "
            "workers beat 2 and 4 on 2 cores); `queue.enqueue(noop)`, bulk "
            "`queue.enqueue_many(...)` (one "
            "pipeline), `job.latest_result(timeout=10)`; done: every job's "
            "`rq:results:<id>` stream exists",
        ),
        "arq": Spec(
            "arq", "arq_tasks", common.PEER_PYTHON,
            lambda url: [[str(common.PEER_PYTHON), "-m", "arq_tasks"]],
            {"BENCH_ARQ_MAX_JOBS": "100", "BENCH_ARQ_POLL_DELAY": "0.002"},
            "One worker process, `arq.run_worker(WorkerSettings)` with max_jobs 100 and "
            "poll_delay 0.002 s (defaults 10 and 0.5 s: ~1/3 the throughput and a 250 ms round "
            "trip, as the worker sleeps poll_delay between queue reads; a second process was no "
            "faster); `await pool.enqueue_job('noop')`, `await job.status()` polled every 1 ms "
            "until complete then `await job.result()` (see bench/peers/arq_tasks.py); no bulk "
            "enqueue; done: every job's `arq:result:<id>` key exists",
        ),
        "taskiq": Spec(
            "taskiq", "taskiq_tasks", common.PEER_PYTHON,
            peer(
                "taskiq", "worker", "taskiq_tasks:broker", "--workers", "2",
                "--max-async-tasks", "100", "--log-level", "WARNING",
            ),
            {},
            "Taskiq, taskiq-redis `RedisStreamBroker` + `RedisAsyncResultBackend`: `taskiq "
            "worker taskiq_tasks:broker --workers 2 --max-async-tasks 100 --log-level WARNING` "
            "(its defaults but the log level; 1 process was no faster); "
            "`await noop.kiq()`, `await task.wait_result(check_interval=0.001, timeout=10)`; no "
            "bulk enqueue; done: every task's result key exists",
        ),
        "huey": Spec(
            "huey", "huey_tasks", common.PEER_PYTHON,
            peer("huey_consumer", "huey_tasks.huey", "--workers", "4", "--worker-type",
                 "thread", "--quiet"),
            {},
            "Huey, `RedisHuey(notify_result=True, store_none=True)`: `huey_consumer "
            "huey_tasks.huey --workers 4 --worker-type thread --quiet` (1, 2 or 4 threads and 2 "
            "processes within noise of each other; threads are Huey's recommended default); "
            "`noop()`, "
            "`result.get(blocking=True, timeout=10)`; no bulk enqueue; done: the results hash "
            "holds every task",
        ),
    }  # fmt: skip


# Processes


class LineReader:
    """A subprocess whose stdout lines a thread collects (its stderr goes to a log file)."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=common.PEERS,
            env=env,
            start_new_session=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()

    def _read(self, stream: IO[str] | None) -> None:
        if stream is not None:
            for line in stream:
                self._lines.put(line.strip())
        self._lines.put(None)

    def next_line(self, timeout: float, problem: Callable[[], str | None]) -> str:
        deadline = time.monotonic() + timeout
        while True:
            trouble = problem()
            if trouble is not None:
                raise common.BenchError(trouble)
            try:
                line = self._lines.get(timeout=0.05)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise common.BenchError(
                        f"no answer from the driver within {timeout:g} s"
                    ) from None
                continue
            if line is None:
                self.process.wait(10)
                raise common.BenchError(f"the driver exited: {common.last_error(self.log_path)}")
            if line:
                return line

    def stop(self) -> None:
        stop_group(self.process)
        self._log.close()


def stop_group(process: subprocess.Popen[Any]) -> None:
    """SIGTERM to the process group ``process`` leads (workers fork children), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(STOP_TIMEOUT)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # children that outlived their leader too
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(STOP_TIMEOUT)


class Workers:
    """A system's worker commands, each its own process group, logging to one file."""

    def __init__(self, commands: list[list[str]], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.processes: list[subprocess.Popen[bytes]] = []
        for argv in commands:
            self.processes.append(
                subprocess.Popen(
                    argv,
                    stdout=self._log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=common.PEERS,
                    env=env,
                    start_new_session=True,
                )
            )

    def problem(self) -> str | None:
        for process in self.processes:
            if process.poll() is not None:
                self._log.flush()
                return (
                    f"a worker exited with code {process.returncode}: "
                    f"{common.last_error(self.log_path)}"
                )
        return None

    def stop(self) -> None:
        for process in self.processes:
            stop_group(process)
        self._log.close()


# One run of one system


@dataclass(frozen=True)
class Outcome:
    enqueue: float  # tasks/s, one call each
    bulk: float | None  # tasks/s through the bulk call (None: the library has none)
    processing: float  # tasks/s from the workers' start until all were done
    startup: float  # s from the workers' start until the first task was done
    p50: float  # round trip, s
    p99: float


class Runner:
    """Runs the phases of one system against the benchmark's Redis (or a SQLite file)."""

    def __init__(self, spec: Spec, redis_url: str | None, root: Path) -> None:
        self.spec = spec
        self._redis_url = redis_url
        self._root = root

    def _reset(self, directory: Path) -> str:
        """An empty store for the next phase; returns the system's task URL."""
        if self.spec.sqlite:
            directory.mkdir(parents=True, exist_ok=True)
            return f"sqlite:///{directory / 'tasks.db'}"
        if self._redis_url is None:
            raise common.BenchError("no Redis server")
        client = redis.Redis.from_url(self._redis_url)
        try:
            client.flushall()
        finally:
            client.close()
        return self._redis_url

    def _env(self, url: str) -> dict[str, str]:
        env = dict(os.environ) | self.spec.env
        env["BENCH_REDIS_URL"] = self._redis_url or ""
        env["RIVERBED_TASKS_URL"] = url
        env["PYTHONPATH"] = str(common.PEERS)
        return env

    def _driver(self, phase: str, url: str, config: dict[str, Any], log: Path) -> dict[str, Any]:
        argv = [str(self.spec.python), str(DRIVER), self.spec.module, phase, json.dumps(config)]
        reader = LineReader(argv, self._env(url), log)
        try:
            line = reader.next_line(TIMEOUT, lambda: None)
        finally:
            reader.stop()
        return parse_answer(line, phase)

    def run(self, tasks: int, round_trips: int, tag: str) -> Outcome:
        work = self._root / tag
        work.mkdir()
        config: dict[str, Any] = {
            "tasks": tasks,
            "chunk": BULK_CHUNK,
            "ids_file": str(work / "ids.json"),
            "redis_url": self._redis_url,
            "timeout": RESULT_TIMEOUT,
        }
        url = self._reset(work / "bulk")
        bulk = self._driver("enqueue-bulk", url, config, work / "bulk.log")["seconds"]
        url = self._reset(work / "single")
        single = self._driver("enqueue", url, config, work / "enqueue.log")["seconds"]
        waiter = LineReader(
            [
                str(self.spec.python), str(DRIVER), self.spec.module, "wait",
                json.dumps(config | {"timeout": TIMEOUT, "poll": POLL}),
            ],
            self._env(url),
            work / "wait.log",
        )  # fmt: skip
        workers: Workers | None = None
        try:
            ready = waiter.next_line(60, lambda: None)
            if ready != "READY":
                raise common.BenchError(f"the driver said {ready[:200]!r} instead of READY")
            started = time.monotonic()
            workers = Workers(self.spec.workers(url), self._env(url), work / "workers.log")
            answer = parse_answer(waiter.next_line(TIMEOUT, workers.problem), "wait")
            processing = tasks / (answer["done"] - started)
            startup = answer["first"] - started
            config |= {"count": round_trips, "warmup": ROUND_TRIP_WARMUP}
            latencies = self._driver("roundtrip", url, config, work / "roundtrip.log")
            trouble = workers.problem()
            if trouble is not None:
                raise common.BenchError(trouble)
        finally:
            waiter.stop()
            if workers is not None:
                workers.stop()
        p50, p99 = percentiles(latencies["latencies"])
        return Outcome(
            enqueue=tasks / single,
            bulk=None if bulk is None else tasks / bulk,
            processing=processing,
            startup=startup,
            p50=p50,
            p99=p99,
        )


def parse_answer(line: str, phase: str) -> dict[str, Any]:
    try:
        answer: dict[str, Any] = json.loads(line)
    except json.JSONDecodeError:
        raise common.BenchError(f"{phase}: the driver printed {line[:200]!r}") from None
    if "error" in answer:
        raise common.BenchError(f"{phase}: {answer['error']}")
    return answer


def percentiles(samples: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[49], cuts[98]


class Unavailable:
    """A system that cannot run here; every run fails with the reason."""

    def __init__(self, spec: Spec, reason: str) -> None:
        self.spec = spec
        self.reason = reason

    def run(self, tasks: int, round_trips: int, tag: str) -> Outcome:
        raise common.BenchError(self.reason)


def riverbed_problem() -> str | None:
    """Why riverbed's task queue cannot run here, or None."""
    try:
        if importlib.util.find_spec("riverbed.tasks") is None:
            return "riverbed has no tasks package"
        import riverbed
    except Exception as exc:
        return f"import riverbed failed: {type(exc).__name__}: {exc}"
    if "tasks_url" not in inspect.signature(riverbed.App).parameters:
        return "riverbed.App takes no tasks_url yet"
    if not RIVERBED_CLI.exists():
        return f"no riverbed command at {RIVERBED_CLI}"
    return None


def open_systems(
    args: argparse.Namespace, redis_url: str | None, root: Path, peers: dict[str, str]
) -> list[Runner | Unavailable]:
    chosen = specs(args)
    problem = riverbed_problem() if set(args.systems) & set(RIVERBED_SYSTEMS) else None
    systems: list[Runner | Unavailable] = []
    for name in args.systems:
        spec = chosen[name]
        if name in RIVERBED_SYSTEMS:
            if problem is not None:
                systems.append(Unavailable(spec, problem))
                continue
        elif not peers:
            systems.append(Unavailable(spec, "no bench/.venv-peers: run `make bench-peers`"))
            continue
        elif PEER_PACKAGE[name] not in peers:
            reason = f"{PEER_PACKAGE[name]} is not installed in bench/.venv-peers"
            systems.append(Unavailable(spec, reason))
            continue
        systems.append(Runner(spec, redis_url, root))
    return systems


# Results


class Results(common.Runs[Outcome]):
    def median(self, figure: str) -> float | None:
        values = [getattr(o, figure) for o in self.outcomes]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None


def processing_ratio(
    factor: float, peers: Callable[[dict[str, Results]], list[str]]
) -> common.Check[Results]:
    def check(results: dict[str, Results]) -> tuple[str, bool] | None:
        ours = None
        if "riverbed-redis" in results:
            ours = results["riverbed-redis"].median("processing")
        rates = {p: results[p].median("processing") for p in peers(results)}
        measured = {p: r for p, r in rates.items() if r}
        if ours is None or not measured:
            return None
        best = max(measured, key=lambda p: measured[p])
        return f"{ours / measured[best]:.2f}x {best}", ours >= factor * measured[best]

    return check


def p50_at_most(system: str, bound: float) -> common.Target[Results]:
    def check(results: dict[str, Results]) -> tuple[str, bool] | None:
        p50 = results[system].median("p50") if system in results else None
        return None if p50 is None else (f"{p50 * 1000:.2f} ms", p50 <= bound)

    return common.Target(system, "p50", f"round trip p50 <= {bound * 1000:g} ms", check)


TARGETS = (
    common.Target(
        "riverbed-redis",
        "processing",
        "processing >= 3x Celery",
        processing_ratio(3.0, lambda results: ["celery"] if "celery" in results else []),
    ),
    common.Target(
        "riverbed-redis",
        "processing",
        "processing >= 1.2x the fastest peer",
        processing_ratio(1.2, lambda results: [p for p in PEER_SYSTEMS if p in results]),
    ),
    p50_at_most("riverbed-redis", 0.002),
    p50_at_most("riverbed-sqlite", 0.002),
)
COLUMNS = (
    "system",
    "enqueue tasks/s",
    "bulk enqueue tasks/s",
    "processing tasks/s",
    "first done s",
    "round trip p50 ms",
    "p99 ms",
    "runs",
)


def table_rows(results: dict[str, Results]) -> list[list[str]]:
    marks = common.target_marks(TARGETS, results)
    rows = []
    for name, result in results.items():
        if not result.outcomes:
            rows.append(result.failed_row(name, len(COLUMNS)))
            continue

        def mark(column: str, text: str, name: str = name) -> str:
            return text + marks.get((name, column), "")

        bulk = result.median("bulk")
        rows.append(
            [
                name,
                f"{result.median('enqueue') or 0:,.0f}",
                "none" if bulk is None else f"{bulk:,.0f}",
                mark("processing", f"{result.median('processing') or 0:,.0f}"),
                f"{result.median('startup') or 0:.2f}",
                mark("p50", f"{(result.median('p50') or 0) * 1000:.2f}"),
                f"{(result.median('p99') or 0) * 1000:.2f}",
                result.tally(),
            ]
        )
    return rows


def result_tables(results: dict[str, Results], args: argparse.Namespace) -> common.Tables:
    title = f"tasks benchmark: {args.tasks:,} no-op tasks (median of {args.runs} runs)"
    targets = common.target_rows(TARGETS, results)
    return common.Tables(title, COLUMNS, table_rows(results), targets)


def versions(peers: dict[str, str]) -> str:
    try:
        import riverbed

        version = riverbed.__version__
    except Exception:
        version = "(does not import)"
    peer_text = ", ".join(f"{name} {v}" for name, v in peers.items()) or "none"
    return (
        f"riverbed {version} ({common.git_revision()}), Python {platform.python_version()}, "
        f"redis-py {redis.__version__}; peers (bench/.venv-peers, Python 3.11): {peer_text}; "
        f"redis-server {common.redis_server_version()}"
    )


def settings_notes(args: argparse.Namespace, systems: list[Runner | Unavailable]) -> list[str]:
    notes = [
        f"Workload: {args.tasks:,} no-op tasks (no arguments, result None) per run and system. "
        f"Enqueue: one call per task from a fresh producer process, timed from the first call "
        f"to the last return; bulk: the library's bulk call in chunks of {BULK_CHUNK:,} tasks "
        "into an emptied store (the processing run uses the single-call tasks). Processing: "
        "workers started after all tasks were queued, timed from starting the worker "
        "process(es) (interpreter start and imports included) until a separate process, "
        f"polling every {POLL * 1000:g} ms, sees every task done; `first done s` is the time "
        "until the first task was done (mostly worker start-up). Round trip: with those "
        f"workers running, {ROUND_TRIP_WARMUP} untimed then {args.round_trips} timed "
        "sequential enqueue-one-and-wait-for-its-result calls (p50/p99 of those).",
        "Redis: one `redis-server` started by the script (`--save '' --appendonly yes "
        "--appendfsync everysec`, AOF rewrite off) shared by every Redis system, `FLUSHALL` "
        "before each phase. Every system's producer runs in its own process with its own venv's "
        "Python (bench/.venv-peers for the peers, .venv for riverbed); workers are subprocesses "
        "stopped (SIGTERM, then SIGKILL to their process group) after each run. Peers log at "
        "WARNING (their INFO logs a line per task).",
        (
            f"Each system does one unrecorded warm-up run ({args.warmup_tasks:,} tasks) first; "
            if args.warmup_tasks
            else "No warm-up runs; "
        )
        + "each figure is the median of the runs; machine with 2 cores shared by Redis, the "
        "workers and the producer.",
    ]
    notes += [f"{system.spec.name}: {system.spec.settings}." for system in systems]
    return notes


def append_results(
    args: argparse.Namespace,
    results: dict[str, Results],
    report: common.Report,
    tables: common.Tables,
    systems: list[Runner | Unavailable],
    peers: dict[str, str],
) -> None:
    lines = report.section(versions(peers), tables, settings_notes(args, systems))
    for name, result in results.items():
        runs = [
            f"{o.enqueue:,.0f} / {'-' if o.bulk is None else f'{o.bulk:,.0f}'} / "
            f"{o.processing:,.0f}; {o.p50 * 1000:.2f} / {o.p99 * 1000:.2f}"
            for o in result.outcomes
        ]
        lines.append(result.runs_line(name, runs, " — "))
    common.write_results(lines)


# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=TASKS, help="no-op tasks per run")
    common.add_runs_argument(parser)
    common.add_systems_argument(parser, SYSTEMS, ALIASES)
    parser.add_argument(
        "--round-trips", type=int, default=ROUND_TRIPS, help="timed round trips per run"
    )
    parser.add_argument(
        "--warmup-tasks",
        type=int,
        default=WARMUP_TASKS,
        help="tasks of the unrecorded warm-up run per system (0: none)",
    )
    parser.add_argument(
        "--riverbed-pool",
        choices=("thread", "async", "process"),
        help="riverbed worker --pool for both backends (default: thread)",
    )
    parser.add_argument(
        "--riverbed-concurrency",
        type=int,
        help="riverbed worker --concurrency for both backends (default: 8 on Redis, 4 on SQLite)",
    )
    common.add_no_results_argument(parser)
    args = parser.parse_args(argv)
    args.systems = common.chosen_systems(parser, args.systems, SYSTEMS, ALIASES)
    return args


def describe(outcome: Outcome) -> str:
    bulk = "none" if outcome.bulk is None else f"{outcome.bulk:,.0f}/s"
    return (
        f"enqueue {outcome.enqueue:,.0f}/s, bulk {bulk}, processing {outcome.processing:,.0f}/s "
        f"(first after {outcome.startup:.2f} s), round trip p50 {outcome.p50 * 1000:.2f} ms "
        f"p99 {outcome.p99 * 1000:.2f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.stop_on_signals()
    console = Console()
    report = common.Report(
        "Tasks",
        "bench/tasks.py",
        TARGETS_NOTE,
        "enqueue / bulk / processing tasks/s; round trip p50 / p99 ms",
    )
    peers = common.peer_versions(PEER_PACKAGES)
    console.log(f"peers venv: {peers or 'missing'}")
    results = {name: Results() for name in args.systems}
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="riverbed-tasks-")))
        redis_url: str | None = None
        if any(name != "riverbed-sqlite" for name in args.systems):
            (root / "redis").mkdir()
            with console.status("starting redis-server"):
                redis_url = stack.enter_context(common.redis_server(root / "redis")).url
        systems = open_systems(args, redis_url, root, peers)
        if args.warmup_tasks:
            for system in systems:
                with console.status(f"warming up {system.spec.name}"):
                    outcome = common.outcome_or_failure(
                        system.run, args.warmup_tasks, 20, f"{system.spec.name}-w"
                    )
                if isinstance(outcome, str):
                    console.log(
                        f"warm-up {system.spec.name}: [red]failed[/] {common.short(outcome, 300)}"
                    )
        for run in range(1, args.runs + 1):
            for system in systems:
                name = system.spec.name
                with console.status(f"run {run}/{args.runs}: {name}"):
                    outcome = common.outcome_or_failure(
                        system.run, args.tasks, args.round_trips, f"{name}-{run}"
                    )
                if isinstance(outcome, str):
                    results[name].failures.append(outcome)
                    console.log(f"run {run} {name}: [red]failed[/] {common.short(outcome, 300)}")
                else:
                    results[name].outcomes.append(outcome)
                    console.log(f"run {run} {name}: {describe(outcome)}")
    report.stop()
    tables = result_tables(results, args)
    tables.print(console)
    console.print(report.summary())
    if not args.no_results:
        append_results(args, results, report, tables, systems, peers)
        console.print(f"appended to {common.RESULTS.relative_to(common.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
