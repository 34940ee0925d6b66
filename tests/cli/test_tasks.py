"""``riverbed tasks``: the worker command, and looking after the broker from the shell."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

import riverbed
from riverbed.cli.main import app as cli
from riverbed.tasks import TaskState
from riverbed.tasks.brokers import connect_broker
from tests.services import free_port
from tests.support import wait_until

RIVERBED = str(Path(sys.executable).with_name("riverbed"))

APP_MODULE = textwrap.dedent(
    """
    import riverbed

    app = riverbed.App("jobs")

    @app.task
    def double(n: int) -> int:
        return 2 * n

    @app.task
    def broken(n: int) -> int:
        raise KeyError(f"no record {n}")

    @app.task
    def topics() -> list[str]:
        return [topic.name for topic in app.log.list_topics()]

    @app.task
    def waits_for(path: str) -> None:
        import os, time

        while not os.path.exists(path):
            time.sleep(0.02)
    """
)


@pytest.fixture
def tasks_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/tasks.db"


@pytest.fixture
def jobs(tmp_path: Path, tasks_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """The app module, importable here (for ``delay``) and by worker processes (from tmp_path)."""
    (tmp_path / "jobs.py").write_text(APP_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("RIVERBED_TASKS_URL", tasks_url)
    import jobs as module  # type: ignore[import-not-found]

    yield module
    module.app.close()
    sys.modules.pop("jobs", None)


def run(tasks_url: str, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(
        cli, ["tasks", "--tasks-url", tasks_url, *args], input=input, catch_exceptions=False
    )


def start_worker(tmp_path: Path, tasks_url: str, *args: str) -> subprocess.Popen[str]:
    log_url = f"sqlite:///{tmp_path}/jobs-log.db"  # the global --url: the app's tasks use it
    with riverbed.connect(log_url) as log:
        log.create_topic("jobs-only")
    command = [RIVERBED, "--url", log_url, "tasks", "--tasks-url", tasks_url, "worker"]
    return subprocess.Popen(
        [*command, "jobs:app", *args],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_worker_runs_tasks_until_sigterm_and_serves_metrics(
    tmp_path: Path, tasks_url: str, jobs: object
) -> None:
    port = free_port()
    worker = start_worker(tmp_path, tasks_url, "--pool", "process", "--metrics-port", str(port))
    try:
        handles = [jobs.double.delay(i) for i in range(20)]  # type: ignore[attr-defined]
        assert [h.result(timeout=60) for h in handles] == [2 * i for i in range(20)]
        with pytest.raises(riverbed.TaskFailed, match="KeyError"):
            jobs.broken.delay(7).result(timeout=60)  # type: ignore[attr-defined]
        assert jobs.topics.delay().result(timeout=60) == ["jobs-only"]  # type: ignore[attr-defined]

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                text: str = reply.read().decode()
                return text

        wait_until(lambda: "succeeded" in scrape(), 30, "the metrics")
        metrics = scrape()
        assert 'riverbed_tasks_finished_total{state="succeeded",task="jobs.double"} 20.0' in metrics
        assert 'riverbed_tasks_finished_total{state="failed",task="jobs.broken"} 1.0' in metrics
        assert "riverbed_tasks_held 0.0" in metrics
        waiting = jobs.waits_for.delay(str(tmp_path / "go"))  # type: ignore[attr-defined]
        wait_until(lambda: "riverbed_tasks_held 1.0" in scrape(), 30, "the held task counted")
        (tmp_path / "go").touch()
        waiting.result(timeout=60)
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, stderr
    assert "22 succeeded, 1 failed" in stderr


def test_list_inspect_dlq_retry_cancel_purge_and_stats(tasks_url: str, jobs: object) -> None:
    worker = jobs.app.tasks.worker()  # type: ignore[attr-defined]
    failing = jobs.broken.delay(3)  # type: ignore[attr-defined]
    queued = [jobs.double.delay(i) for i in range(3)]  # type: ignore[attr-defined]
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        with pytest.raises(riverbed.TaskFailed):
            failing.result(timeout=30)
        for handle in queued:
            handle.result(timeout=30)
    finally:
        worker.stop()
        thread.join(30)
    failed = failing.id

    later = jobs.double.options(countdown=600).delay(9)  # type: ignore[attr-defined]
    listed = run(tasks_url, "list", "--state", "succeeded")
    assert listed.exit_code == 0
    assert listed.stdout.count("succeeded") == 3

    dead = run(tasks_url, "dlq", "list")
    assert failed in dead.stdout and "KeyError: " in dead.stdout

    inspected = run(tasks_url, "inspect", failed)
    assert "state: failed" in inspected.stdout
    assert "retries: 0 so far" in inspected.stdout  # broken has no retries: it ran once
    assert "Traceback" in inspected.stdout and "no record 3" in inspected.stdout

    stats = run(tasks_url, "stats")
    assert "dead letters: 1" in stats.stdout

    assert run(tasks_url, "retry", failed).stdout.strip() == f"requeued {failed}"
    assert jobs.broken.handles([failed])[0].status is TaskState.QUEUED  # type: ignore[attr-defined]
    again = run(tasks_url, "retry", failed)
    assert again.exit_code == 1
    assert "cannot be retried: it is queued, not failed" in again.stderr

    assert run(tasks_url, "cancel", later.id).stdout.strip() == f"cancelled {later.id}"
    assert later.status is TaskState.CANCELLED

    purged = run(tasks_url, "purge", "default", "--yes")
    assert purged.stdout.strip() == "purged 1 tasks from default"
    assert run(tasks_url, "dlq", "requeue").exit_code == 1  # neither ids nor --all


def test_errors_are_one_line(tasks_url: str, tmp_path: Path) -> None:
    for args in (("stats",), ("list",), ("dlq", "list"), ("inspect", "nope")):
        typo = run(f"sqlite:///{tmp_path}/typo/tasks.db", *args)
        assert typo.exit_code == 1
        assert typo.stderr.startswith(f"error: no task database at '{tmp_path}/typo/tasks.db'")
    assert not (tmp_path / "typo").exists()  # nothing made at the mistyped path
    connect_broker(tasks_url).close()  # the app's first enqueue or its worker makes it
    missing = run(tasks_url, "inspect", "nope")
    assert missing.exit_code == 1
    assert missing.stderr.startswith("error: no task 'nope'")
    bad_state = run(tasks_url, "list", "--state", "done")
    assert "unknown state 'done'" in bad_state.stderr
    unreachable = run("redis://127.0.0.1:1/0", "stats")
    assert unreachable.exit_code == 1
    assert unreachable.stderr.startswith("error: ")
    assert len(unreachable.stderr.strip().splitlines()) == 1
    no_app = CliRunner().invoke(cli, ["tasks", "worker", "nosuchmodule:app"])
    assert no_app.exit_code == 1
    assert "cannot import module 'nosuchmodule'" in no_app.stderr
    no_queue = run(tasks_url, "worker", "nosuchmodule:app", "--queues", ",")
    assert no_queue.stderr.startswith("error: --queues ',' names no queue")


def test_a_worker_killed_with_sigkill_takes_its_process_pool_with_it(
    tmp_path: Path, tasks_url: str, jobs: object
) -> None:
    worker = start_worker(tmp_path, tasks_url, "--pool", "process", "--concurrency", "2")
    try:
        assert jobs.double.delay(4).result(timeout=60) == 8  # type: ignore[attr-defined]
        # The worker, its forker and two children.
        wait_until(lambda: len(_processes_of(tmp_path)) == 4, 30, "the pool's processes")
    finally:
        worker.kill()
        worker.communicate(timeout=30)
    wait_until(lambda: not _processes_of(tmp_path), 10, "the pool's processes to exit")


def _processes_of(tmp_path: Path) -> list[int]:
    """The processes whose command line names ``tmp_path`` (the worker's and its pool's)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:  # not a process, or one that ended
            continue
        if str(tmp_path).encode() in cmdline and proc.name.isdigit():
            found.append(int(proc.name))
    return found
