"""bench/tasks.py's Dramatiq app: Redis broker with the Results middleware (Redis backend).

The worker: ``dramatiq dramatiq_tasks ...`` from bench/peers (bench/tasks.py lists the options).
The producer hooks are those bench/peers/tasks_driver.py calls.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

backend = RedisBackend(url=URL)
broker = RedisBroker(url=URL)
broker.add_middleware(Results(backend=backend))
dramatiq.set_broker(broker)


@dramatiq.actor(store_results=True, max_retries=0)
def noop() -> None:
    return None


enqueue_many = None  # Dramatiq has no bulk enqueue (a group sends its messages one by one)


def enqueue_one() -> Any:
    return noop.send()


def wait(handle: Any, timeout: float) -> None:
    handle.get_result(backend=backend, block=True, timeout=int(timeout * 1000))


def task_id(handle: Any) -> str:
    return str(handle.message_id)


def result_key(task_id: str) -> str:
    message = dramatiq.Message(
        queue_name="default", actor_name="noop", args=(), kwargs={}, options={},
        message_id=task_id,
    )  # fmt: skip
    return str(backend.build_message_key(message))
