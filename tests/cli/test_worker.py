"""``riverbed worker module:app``: runs the app's pipelines until SIGTERM, with a status line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import riverbed
from riverbed.cli.worker import _progress
from riverbed.eventsourcing.claims import claim
from riverbed.eventsourcing.subscriptions import SubscriberStatus
from tests.services import free_port
from tests.services.postgres import PostgresServer
from tests.support import wait_until

RIVERBED = str(Path(sys.executable).with_name("riverbed"))

APP_MODULE = textwrap.dedent(
    """
    import riverbed

    app = riverbed.App("words")
    lines = app.topic("lines", value=str)
    words = app.topic("words", value=str)
    app.stream(lines).flat_map(str.split).to(words)
    """
)


def start_worker(tmp_path: Path, *args: str, module: str = APP_MODULE) -> subprocess.Popen[str]:
    """``riverbed worker`` on a SQLite log in ``tmp_path``, with the app module written there."""
    (tmp_path / "wordapp.py").write_text(module)
    return subprocess.Popen(
        [RIVERBED, "--url", f"sqlite:///{tmp_path}/log.db", "worker", *args],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )


@contextmanager
def sigterm_after(
    worker: subprocess.Popen[str], signum: signal.Signals = signal.SIGTERM
) -> Iterator[list[str]]:
    """Run the block, then SIGTERM (or ``signum``) the worker and wait for it to exit 0 (it is
    killed if the block fails); the list holds its stderr afterwards."""
    stderr: list[str] = []
    try:
        yield stderr
        worker.send_signal(signum)
        stderr.append(worker.communicate(timeout=30)[1])
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, stderr


def test_worker_runs_until_sigterm(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/log.db"
    worker = start_worker(tmp_path, "wordapp:app")
    with sigterm_after(worker) as output, riverbed.connect(url) as log:
        wait_until(
            lambda: {"lines", "words"} <= {t.name for t in log.list_topics()}, 30, "app start"
        )
        with log.producer() as producer:
            producer.send_many("lines", [(None, b"the quick brown fox")] * 50)
        wait_until(lambda: log.end_offsets("words")[0] == 200, 30, "the words")
        time.sleep(1.2)  # one status line
    (stderr,) = output
    assert "riverbed worker words: 50 records processed" in stderr


EVENTS_MODULE = textwrap.dedent(
    """
    import riverbed

    app = riverbed.App("stock", events_url=EVENTS_URL)


    class Item(riverbed.Aggregate):
        @riverbed.event("Received")
        def __init__(self, sku: str, count: int) -> None:
            self.sku = sku
            self.count = count


    class StockLevels(riverbed.Projection):
        name = "stock-levels"

        def handle(self, event: riverbed.Envelope, tx: riverbed.eventsourcing.ReadModel) -> None:
            if event.event.count <= 0:
                raise ValueError("a count > 0, please")
            tx.put("skus", event.event.sku, {"count": event.event.count})


    app.events.projection(StockLevels())
    app.events.relay("items")
    """
)


def test_an_event_sourcing_worker_prints_and_serves_where_its_runners_stand(
    tmp_path: Path,
) -> None:
    module = EVENTS_MODULE.replace("EVENTS_URL", repr(f"sqlite:///{tmp_path}/events.db"))
    port = free_port()
    worker = start_worker(tmp_path, "wordapp:app", "--metrics-port", str(port), module=module)
    with sigterm_after(worker) as output:
        wait_until((tmp_path / "events.db").exists, 30, "the worker to start")
        sys.path.insert(0, str(tmp_path))
        try:
            import wordapp  # type: ignore[import-not-found]
        finally:
            sys.path.remove(str(tmp_path))
            sys.modules.pop("wordapp", None)
        with wordapp.app:
            wordapp.app.events.save(wordapp.Item("sku-1", 5), wordapp.Item("sku-2", 0))
            status = wordapp.app.events.projections.status
            wait_until(lambda: status("stock-levels").checkpoint == 2, 30, "the projection")
        wait_until(lambda: 'riverbed_subscriber_lag{name="relay:items"} 0.0' in scrape(port),
                   30, "the relay's metrics")  # fmt: skip
        metrics = scrape(port)
        assert 'riverbed_subscriber_checkpoint{name="stock-levels"} 2.0' in metrics
        assert 'riverbed_subscriber_parked{name="stock-levels"} 1.0' in metrics
        assert 'riverbed_subscriber_stopped{name="stock-levels"} 0.0' in metrics
        time.sleep(1.2)  # one status line after it
    (stderr,) = output
    expected = (
        "riverbed worker stock: stock-levels at 2 (lag 0, 1 parked), relay:items at 2 (lag 0)"
    )
    assert expected in stderr.splitlines()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no-colon", "expected module:attribute"),
        ("missing_module_xyz:app", "cannot import module 'missing_module_xyz'"),
        ("wordapp:nothing", "wordapp:nothing is missing, not a riverbed.App"),
        ("wordapp:riverbed", "wordapp:riverbed is module, not a riverbed.App"),
    ],
)
def test_worker_target_errors(tmp_path: Path, target: str, message: str) -> None:
    (tmp_path / "wordapp.py").write_text(APP_MODULE)
    result = subprocess.run(
        [RIVERBED, "--url", f"sqlite:///{tmp_path}/log.db", "worker", target],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"error: {message}")


def test_an_event_store_that_cannot_work_is_one_error_for_all_processes(tmp_path: Path) -> None:
    (tmp_path / "events.db").write_text("not a database")
    line = _error_of_two_processes(tmp_path, f"sqlite:///{tmp_path}/events.db")
    assert line.startswith(f"error: cannot open the event store '{tmp_path}/events.db'")


@pytest.mark.parametrize("claimed", ["projection stock-levels", "relay to items"])
def test_names_another_app_runs_are_one_error_for_all_processes(
    tmp_path: Path, claimed: str
) -> None:
    url = f"sqlite:///{tmp_path}/events.db"
    other = riverbed.eventsourcing.EventSourcing("billing", url)
    claim(other.store, "billing", [claimed])
    other.close()
    line = _error_of_two_processes(tmp_path, url)
    assert line.startswith(f"error: app 'billing' runs the {claimed} in this event store")


def test_a_store_the_server_refuses_for_good_is_one_error_not_an_outage(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    url = f"postgresql://riverbed@127.0.0.1:{postgres_server.port}/no_such_db"
    line = _error_of_two_processes(tmp_path, url)
    assert line.startswith("error: the PostgreSQL server refused the event store's URL")


def _error_of_two_processes(tmp_path: Path, events_url: str) -> str:
    """What ``worker --processes 2`` of EVENTS_MODULE on ``events_url`` printed: one line."""
    (tmp_path / "wordapp.py").write_text(EVENTS_MODULE.replace("EVENTS_URL", repr(events_url)))
    result = subprocess.run(
        [RIVERBED, "--url", f"sqlite:///{tmp_path}/log.db", "worker", "wordapp:app",
         "--processes", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()  # once, not once per process
    return line


def test_worker_processes_share_the_partitions(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/log.db"
    two_partitions = APP_MODULE.replace("value=str)", "value=str, partitions=2)")
    parent = start_worker(tmp_path, "wordapp:app", "--processes", "2", module=two_partitions)
    with sigterm_after(parent), riverbed.connect(url) as log:
        wait_until(
            lambda: "words" in log.list_groups() and len(log.describe_group("words").members) == 2,
            60,
            "two workers in the group",
        )
        assert all(len(m.assignment) == 1 for m in log.describe_group("words").members)
        with log.producer() as producer:
            producer.send_many("lines", [(None, b"a b")] * 100)
        wait_until(lambda: sum(log.end_offsets("words").values()) == 200, 30, "the words")


def test_the_status_line_says_that_a_runner_stopped() -> None:
    stopped = SubscriberStatus("strict", 1, 2, 4, 2, 0, 3, "ValueError: bad")
    at_a_timer = SubscriberStatus("manager", None, 4, 4, 0, 0, -14_995_520, "ValueError: bad")
    assert _progress([stopped, at_a_timer]) == (
        "strict at 2 (lag 2, STOPPED at position 3: see riverbed projections list), "
        "manager at 4 (lag 0, STOPPED at a timer: see riverbed projections list)"
    )


def scrape(port: int) -> str:
    """What the worker's metrics endpoint serves, "" while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text: str = reply.read().decode()
            return text
    except OSError:
        return ""


