"""``riverbed worker module:app``: run an app's pipelines, projections, process managers and
relays in this process, with status lines."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from riverbed.cli.common import err
from riverbed.errors import RiverbedError
from riverbed.eventsourcing.runtime import EventSourcing
from riverbed.eventsourcing.subscriptions import SubscriberStatus
from riverbed.log.errors import BrokerUnavailableError
from riverbed.signals import handling
from riverbed.streams import App
from riverbed.streams.runner import REPORT_INTERVAL_S, Runner
from riverbed.urls import LOG_URL_ENV


def load_app(target: str) -> App:
    """The ``riverbed.App`` named ``module:attribute``, imported from the current directory."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise RiverbedError(f"expected module:attribute, e.g. shop.streams:app, got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if module_name.startswith("."):
        raise RiverbedError(f"{target}: give the module's absolute name, not a relative one")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RiverbedError(f"cannot import module '{module_name}': {error}") from None
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        raise RiverbedError(
            f"{target} is {type(app).__name__ if app is not None else 'missing'}, "
            "not a riverbed.App"
        )
    return app


def worker(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="The app to run, as module:attribute.")],
    processes: Annotated[
        int, typer.Option(min=1, help="Worker processes; they share the partitions.")
    ] = 1,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="Serve Prometheus metrics on this port (worker i of --processes on port + i).",
        ),
    ] = None,
    supervisor: Annotated[
        int | None,
        typer.Option(hidden=True, help="The --processes supervisor's pid: stop when it ends."),
    ] = None,
) -> None:
    """Run the app's pipelines, projections, process managers and relays until SIGTERM or
    Ctrl-C, printing a status line of its pipelines, and one of the others, every second.

    The workers of an app form one consumer group, so the partitions are shared among the
    processes of this command and of any other machine running it. An app created without a URL
    uses the global --url.
    """
    _stop_while_starting()
    if supervisor is not None:
        _stop_with(supervisor)
    if ctx.obj:
        os.environ[LOG_URL_ENV] = ctx.obj
    if processes > 1:
        raise typer.Exit(_run_processes(target, processes, metrics_port))
    with _stopped_at_once():
        app = load_app(target)
    started = time.monotonic()

    def report(runner: Runner) -> None:
        elapsed = max(time.monotonic() - started, 1e-9)
        err.print(
            f"riverbed worker {app.name}: {runner.processed:,} records processed "
            f"({runner.processed / elapsed:,.0f}/s), {runner.dead_lettered:,} dead-lettered, "
            f"{runner.late:,} late",
        )

    with app, _reporting_events(app):
        app.run(report=report, metrics_port=metrics_port)


@contextmanager
def _reporting_events(app: App) -> Iterator[None]:
    """While the app runs, a status line of its projections, process managers and relays
    every second, beside the pipelines' own."""
    events = getattr(app, "events", None)
    if not isinstance(events, EventSourcing) or not events.has_work():
        yield
        return
    done = threading.Event()

    def report() -> None:
        while not done.wait(REPORT_INTERVAL_S):
            try:
                statuses = events.statuses()
            except BrokerUnavailableError:
                continue  # the runners say so, and wait it out
            err.print(f"riverbed worker {app.name}: {_progress(statuses)}", markup=False)

    reporter = threading.Thread(target=report, name="riverbed-events-status", daemon=True)
    reporter.start()
    try:
        yield
    finally:
        done.set()
        reporter.join()


def _progress(statuses: list[SubscriberStatus]) -> str:
    """Each one's checkpoint, lag, and parked events if any; where it stopped, if it did."""
    parts = []
    for status in statuses:
        parked = f", {status.parked:,} parked" if status.parked else ""
        stopped = (
            f", STOPPED at {status.stopped_where()}: see riverbed projections list"
            if status.stopped_at is not None
            else ""
        )
        parts.append(
            f"{status.name} at {status.checkpoint:,} (lag {status.lag:,}{parked}{stopped})"
        )
    return ", ".join(parts)


