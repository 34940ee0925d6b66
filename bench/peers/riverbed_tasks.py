"""bench/tasks.py's riverbed app: one no-op task on the broker at ``$RIVERBED_TASKS_URL``.

The worker: ``riverbed tasks worker riverbed_tasks:app ...`` from bench/peers (bench/tasks.py
lists the options); it imports this module from the working directory like the peers' workers
import theirs, which is why it lives here. The producer hooks are those
bench/peers/tasks_driver.py calls, with riverbed's venv.
"""

from __future__ import annotations

from typing import Any

import riverbed
from riverbed.tasks import TaskHandle, TaskState

app = riverbed.App("bench-tasks")  # tasks_url: $RIVERBED_TASKS_URL, set by bench/tasks.py
INFO_CHUNK = 1_000  # ids per broker.info call when checking the outcome


@app.task
def noop() -> None:
    return None


def enqueue_one() -> TaskHandle[None]:
    return noop.delay()


def enqueue_many(count: int) -> list[TaskHandle[None]]:
    """``delay_many``: one broker round trip for the whole chunk."""
    return noop.delay_many([((), {})] * count)


def wait(handle: TaskHandle[None], timeout: float) -> None:
    handle.result(timeout=timeout)


def task_id(handle: Any) -> str:
    return str(handle.id)


def done_count(ids: list[str]) -> int:
    """Finished tasks, from the broker's counters (queued, scheduled and running per queue): a
    few reads whatever the number of tasks, so polling does not slow the workers down. The
    store holds only this run's tasks; ``verify`` then checks that each one succeeded."""
    stats = app.tasks.broker.stats()
    unfinished = sum(q.queued + q.scheduled + q.running for q in stats.queues.values())
    return len(ids) - unfinished


def verify(ids: list[str]) -> str | None:
    """Why not every task of ``ids`` succeeded, or None."""
    broker = app.tasks.broker
    for start in range(0, len(ids), INFO_CHUNK):
        chunk = ids[start : start + INFO_CHUNK]
        infos = broker.info(chunk)
        for task_id in chunk:
            info = infos.get(task_id)
            if info is None or info.state != TaskState.SUCCEEDED:
                state = "unknown" if info is None else info.state.value
                return f"task {task_id} is {state}, not succeeded"
    return None


def close() -> None:
    app.close()
