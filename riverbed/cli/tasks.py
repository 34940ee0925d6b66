"""``riverbed tasks``: run task workers and look after the broker: list, inspect, retry, the
dead-letter queue, purge, stats."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table

from riverbed.cli.common import err, out
from riverbed.cli.worker import load_app
from riverbed.errors import RiverbedError
from riverbed.tasks.brokers import DEFAULT_TASKS_URL, TASKS_URL_ENV, Broker, connect_broker
from riverbed.tasks.messages import TaskInfo, TaskState
from riverbed.tasks.registry import Tasks
from riverbed.tasks.worker.worker import POOLS, Pool, Worker
from riverbed.urls import LOG_URL_ENV

app = typer.Typer(
    help="Run task workers; inspect, retry and purge tasks; the dead-letter queue.",
    no_args_is_help=True,
)
dlq = typer.Typer(help="The dead-letter queue: tasks that failed for good.", no_args_is_help=True)
app.add_typer(dlq, name="dlq")

STATUS_EVERY_S = 1.0


@app.callback()
def tasks_root(
    ctx: typer.Context,
    tasks_url: Annotated[
        str | None,
        typer.Option(
            envvar=TASKS_URL_ENV,
            help=f"Task broker: sqlite:///path.db or redis://host:6379/0 "
            f"(default: {DEFAULT_TASKS_URL}).",
        ),
    ] = None,
) -> None:
    ctx.obj = tasks_url


@contextmanager
def open_broker(ctx: typer.Context) -> Iterator[Broker]:
    # Never made here: a mistyped path would show an empty queue and leave a file behind.
    broker = connect_broker(ctx.obj, create=False)
    try:
        yield broker
    finally:
        broker.close()


@app.command("worker")
def worker(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="The app whose tasks to run, as module:attribute.")],
    concurrency: Annotated[
        int | None,
        typer.Option(
            min=1, help="Tasks run at once (default: 4 per CPU; process pool: 1 per CPU)."
        ),
    ] = None,
    pool: Annotated[str, typer.Option(help=f"Where tasks run: {', '.join(POOLS)}.")] = "thread",
    queues: Annotated[
        str | None, typer.Option(help="Comma-separated queues to serve (default: the app's).")
    ] = None,
    prefetch: Annotated[
        int | None,
        typer.Option(min=0, help="Tasks leased ahead of free slots (default: concurrency)."),
    ] = None,
    lease: Annotated[
        float, typer.Option(min=0.3, help="Lease seconds; a dead worker's tasks rerun after it.")
    ] = 30.0,
    shutdown_timeout: Annotated[
        float, typer.Option(min=0, help="On SIGTERM, seconds running tasks get to finish.")
    ] = 30.0,
    metrics_port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Serve Prometheus metrics on this port.")
    ] = None,
) -> None:
    """Run the app's tasks until SIGTERM or Ctrl-C, printing a status line every second."""
    if pool not in POOLS:
        raise RiverbedError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
    if ctx.obj:
        os.environ[TASKS_URL_ENV] = ctx.obj
    log_url = ctx.find_root().obj
    if log_url:  # as `riverbed worker` does: an app created without a URL uses the global --url
        os.environ[LOG_URL_ENV] = log_url
    served = [q.strip() for q in queues.split(",") if q.strip()] if queues is not None else None
    if served == []:
        raise RiverbedError(f"--queues {queues!r} names no queue; give e.g. --queues default,mail")
    tasks = _tasks_of(target)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    chosen: Pool = pool
    runner = tasks.worker(
        concurrency=concurrency,
        pool=chosen,
        queues=served,
        lease=lease,
        shutdown_timeout=shutdown_timeout,
        prefetch=prefetch,
    )
    if metrics_port is not None:
        from riverbed.tasks.worker.metrics import WorkerMetrics

        runner.metrics = WorkerMetrics(tasks.app_name, runner.inflight.held)
        runner.metrics.serve(metrics_port)
    started = time.monotonic()
    threading.Thread(target=_status_line, args=(runner, started), daemon=True).start()
    try:
        runner.run()
    finally:
        tasks.close()
    _print_status(runner, started)


def _tasks_of(target: str) -> Tasks:
    loaded = load_app(target)
    tasks = getattr(loaded, "tasks", None)
    if not isinstance(tasks, Tasks):
        raise RiverbedError(f"{target} has no tasks: create it with riverbed.App(...)")
    return tasks


def _status_line(runner: Worker, started: float) -> None:
    shown = ""
    while True:
        time.sleep(STATUS_EVERY_S)
        shown = _print_status(runner, started, shown)


def _print_status(runner: Worker, started: float, shown: str = "") -> str:
    """Print the worker's counts if they changed since ``shown``; return what was printed."""
    counts = runner.inflight.counts
    line = (
        f"{counts.succeeded:,} succeeded, {counts.failed:,} failed, {counts.retried:,} "
        f"retried, {counts.cancelled:,} cancelled, {runner.inflight.held()} held"
    )
    if line != shown:
        rate = counts.succeeded / max(time.monotonic() - started, 1e-9)
        err.print(f"riverbed tasks worker {runner.tasks.app_name}: {line} ({rate:,.0f}/s)")
    return line


