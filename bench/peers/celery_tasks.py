"""bench/tasks.py's Celery app: Redis broker and Redis result backend, one no-op task.

The worker: ``celery -A celery_tasks worker ...`` from bench/peers (bench/tasks.py lists the
options). The producer hooks are those bench/peers/tasks_driver.py calls.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("celery_tasks", broker=URL, backend=URL)
app.conf.update(
    # "Lots of short tasks": a large prefetch multiplier (Celery's optimizing guide).
    worker_prefetch_multiplier=int(os.environ.get("BENCH_CELERY_PREFETCH", "128")),
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
)


@app.task
def noop() -> None:
    return None


enqueue_many = None  # Celery has no bulk enqueue (a group sends its tasks one by one)


def enqueue_one() -> Any:
    return noop.delay()


def wait(handle: Any, timeout: float) -> None:
    handle.get(timeout=timeout)


def task_id(handle: Any) -> str:
    return str(handle.id)


def result_key(task_id: str) -> str:
    return f"celery-task-meta-{task_id}"
