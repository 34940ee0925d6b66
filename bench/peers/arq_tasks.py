"""bench/tasks.py's arq app: one no-op coroutine job.

The worker: ``python -m arq_tasks`` from bench/peers, which runs ``arq.run_worker(WorkerSettings)``
(arq's documented programmatic start; the ``arq`` command would also configure per-job INFO
logging to the console). The settings come from BENCH_ARQ_* variables (bench/tasks.py sets
them and lists them). The producer hooks are those bench/peers/tasks_driver.py calls.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from arq import create_pool, run_worker
from arq.connections import ArqRedis, RedisSettings
from arq.jobs import JobStatus

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
ASYNC = True
RESULT_POLL = 0.001  # s between the producer's status polls (job.result's default: 0.5)


async def noop(ctx: dict[str, Any]) -> None:
    return None


class WorkerSettings:
    functions = [noop]  # noqa: RUF012 (arq reads class attributes)
    redis_settings = RedisSettings.from_dsn(URL)
    max_jobs = int(os.environ.get("BENCH_ARQ_MAX_JOBS", "10"))
    poll_delay = float(os.environ.get("BENCH_ARQ_POLL_DELAY", "0.5"))


pool: ArqRedis | None = None
enqueue_many = None  # arq has no bulk enqueue


async def setup() -> None:
    global pool  # noqa: PLW0603
    pool = await create_pool(RedisSettings.from_dsn(URL))


async def close() -> None:
    if pool is not None:
        await pool.aclose()


async def enqueue_one() -> Any:
    assert pool is not None
    return await pool.enqueue_job("noop")


async def wait(handle: Any, timeout: float) -> None:
    """``job.result()`` once ``job.status()`` says complete. arq 0.25's ``result()`` reads the
    result key and the queue entry without a transaction, so a job finishing between the two
    reads raises ResultNotFound; ``status()`` reads both in one (arq 0.26+ fixed ``result()``,
    but needs redis-py < 6: see bench/requirements-peers.txt)."""
    deadline = time.monotonic() + timeout
    while await handle.status() != JobStatus.complete:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {handle.job_id} not complete after {timeout:g} s")
        await asyncio.sleep(RESULT_POLL)
    await handle.result(timeout=timeout, poll_delay=RESULT_POLL)


def task_id(handle: Any) -> str:
    return str(handle.job_id)


def result_key(task_id: str) -> str:
    return f"arq:result:{task_id}"


if __name__ == "__main__":
    run_worker(WorkerSettings)  # type: ignore[arg-type]