def _when(ms: int) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _print_tasks(infos: list[TaskInfo]) -> None:
    """One line per task, so the ids stay whole and ``grep`` works."""
    for info in infos:
        message = info.message
        error = f"  {info.error.type}: {info.error.message}" if info.error else ""
        out.print(
            f"{message.id}  {info.state:<9}  {message.name}  queue={message.queue} "
            f"priority={message.priority} attempt={message.attempt} "
            f"enqueued={_when(message.enqueued_ms)}{error}"
        )
    if not infos:
        out.print("no tasks")


@app.command("list")
def list_tasks(
    ctx: typer.Context,
    state: Annotated[
        str | None,
        typer.Option(help=f"Only this state: {', '.join(s.value for s in TaskState)}."),
    ] = None,
    queue: Annotated[str | None, typer.Option(help="Only this queue.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, oldest first.")] = 100,
) -> None:
    """List tasks the broker holds."""
    chosen = _state(state) if state else None
    with open_broker(ctx) as broker:
        _print_tasks(broker.list_tasks(chosen, queue, limit))


def _state(name: str) -> TaskState:
    try:
        return TaskState(name)
    except ValueError:
        known = ", ".join(s.value for s in TaskState)
        raise RiverbedError(f"unknown state {name!r}; choose one of {known}") from None


@app.command("inspect")
def inspect_task(ctx: typer.Context, task_id: Annotated[str, typer.Argument()]) -> None:
    """Everything the broker knows of one task, with its error's traceback."""
    with open_broker(ctx) as broker:
        info = broker.info([task_id]).get(task_id)
    if info is None:
        raise RiverbedError(f"no task {task_id!r}: unknown id, or its result expired")
    message = info.message
    rows = {
        "id": message.id,
        "task": message.name,
        "state": str(info.state) + (" (cancel requested)" if info.cancel_requested else ""),
        "queue": message.queue,
        "priority": str(message.priority),
        "retries": f"{message.attempt} so far",  # Celery's request.retries: runs less one
        "enqueued": _when(message.enqueued_ms),
        "eta": _when(message.eta_ms),
        "expires": _when(message.expires_ms),
        "worker": info.worker or "-",
        "started": _when(info.started_ms),
        "finished": _when(info.finished_ms),
        "key": message.key or "-",
    }
    for name, value in rows.items():
        out.print(f"{name:>9}: {value}")
    if info.error is not None:
        out.print(f"    error: {info.error.type}: {info.error.message}")
        if info.error.traceback:
            out.print(info.error.traceback.rstrip())


@app.command("retry")
def retry(ctx: typer.Context, task_id: Annotated[str, typer.Argument()]) -> None:
    """Run a failed (dead-lettered) task again, its attempts reset."""
    with open_broker(ctx) as broker:
        if not broker.requeue([task_id]):
            info = broker.info([task_id]).get(task_id)
            where = "unknown or expired" if info is None else f"{info.state}, not failed"
            raise RiverbedError(f"task {task_id} cannot be retried: it is {where}")
    out.print(f"requeued {task_id}")


@app.command("cancel")
def cancel(ctx: typer.Context, task_id: Annotated[str, typer.Argument()]) -> None:
    """Cancel a queued or scheduled task, or interrupt a running one."""
    with open_broker(ctx) as broker:
        state = broker.cancel(task_id)
    if state is None:
        raise RiverbedError(f"no task {task_id!r}: unknown id, or its result expired")
    if state is TaskState.RUNNING:
        out.print(f"asked the worker running {task_id} to interrupt it")
    elif state is TaskState.CANCELLED:
        out.print(f"cancelled {task_id}")
    else:
        raise RiverbedError(f"task {task_id} already finished: {state}")


@app.command("purge")
def purge(
    ctx: typer.Context,
    queue: Annotated[str, typer.Argument(help="The queue to empty.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a queue's queued and scheduled tasks (running ones finish)."""
    if not yes:
        typer.confirm(f"Delete every queued and scheduled task of queue {queue!r}?", abort=True)
    with open_broker(ctx) as broker:
        removed = broker.purge(queue)
    out.print(f"purged {removed} tasks from {queue}")


@app.command("stats")
def stats(ctx: typer.Context) -> None:
    """Tasks per queue and state, dead letters, live workers."""
    with open_broker(ctx) as broker:
        figures = broker.stats()
    table = Table("queue", "queued", "scheduled", "running")
    for name, queue in figures.queues.items():
        table.add_row(name, f"{queue.queued:,}", f"{queue.scheduled:,}", f"{queue.running:,}")
    out.print(table)
    out.print(f"dead letters: {figures.dead:,}")
    out.print(f"workers: {', '.join(figures.workers) or 'none'}")


@dlq.command("list")
def dlq_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, oldest first.")] = 100,
) -> None:
    """Failed tasks with their last error (``riverbed tasks inspect ID`` shows the traceback)."""
    with open_broker(ctx) as broker:
        _print_tasks(broker.dead(limit))


@dlq.command("requeue")
def dlq_requeue(
    ctx: typer.Context,
    task_ids: Annotated[list[str] | None, typer.Argument(help="Tasks to requeue.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Requeue every dead letter.")] = False,
) -> None:
    """Send dead-lettered tasks back to their queues, attempts reset."""
    if bool(task_ids) == all_:
        raise RiverbedError("name the task ids to requeue, or pass --all")
    with open_broker(ctx) as broker:
        requeued = broker.requeue(None if all_ else task_ids)
    missing = sorted(set(task_ids or ()) - set(requeued))
    out.print(f"requeued {len(requeued)} tasks")
    if missing:
        raise RiverbedError(f"not in the dead-letter queue: {', '.join(missing)}")
