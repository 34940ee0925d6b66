"""bench/tasks.py's Huey app: RedisHuey, one no-op task.

``notify_result=True`` makes a waiting ``Result.get(blocking=True)`` wake on a BLPOP instead of
polling with backoff from 50 ms; ``store_none=True`` stores the no-op's ``None`` result (by
default Huey stores no result for ``None``, so there would be nothing to wait for).

The worker: ``huey_consumer huey_tasks.huey ...`` from bench/peers (bench/tasks.py lists the
options). The producer hooks are those bench/peers/tasks_driver.py calls.
"""

from __future__ import annotations

import os
from typing import Any

from huey import RedisHuey

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

huey = RedisHuey("bench", url=URL, notify_result=True, store_none=True)


@huey.task()
def noop() -> None:
    return None


enqueue_many = None  # Huey has no bulk enqueue (``task.map`` enqueues one by one)


def enqueue_one() -> Any:
    return noop()


def wait(handle: Any, timeout: float) -> None:
    handle.get(blocking=True, timeout=timeout)


def task_id(handle: Any) -> str:
    return str(handle.id)


def done_count(ids: list[str]) -> int:
    """Results are fields of one hash; the benchmark's Redis holds only this run's."""
    return int(huey.storage.conn.hlen(huey.storage.result_key))