def test_worker_serves_prometheus_metrics(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/log.db"
    port = free_port()
    worker = start_worker(tmp_path, "wordapp:app", "--metrics-port", str(port))

    with sigterm_after(worker):
        with riverbed.connect(url) as log:
            wait_until(lambda: "riverbed_app" in scrape(port), 30, "the metrics endpoint")
            with log.producer() as producer:
                producer.send_many("lines", [(None, b"one two")] * 10)
                producer.send("lines", None, key=b"tombstone")  # not a str: dead-lettered
            wait_until(
                lambda: 'riverbed_records_in_total{topic="lines"} 11.0' in scrape(port),
                30,
                "counts",
            )
        metrics = scrape(port)
        assert 'riverbed_records_out_total{topic="words"} 20.0' in metrics
        assert 'riverbed_dead_lettered_total{topic="lines"} 1.0' in metrics
        assert "riverbed_batch_seconds_count" in metrics
        wait_until(
            lambda: 'riverbed_lag{partition="0",topic="lines"} 0.0' in scrape(port), 30, "lag"
        )


def test_a_worker_process_that_dies_stops_the_others_and_the_status_says_why(
    tmp_path: Path,
) -> None:
    parent = start_worker(tmp_path, "wordapp:app", "--processes", "2")
    children_file = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
    try:
        wait_until(lambda: len(children_file.read_text().split()) == 2, 60, "two workers")
        victim = int(children_file.read_text().split()[-1])  # not the first: each one counts
        os.kill(victim, signal.SIGKILL)
        _, stderr = parent.communicate(timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert parent.returncode == 128 + signal.SIGKILL
    assert f"worker process {victim} ended with signal SIGKILL; stopping the others" in stderr


def test_worker_processes_stop_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    parent = start_worker(tmp_path, "wordapp:app", "--processes", "2")
    children_file = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
    children: list[str] = []
    try:
        wait_until(lambda: len(children_file.read_text().split()) == 2, 60, "two workers")
        children = children_file.read_text().split()
        # Running, not starting (a status line a second each): they stop as at SIGTERM.
        assert parent.stderr is not None
        status_lines = 0
        while status_lines < 4:
            status_lines += "records processed" in parent.stderr.readline()
        os.kill(parent.pid, signal.SIGKILL)
        # The workers share its stderr: it ends when both have closed it, as they exit.
        _, stderr = parent.communicate(timeout=60)
        left = _running_after(children, EXITING_S)
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in children:  # left running (the bug): not beside the other tests
            if _alive(pid):
                os.kill(int(pid), signal.SIGKILL)
    assert stderr.count(f"its supervisor (process {parent.pid}) ended; stopping") == 2
    assert "Traceback" not in stderr
    assert not left


# A process closes its files before it has finished exiting: how long it may take the rest.
EXITING_S = 10.0


def _running_after(pids: list[str], seconds: float) -> list[str]:
    """Those of ``pids`` still running after at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while (running := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return running


def _alive(pid: str) -> bool:
    """Whether a process runs (not gone, and not a zombie its new parent has yet to reap)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_the_worker_processes_start_stops_them_cleanly(
    tmp_path: Path, signum: signal.Signals
) -> None:
    # Started as `riverbed worker ... &` from a script: SIGINT ignored, as a shell leaves it.
    ignoring = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the child inherits it
    try:
        parent = start_worker(tmp_path, "wordapp:app", "--processes", "2")
    finally:
        signal.signal(signal.SIGINT, ignoring)
    children_file = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
    with sigterm_after(parent, signum) as stderr:
        # The children exist but are still starting Python: they listen for no signal yet.
        wait_until(lambda: len(children_file.read_text().split()) == 2, 60, "two workers")
    assert "ended with" not in stderr[0]


SLOW_TO_IMPORT = APP_MODULE.replace(
    "import riverbed\n",
    "import riverbed\nimport pathlib, sys, time\n"
    "while '--processes' not in sys.argv and not pathlib.Path('ready').exists():\n"
    "    time.sleep(0.05)  # the workers wait on something that does not come\n",
)


def test_workers_stuck_importing_their_app_stop_at_a_signal_and_block_none(
    tmp_path: Path,
) -> None:
    parent = start_worker(tmp_path, "wordapp:app", "--processes", "2", module=SLOW_TO_IMPORT)
    children_file = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")

    def blocked_signals(pid: str) -> str:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        return next(line.split()[1] for line in lines if line.startswith("SigBlk"))

    with sigterm_after(parent):
        wait_until(lambda: len(children_file.read_text().split()) == 2, 60, "two workers")
        children = children_file.read_text().split()
        # Importing the app: the stop signals unblocked, so programs they start get them too.
        wait_until(lambda: all(int(blocked_signals(c), 16) == 0 for c in children), 30, "unblocked")


STOPPED_AS_IT_IMPORTS = APP_MODULE.replace(
    "import riverbed\n",
    "import riverbed\nimport os, signal, sys, time\n"
    "try:\n"
    "    os.kill(os.getpid(), signal.SIGTERM)\n"
    "    time.sleep(10)\n"
    "except BaseException as stop:\n"
    "    print('raised into the import:', repr(stop), file=sys.stderr)\n"
    "    raise\n",
)


def test_a_stop_signal_while_the_app_imports_raises_nothing_into_it(tmp_path: Path) -> None:
    """The worker ends at once, with status 0: an exception raised into the import could land
    inside an extension's setup, which crashed the interpreter (msgspec's)."""
    worker = start_worker(tmp_path, "wordapp:app", module=STOPPED_AS_IT_IMPORTS)
    started = time.monotonic()
    _, stderr = worker.communicate(timeout=30)
    assert (worker.returncode, stderr) == (0, "")
    assert time.monotonic() - started < 10


def test_a_worker_process_ended_by_a_signal_without_a_name_is_described() -> None:
    from riverbed.cli.worker import _exit_status, _status

    assert (_status(-35), _exit_status(-35)) == ("signal 35", 163)
    assert (_status(-9), _exit_status(-9)) == ("signal SIGKILL", 137)


@pytest.mark.parametrize(
    ("module", "args", "message"),
    [
        (
            APP_MODULE.replace("app.stream(lines).flat_map(str.split).to(words)", ""),
            (),
            "error: app 'words' has no pipeline or handler to run",
        ),
        (APP_MODULE, ("--metrics-port", "65535"), "needs ports 65535-65536, past 65535"),
    ],
)
def test_what_no_worker_process_could_run_is_one_error_before_any_starts(
    tmp_path: Path, module: str, args: tuple[str, ...], message: str
) -> None:
    (tmp_path / "wordapp.py").write_text(module)
    result = subprocess.run(
        [RIVERBED, "--url", f"sqlite:///{tmp_path}/log.db", "worker", "wordapp:app",
         "--processes", "2", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()  # once, not once per process
    assert message in line
