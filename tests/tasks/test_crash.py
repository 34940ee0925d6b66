"""Task workers as real processes: SIGKILLed mid-run, a Redis restart, SIGTERM.

Workers are ``riverbed tasks worker tests.tasks.crash_app:app`` subprocesses; every execution is
journaled per process, so a test can tell how often each task ran, and where."""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

import riverbed
from riverbed.tasks import TaskState
from tests.services import unavailable
from tests.services.redis import redis_missing, start_redis
from tests.support import Worker, wait_until
from tests.tasks import crash_app

pytestmark = pytest.mark.slow

TASKS = 10_000


def start_worker(workers: list[Worker], *options: str) -> Worker:
    worker = Worker(
        "riverbed.cli.main", "tasks", "worker", "tests.tasks.crash_app:app", "--lease", "2",
        *options,
    )  # fmt: skip
    workers.append(worker)
    return worker


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broker_url: str) -> Iterator[Path]:
    """Where workers journal executions; workers inherit it and the broker URL."""
    directory = tmp_path / "journal"
    directory.mkdir()
    monkeypatch.setenv("TASKS_JOURNAL_DIR", str(directory))
    monkeypatch.setenv("RIVERBED_TASKS_URL", broker_url)
    crash_app.app.tasks.use_url(broker_url)
    yield directory
    crash_app.app.tasks.close()


def executions(journal: Path) -> dict[int, list[int]]:
    """Task number -> the pids that started it, from every worker's journal."""
    started: dict[int, list[int]] = {}
    for path in journal.glob("*.log"):
        pid = int(path.stem)
        for line in path.read_text().splitlines():
            kind, _, number = line.partition(" ")
            if kind == "start" and number.isdigit():
                started.setdefault(int(number), []).append(pid)
    return started


def test_sigkilled_workers_lose_no_task_and_rerun_only_what_they_were_running(
    journal: Path, workers: list[Worker]
) -> None:
    handles = crash_app.work.delay_many([((i,), {}) for i in range(TASKS)])
    stable = start_worker(workers, "--concurrency", "4")
    victim = start_worker(workers, "--concurrency", "4")
    killed: set[int] = set()
    rng = random.Random(7)
    for _ in range(3):
        time.sleep(rng.uniform(0.5, 1.5))
        killed.add(victim.process.pid)
        victim.signal(signal.SIGKILL)
        victim.process.wait(10)
        victim = start_worker(workers, "--concurrency", "4")
    broker = crash_app.app.tasks.broker
    done = broker.wait([h.id for h in handles], 180)
    assert len(done) == TASKS, f"{TASKS - len(done)} tasks never finished"
    assert {info.state for info in done.values()} == {TaskState.SUCCEEDED}
    assert [h.result(timeout=5) for h in handles[:100]] == [2 * i for i in range(100)]
    assert stable.process.poll() is None

    started = executions(journal)
    assert set(started) == set(range(TASKS))
    reruns = {number: pids for number, pids in started.items() if len(pids) > 1}
    for number, pids in reruns.items():
        # Every run but the last was cut short by a SIGKILL of the process running it.
        by_survivors = [pid for pid in pids if pid not in killed]
        assert len(by_survivors) <= 1, (number, pids)
    assert len(reruns) <= 3 * 8 * 2, len(reruns)  # at most what the victims held when killed


def test_workers_ride_out_a_redis_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: list[Worker]
) -> None:
    reason = redis_missing()
    if reason is not None:
        unavailable("Redis", reason)
    # Persisted on every write, as a Redis holding a task queue is run.
    settings = ("--appendonly", "yes", "--appendfsync", "always")
    server = start_redis(tmp_path, settings)
    try:
        url = server.url
        journal = tmp_path / "journal"
        journal.mkdir()
        monkeypatch.setenv("TASKS_JOURNAL_DIR", str(journal))
        monkeypatch.setenv("RIVERBED_TASKS_URL", url)
        crash_app.app.tasks.use_url(url)
        handles = crash_app.work.delay_many([((i,), {}) for i in range(2000)])
        worker = start_worker(workers, "--concurrency", "4")
        wait_until(lambda: len(executions(journal)) >= 300, 60, "the worker to get going")
        server.stop()
        time.sleep(2)
        server = start_redis(tmp_path, settings, port=server.port)
        done = crash_app.app.tasks.broker.wait([h.id for h in handles], 120)
        assert len(done) == 2000, f"{2000 - len(done)} tasks never finished"
        assert {info.state for info in done.values()} == {TaskState.SUCCEEDED}
        assert worker.process.poll() is None, "the worker gave up"
        assert set(executions(journal)) == set(range(2000))
    finally:
        crash_app.app.tasks.close()
        server.stop()


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_sigterm_finishes_running_tasks_and_gives_back_the_rest(
    journal: Path, workers: list[Worker], pool: str
) -> None:
    running = crash_app.slow.delay(1.5)
    waiting = [crash_app.work.delay(i) for i in range(3)]
    worker = start_worker(workers, "--pool", pool, "--concurrency", "1", "--prefetch", "3",
                          "--shutdown-timeout", "10")  # fmt: skip
    wait_until(lambda: running.status is TaskState.RUNNING, 30, "the slow task to start")
    # To the whole group, as systemd does: the child running the task too.
    worker.signal_group(signal.SIGTERM)
    assert worker.process.wait(30) == 0
    assert running.result(timeout=5) == "done"
    assert [h.status for h in waiting] == [TaskState.QUEUED] * 3  # given back, not lost
    lines = [line for path in journal.glob("*.log") for line in path.read_text().splitlines()]
    assert Counter(lines) == {"start slow": 1, "end slow": 1}


def test_unknown_task_name_at_a_worker_process(
    journal: Path, workers: list[Worker], broker_url: str
) -> None:
    with riverbed.App("elsewhere", tasks_url=broker_url) as other:

        @other.task(name="not.deployed")
        def missing() -> None: ...

        handle = missing.delay()
        start_worker(workers, "--queues", "default")
        with pytest.raises(riverbed.TaskFailed, match="UnknownTaskError"):
            handle.result(timeout=60)


def test_three_worker_processes_run_a_periodic_task_once_per_tick(
    journal: Path, workers: list[Worker]
) -> None:
    for _ in range(3):
        workers.append(
            Worker("riverbed.cli.main", "tasks", "worker", "tests.tasks.periodic_app:app")
        )

    def ticks() -> list[int]:
        return [int(line) for p in journal.glob("*.log") for line in p.read_text().split()]

    wait_until(lambda: bool(ticks()), 60, "a worker to lead and run the first tick")
    first = min(ticks()) + 1000
    # Ten seconds from the next tick, and a margin for the last run to finish.
    time.sleep(max(0.0, (first + 10_000) / 1000 - time.time()) + 1.5)
    seen = ticks()
    assert len(seen) == len(set(seen)), "a tick ran twice"
    assert sorted(t for t in seen if first <= t < first + 10_000) == list(
        range(first, first + 10_000, 1000)
    )
