"""The producer side of bench/tasks.py: enqueues, waits for completion, times round trips.

Run by bench/tasks.py as ``python tasks_driver.py MODULE PHASE CONFIG_JSON`` from bench/peers,
with the Python of the system's venv (bench/.venv-peers for the peers, .venv for riverbed), so
that each library is imported only where it is installed. MODULE is one of the ``*_tasks``
modules beside this file (``celery_tasks``, ``riverbed_tasks``, ...); each defines the app, a
no-op task and these hooks:

- ``enqueue_one()``: the library's normal enqueue call for one task; returns its handle
- ``enqueue_many(count)`` (or ``None`` where the library has no bulk enqueue): ``count`` tasks
  in one bulk call; returns their handles
- ``wait(handle, timeout)``: the library's normal call waiting for the task's result
- ``task_id(handle)``: the task's id
- ``result_key(task_id)``: the Redis key the library stores the task's result under, or
  ``done_count(ids)``: how many of ``ids`` have finished (used when there is no such key), with
  an optional ``verify(ids)``: why not all of them succeeded, or None (checked once, untimed)
- optional ``setup()`` / ``close()``; with ``ASYNC = True`` the hooks above (but ``task_id``,
  ``result_key`` and ``done_count``) are coroutines, run in one event loop

Phases (the config names the task count, files and timeouts; each prints one JSON line):

- ``enqueue``: ``tasks`` single enqueues, timed; the ids go to ``ids_file``
- ``enqueue-bulk``: the same tasks through ``enqueue_many`` in chunks of ``chunk``, timed
- ``wait``: prints ``READY``, then polls every ``poll`` s until all the ids of ``ids_file``
  have a result; prints the ``time.monotonic()`` of the first and of the last one seen (the
  benchmark starts the workers after READY and compares with its own monotonic clock: one
  system-wide clock, CLOCK_MONOTONIC on Linux)
- ``roundtrip``: ``warmup`` untimed then ``count`` timed (enqueue one, wait for its result)
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

EXISTS_CHUNK = 500  # result keys per EXISTS command while polling for completion


class KeyProbe:
    """Counts the ids whose result key exists, re-checking only chunks not yet complete."""

    def __init__(self, url: str, keys: list[str]) -> None:
        import redis

        self._client = redis.Redis.from_url(url)
        self._pending = [keys[i : i + EXISTS_CHUNK] for i in range(0, len(keys), EXISTS_CHUNK)]
        self._complete = 0

    def done(self) -> int:
        pipe = self._client.pipeline(transaction=False)
        for chunk in self._pending:
            pipe.exists(*chunk)
        counts = pipe.execute()
        partial = 0
        pending = []
        for chunk, count in zip(self._pending, counts, strict=True):
            if count == len(chunk):
                self._complete += count
            else:
                pending.append(chunk)
                partial += count
        self._pending = pending
        return self._complete + partial


def emit(payload: dict[str, Any]) -> None:
    print(json.dumps(payload), flush=True)


def counter(module: ModuleType, config: dict[str, Any], ids: list[str]) -> Callable[[], int]:
    if hasattr(module, "done_count"):
        return lambda: int(module.done_count(ids))
    probe = KeyProbe(config["redis_url"], [module.result_key(i) for i in ids])
    return probe.done


def wait_phase(module: ModuleType, config: dict[str, Any]) -> None:
    ids = json.loads(Path(config["ids_file"]).read_text())
    done = counter(module, config, ids)
    done()  # connect before READY
    print("READY", flush=True)
    first: float | None = None
    deadline = time.monotonic() + config["timeout"]
    count = 0
    while True:
        count = done()
        now = time.monotonic()
        if count and first is None:
            first = now
        if count >= len(ids):
            problem = module.verify(ids) if hasattr(module, "verify") else None
            if problem is not None:
                emit({"error": problem})
            else:
                emit({"first": first, "done": now, "count": count})
            return
        if now > deadline:
            emit({"error": f"{count} of {len(ids)} tasks done after {config['timeout']:g} s"})
            return
        time.sleep(config["poll"])


def sync_phase(module: ModuleType, phase: str, config: dict[str, Any]) -> dict[str, Any]:
    if phase == "enqueue":
        tasks = config["tasks"]
        handles = []
        started = time.perf_counter()
        for _ in range(tasks):
            handles.append(module.enqueue_one())
        seconds = time.perf_counter() - started
        Path(config["ids_file"]).write_text(json.dumps([module.task_id(h) for h in handles]))
        return {"seconds": seconds}
    if phase == "enqueue-bulk":
        if module.enqueue_many is None:
            return {"seconds": None}
        tasks, chunk = config["tasks"], config["chunk"]
        count = 0
        started = time.perf_counter()
        for start in range(0, tasks, chunk):
            count += len(module.enqueue_many(min(chunk, tasks - start)))
        seconds = time.perf_counter() - started
        if count != tasks:
            return {"error": f"enqueue_many returned {count} handles for {tasks} tasks"}
        return {"seconds": seconds}
    if phase == "roundtrip":
        timeout = config["timeout"]
        for _ in range(config["warmup"]):
            module.wait(module.enqueue_one(), timeout)
        latencies = []
        for _ in range(config["count"]):
            started = time.perf_counter()
            module.wait(module.enqueue_one(), timeout)
            latencies.append(time.perf_counter() - started)
        return {"latencies": latencies}
    raise SystemExit(f"unknown phase {phase!r}")


async def async_phase(module: ModuleType, phase: str, config: dict[str, Any]) -> dict[str, Any]:
    """``sync_phase`` for asyncio libraries: the same loops, awaiting each call in turn."""
    await module.setup()
    try:
        if phase == "enqueue":
            tasks = config["tasks"]
            handles = []
            started = time.perf_counter()
            for _ in range(tasks):
                handles.append(await module.enqueue_one())
            seconds = time.perf_counter() - started
            Path(config["ids_file"]).write_text(json.dumps([module.task_id(h) for h in handles]))
            return {"seconds": seconds}
        if phase == "enqueue-bulk":
            if module.enqueue_many is None:
                return {"seconds": None}
            tasks, chunk = config["tasks"], config["chunk"]
            count = 0
            started = time.perf_counter()
            for start in range(0, tasks, chunk):
                count += len(await module.enqueue_many(min(chunk, tasks - start)))
            seconds = time.perf_counter() - started
            if count != tasks:
                return {"error": f"enqueue_many returned {count} handles for {tasks} tasks"}
            return {"seconds": seconds}
        if phase == "roundtrip":
            timeout = config["timeout"]
            for _ in range(config["warmup"]):
                await module.wait(await module.enqueue_one(), timeout)
            latencies = []
            for _ in range(config["count"]):
                started = time.perf_counter()
                await module.wait(await module.enqueue_one(), timeout)
                latencies.append(time.perf_counter() - started)
            return {"latencies": latencies}
        raise SystemExit(f"unknown phase {phase!r}")
    finally:
        await module.close()


def main() -> None:
    name, phase, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    module = importlib.import_module(name)
    if phase == "wait":
        wait_phase(module, config)
        return
    if getattr(module, "ASYNC", False):
        emit(asyncio.run(async_phase(module, phase, config)))
        return
    if hasattr(module, "setup"):
        module.setup()
    try:
        emit(sync_phase(module, phase, config))
    finally:
        if hasattr(module, "close"):
            module.close()


if __name__ == "__main__":
    main()