def _stop_while_starting() -> None:
    """Until the app runs (``App.run`` then finishes its batch on a stop signal), SIGTERM and
    SIGINT end this worker at once, with status 0: however long importing the app or reaching
    the log takes, and even where SIGINT was ignored (``&``) or the signals blocked
    (``--processes`` starts its workers so). Programs it starts inherit them unblocked."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(0)

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextmanager
def _stopped_at_once() -> Iterator[None]:
    """While the app's module imports, SIGTERM and SIGINT end this worker on the spot, with
    status 0 and no exception: raised inside an extension's setup, one can crash the
    interpreter (msgspec's, as a module's classes build their decoders). What the module may
    have opened meanwhile (an event store) rolls back whatever it had begun."""
    with handling(STOP_SIGNALS, _exit_stopped):
        yield


def _exit_stopped(signum: int, frame: object) -> None:
    os._exit(0)


def _stop_with(supervisor: int) -> None:
    """Stop this worker as SIGTERM does once its supervisor has ended, killed without a chance
    to pass a signal on (SIGKILL, the OOM killer): an orphan would go on beside the workers a
    restarted supervisor starts."""

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(CHILD_POLL_S)
        err.print(f"riverbed worker: its supervisor (process {supervisor}) ended; stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="riverbed-supervisor-watch", daemon=True).start()


def _run_processes(target: str, processes: int, metrics_port: int | None) -> int:
    """Run ``processes`` single-process workers and pass SIGTERM and SIGINT on to them. One
    that ends on its own (crashed, killed) stops the others, as a supervisor would restart them
    all; the exit status is that one's (128 + N for a signal N)."""
    if metrics_port is not None and metrics_port + processes - 1 > MAX_PORT:
        raise RiverbedError(
            f"--metrics-port {metrics_port} with --processes {processes} needs ports "
            f"{metrics_port}-{metrics_port + processes - 1}, past {MAX_PORT}; give a lower port"
        )
    app = load_app(target)  # fail here, once, if the target is wrong
    app.check_runnable()
    _check_event_store(app)
    command = [sys.executable, "-m", "riverbed.cli.main", "worker", target,
               "--supervisor", str(os.getpid())]  # fmt: skip
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    with handling(STOP_SIGNALS, forward):
        # The children start with the stop signals blocked (a mask survives exec) until their
        # handlers are in place (_stop_while_starting): one forwarded sooner waits for them
        # instead of killing them (SIGTERM) or being lost (SIGINT, which `&` leaves ignored).
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for i in range(processes):
                metrics = [] if metrics_port is None else ["--metrics-port", str(metrics_port + i)]
                children.append(subprocess.Popen([*command, *metrics]))
        except BaseException:
            forward(signal.SIGTERM, None)  # the ones started do not outlive this one
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)  # one meanwhile: forwarded
        # The first to fail: the others may end later, by the SIGTERM it makes this pass on.
        first_failed: subprocess.Popen[bytes] | None = None
        while [child for child in children if child.poll() is None]:  # polls every one
            ended = next((c for c in children if c.returncode not in (None, 0)), None)
            if ended is not None and first_failed is None:
                first_failed = ended
                if not stopping:
                    err.print(
                        f"worker process {ended.pid} ended with {_status(ended.returncode)}; "
                        "stopping the others"
                    )
                    forward(signal.SIGTERM, None)
            time.sleep(CHILD_POLL_S)
    if first_failed is not None:
        return _exit_status(first_failed.returncode)
    codes = [_exit_status(child.returncode) for child in children]
    return next((code for code in codes if code), 0)


def _check_event_store(app: App) -> None:
    """An event store that cannot work (a URL of no database) or runs another app's
    projections of the same names fails here, once, not in each process; an outage is left to
    the processes, which wait it out."""
    events = getattr(app, "events", None)
    if not isinstance(events, EventSourcing) or not events.has_work():
        return
    try:
        events.claim_runners()
    except BrokerUnavailableError:
        pass
    finally:
        events.close()


CHILD_POLL_S = 0.1
MAX_PORT = 65_535
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _exit_status(returncode: int) -> int:
    """A child's return code as a shell reports it: 128 + N when signal N ended it."""
    return 128 - returncode if returncode < 0 else returncode


def _status(returncode: int) -> str:
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        return f"signal {signal.Signals(-returncode).name}"
    except ValueError:  # a real-time signal has no name
        return f"signal {-returncode}"
