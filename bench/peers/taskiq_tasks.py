"""bench/tasks.py's Taskiq app: taskiq-redis RedisStreamBroker with a Redis result backend.

The worker: ``taskiq worker taskiq_tasks:broker ...`` from bench/peers (bench/tasks.py lists
the options). The producer hooks are those bench/peers/tasks_driver.py calls.
"""

from __future__ import annotations

import os
from typing import Any

from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
ASYNC = True
RESULT_POLL = 0.001  # s between the producer's result polls (wait_result's default: 0.2)
RESULT_PREFIX = "taskiq-result"

broker = RedisStreamBroker(url=URL).with_result_backend(
    RedisAsyncResultBackend(redis_url=URL, prefix_str=RESULT_PREFIX)
)


@broker.task
async def noop() -> None:
    return None


enqueue_many = None  # Taskiq has no bulk enqueue


async def setup() -> None:
    await broker.startup()  # declares the stream's consumer group before the first task


async def close() -> None:
    await broker.shutdown()


async def enqueue_one() -> Any:
    return await noop.kiq()


async def wait(handle: Any, timeout: float) -> None:
    result = await handle.wait_result(check_interval=RESULT_POLL, timeout=timeout)
    if result.is_err:
        raise RuntimeError(f"task {handle.task_id} failed: {result.error}")


def task_id(handle: Any) -> str:
    return str(handle.task_id)


def result_key(task_id: str) -> str:
    return f"{RESULT_PREFIX}:{task_id}"
