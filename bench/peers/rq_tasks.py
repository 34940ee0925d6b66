"""bench/tasks.py's RQ app: one queue on Redis, one no-op job function.

The worker: ``rq worker-pool ... default`` from bench/peers (bench/tasks.py lists the options).
The producer hooks are those bench/peers/tasks_driver.py calls.
"""

from __future__ import annotations

import os
from typing import Any

from redis import Redis
from rq import Queue
from rq.job import Job
from rq.results import Result

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

connection = Redis.from_url(URL)
queue = Queue("default", connection=connection)


def noop() -> None:
    return None


def enqueue_one() -> Job:
    return queue.enqueue(noop)


def enqueue_many(count: int) -> list[Job]:
    """``Queue.enqueue_many``: the jobs go to Redis in one pipeline."""
    return queue.enqueue_many([Queue.prepare_data(noop) for _ in range(count)])


def wait(handle: Job, timeout: float) -> None:
    result = handle.latest_result(timeout=max(int(timeout), 1))
    if result is None or result.type != Result.Type.SUCCESSFUL:
        raise RuntimeError(f"job {handle.id}: no successful result within {timeout:g} s")


def task_id(handle: Any) -> str:
    return str(handle.id)


def result_key(task_id: str) -> str:
    return str(Result.get_key(task_id))
