"""The task layer end to end on both brokers: tasks enqueued with ``delay`` and run by a real
worker (thread, async and process pools), results, retries, dead letters, schedules, canvas,
limits, cancellation and bad input."""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

import riverbed
from riverbed.tasks import TaskState
from riverbed.tasks.brokers import connect_broker
from riverbed.tasks.worker.forker import Forker
from riverbed.tasks.worker.worker import Worker
from tests.support import wait_until

POOLS = ["thread", "async", "process"]


class Point(msgspec.Struct):
    x: int
    y: int


@pytest.fixture
def app(broker_url: str) -> Iterator[riverbed.App]:
    with riverbed.App("tasks-test", tasks_url=broker_url) as opened:
        yield opened


@contextmanager
def working(app: riverbed.App, **options: Any) -> Iterator[Worker]:
    """A worker running ``app``'s tasks in a thread for the ``with`` block."""
    options.setdefault("lease", 2.0)
    options.setdefault("shutdown_timeout", 5.0)
    worker = app.tasks.worker(**options)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(30)
        assert not thread.is_alive(), "the worker did not stop"


@pytest.mark.parametrize("pool", POOLS)
def test_delay_and_result_with_typed_arguments(app: riverbed.App, pool: str) -> None:
    @app.task
    def norm(p: Point, scale: float = 1.0) -> float:
        return float((p.x**2 + p.y**2) ** 0.5 * scale)

    @app.task
    async def shout(word: str) -> str:
        await asyncio.sleep(0)
        return word.upper()

    @app.task
    def stamp(at: datetime) -> datetime:
        return at + timedelta(days=1)

    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with working(app, pool=pool, concurrency=2):
        assert norm.delay(Point(3, 4), scale=2).result(timeout=30) == 10.0
        assert shout.delay("hi").result(timeout=30) == "HI"
        assert stamp.delay(moment).result(timeout=30) == moment + timedelta(days=1)
        handle = norm.delay(Point(0, 1))
        handle.result(timeout=30)
        assert handle.status is TaskState.SUCCEEDED
        assert asyncio.run(_awaited(shout.delay("async"))) == "ASYNC"


async def _awaited(handle: riverbed.TaskHandle[str]) -> str:
    return await handle


def test_delay_async_and_calling_the_task_directly(app: riverbed.App) -> None:
    @app.task
    async def double(n: int) -> int:
        return n * 2

    assert double(4) == 8  # a plain call runs here, now

    async def main() -> int:
        handle = await double.delay_async(21)
        return await handle

    with working(app):
        assert asyncio.run(main()) == 42


def test_retries_with_backoff_then_dead_letter_and_requeue(app: riverbed.App) -> None:
    attempts: list[tuple[int, float]] = []

    @app.task(retries=3, retry_on=(ConnectionError,), backoff=riverbed.exponential(0.1, 0.2))
    def flaky(fail: bool) -> str:
        attempts.append((riverbed.current_task().attempt, time.monotonic()))  # type: ignore[union-attr]
        if fail:
            raise ConnectionError("the remote end hung up")
        return "ok"

    @app.task(retries=5, retry_on=(ConnectionError,))
    def wrong_kind() -> None:
        raise ValueError("not retried: ValueError is not listed")

    with working(app):
        handle = flaky.delay(True)
        with pytest.raises(riverbed.TaskFailed) as failed:
            handle.result(timeout=30)
        assert failed.value.error_type == "ConnectionError"
        assert "the remote end hung up" in failed.value.traceback
        assert [n for n, _ in attempts] == [0, 1, 2, 3]
        gaps = [b - a for (_, a), (_, b) in itertools.pairwise(attempts)]
        assert all(gap >= 0.05 for gap in gaps), gaps  # backoff waited (jitter: half to full)

        other = wrong_kind.delay()
        with pytest.raises(riverbed.TaskFailed, match="ValueError"):
            other.result(timeout=30)
        assert other.info().message.attempt == 0  # type: ignore[union-attr]

        # Arguments the signature refuses fail where they are decoded, not retried.
        mistyped = flaky.delay("yes")  # type: ignore[arg-type]
        with pytest.raises(riverbed.TaskFailed, match=r"do not match task .*flaky's signature"):
            mistyped.result(timeout=30)
        assert mistyped.info().message.attempt == 0  # type: ignore[union-attr]
        assert attempts[-1][0] == 3  # the task never ran with them

        dead = {info.id: info for info in app.tasks.broker.dead()}
        assert set(dead) == {handle.id, other.id, mistyped.id}
        assert dead[handle.id].error is not None
        assert dead[handle.id].message.payload  # the arguments are kept

        attempts.clear()
        assert app.tasks.broker.requeue([handle.id]) == [handle.id]
        with pytest.raises(riverbed.TaskFailed):
            handle.result(timeout=30)
        assert [n for n, _ in attempts] == [0, 1, 2, 3]  # attempts were reset


def test_countdown_eta_and_expiry(app: riverbed.App) -> None:
    ran: dict[str, float] = {}

    @app.task
    def mark(name: str) -> None:
        ran[name] = time.monotonic()

    with working(app):
        start = time.monotonic()
        later = mark.options(countdown=1.0).delay("countdown")
        at = mark.options(eta=datetime.now(UTC) + timedelta(seconds=1)).delay("eta")
        assert later.status is TaskState.SCHEDULED
        later.result(timeout=30)
        at.result(timeout=30)
        assert ran["countdown"] - start >= 0.9
        assert ran["eta"] - start >= 0.9

        expired = mark.options(countdown=0.5, expires=0.1).delay("never")
        with pytest.raises(riverbed.TaskExpiredError):
            expired.result(timeout=30)
        assert "never" not in ran

    with pytest.raises(ValueError, match="time zone"):
        mark.options(eta=datetime.now()).delay("naive")


def test_priority_then_fifo_and_queues(app: riverbed.App) -> None:
    order: list[str] = []

    @app.task
    def record(name: str) -> None:
        order.append(name)

    @app.task(queue="reports")
    def report(name: str) -> None:
        order.append(name)

    low = [record.delay(f"low{i}") for i in range(3)]
    high = [record.options(priority=9).delay(f"high{i}") for i in range(2)]
    mid = record.options(priority=5).delay("mid")
    elsewhere = report.delay("report")
    with working(app, concurrency=1, prefetch=0, queues=["default"]):
        for handle in [*low, *high, mid]:
            handle.result(timeout=30)
        assert order == ["high0", "high1", "mid", "low0", "low1", "low2"]
        time.sleep(0.3)
        assert elsewhere.status is TaskState.QUEUED  # nobody serves "reports"
    with working(app, queues=["reports"]):
        elsewhere.result(timeout=30)


def test_idempotency_key_returns_the_first_handle(app: riverbed.App) -> None:
    calls: list[int] = []

    @app.task
    def charge(amount: int) -> int:
        calls.append(amount)
        return amount

    first = charge.options(key="order-42").delay(10)
    second = charge.options(key="order-42").delay(10)
    assert second.id == first.id
    with working(app):
        assert second.result(timeout=30) == 10
        assert charge.options(key="order-42").delay(10).id == first.id
        assert not first.cancel()  # it already finished
        assert charge.options(key="order-43").delay(5).result(timeout=30) == 5
    assert calls == [10, 5]


@pytest.mark.parametrize("pool", POOLS)
def test_soft_time_limit_raises_inside_the_task(app: riverbed.App, pool: str) -> None:
    @app.task(soft_timeout=0.3)
    def slow() -> str:
        try:
            for _ in range(200):  # short sleeps: a thread hears the limit between them
                time.sleep(0.05)
        except riverbed.SoftTimeLimitExceeded:
            return "cleaned up"
        return "finished"

    @app.task(soft_timeout=0.3)
    async def slow_async() -> str:
        await asyncio.sleep(10)
        return "finished"

    with working(app, pool=pool, concurrency=2):
        if pool == "async":
            # A coroutine is cancelled at its soft limit; the task fails with the limit's error.
            with pytest.raises(riverbed.TaskFailed, match="SoftTimeLimitExceeded"):
                slow_async.delay().result(timeout=30)
        else:
            assert slow.delay().result(timeout=30) == "cleaned up"


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_hard_time_limit_fails_the_task_and_replaces_its_slot(app: riverbed.App, pool: str) -> None:
    @app.task(timeout=0.5)
    def stuck() -> None:
        while True:
            time.sleep(0.05)

    @app.task
    def fine() -> int:
        return 1

    with working(app, pool=pool, concurrency=1, prefetch=0):
        with pytest.raises(riverbed.TaskFailed, match="TimeLimitExceeded"):
            stuck.delay().result(timeout=30)
        assert fine.delay().result(timeout=30) == 1  # the slot was replaced


@pytest.mark.parametrize("pool", POOLS)
def test_cancel_queued_and_running_tasks(app: riverbed.App, pool: str) -> None:
    started = threading.Event()

    @app.task
    def long_running() -> str:
        started.set()
        for _ in range(400):
            time.sleep(0.05)
        return "finished"

    @app.task
    async def long_async() -> str:
        started.set()
        await asyncio.sleep(20)
        return "finished"

    queued = long_running.options(countdown=60).delay()
    assert queued.cancel()
    assert queued.status is TaskState.CANCELLED
    with pytest.raises(riverbed.TaskCancelledError):
        queued.result(timeout=5)

    task = long_async if pool == "async" else long_running
    with working(app, pool=pool, concurrency=1, lease=30):
        running = task.delay()
        wait_until(lambda: running.status is TaskState.RUNNING, 30, "the task to start")
        assert running.cancel()
        # Heard of within a second, not at the lease's next renewal (every 10 s here).
        with pytest.raises(riverbed.TaskCancelledError):
            running.result(timeout=5)
    assert running.status is TaskState.CANCELLED


def test_a_task_that_expires_while_waiting_for_a_slot_does_not_start(app: riverbed.App) -> None:
    started = threading.Event()
    ran: list[str] = []

    @app.task
    def busy() -> None:
        started.set()
        time.sleep(3)

    @app.task
    def quick() -> None:
        ran.append("quick")

    with working(app, concurrency=1):
        busy.delay()
        assert started.wait(30)
        waiting = quick.options(expires=1).delay()  # fetched at once, then held behind busy
        with pytest.raises(riverbed.TaskExpiredError):
            waiting.result(timeout=30)
    assert ran == []


def test_chain_group_and_chord(app: riverbed.App) -> None:
    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    @app.task
    def total(values: list[int], bonus: int = 0) -> int:
        return sum(values) + bonus

    @app.task
    def fail(x: int) -> int:
        raise RuntimeError(f"header {x} broke")

    pending = riverbed.group(add.s(1, 1), add.s(2, 2)).delay()
    asked = time.monotonic()
    with pytest.raises(riverbed.ResultTimeoutError):
        pending.result(timeout=0)  # no wait, as a task's handle
    assert time.monotonic() - asked < 10  # it waited a minute
    with working(app, concurrency=4):
        assert riverbed.chain(add.s(1, 2), add.s(10), add.s(100)).delay().result(timeout=30) == 113
        assert riverbed.group(*(add.s(i, i) for i in range(5))).delay().result(timeout=30) == [
            0, 2, 4, 6, 8,
        ]  # fmt: skip
        done = riverbed.chord([add.s(i, 1) for i in range(10)], total.s(bonus=1000)).delay()
        assert done.result(timeout=30) == sum(range(1, 11)) + 1000
        broken = riverbed.chord([add.s(1, 1), fail.s(7)], total.s()).delay()
        with pytest.raises(riverbed.TaskFailed, match="header 7 broke"):
            broken.result(timeout=30)
        # A chain whose step fails: its later steps fail with it, naming it.
        stopped = riverbed.chain(add.s(1, 1), fail.s(), add.s(100)).delay()
        with pytest.raises(riverbed.TaskFailed, match=r"ChainStepFailed.*ended failed.*header 2"):
            stopped.result(timeout=30)
        assert stopped.status is TaskState.FAILED


def test_a_chain_steps_countdown_and_expiry_count_from_the_step_before(app: riverbed.App) -> None:
    stamps: dict[str, float] = {}

    @app.task
    def slow(x: int) -> int:
        time.sleep(1.5)
        stamps["slow done"] = time.monotonic()
        return x

    @app.task
    def after(x: int) -> int:
        stamps["after started"] = time.monotonic()
        return x + 1

    with working(app, concurrency=2):
        waited = riverbed.chain(slow.s(1), after.options(countdown=1).s()).delay()
        assert waited.result(timeout=30) == 2
        assert stamps["after started"] - stamps["slow done"] >= 0.9
        # Expires a second after the step before it succeeded, not after delay(): it runs.
        assert riverbed.chain(slow.s(1), after.options(expires=1).s()).delay().result(30) == 2


def test_cancelling_a_chain_or_a_chord_stops_the_step_or_headers_waiting(
    app: riverbed.App,
) -> None:
    ran: list[int] = []

    @app.task
    def step(x: int) -> int:
        ran.append(x)
        return x + 1

    @app.task
    def total(values: list[int]) -> int:
        return sum(values)

    with pytest.raises(riverbed.RiverbedError, match="a chain's steps take no idempotency key"):
        riverbed.chain(step.s(1), step.options(key="k").s())
    with pytest.raises(riverbed.RiverbedError, match="a chord's header and callback take no"):
        riverbed.chord([step.options(key="k").s(1)], total.s())
    chained = riverbed.chain(step.s(1), step.s(), step.s()).delay()
    assert chained.cancel()  # its first step, still queued
    chorded = riverbed.chord([step.s(10), step.s(20)], total.s()).delay()
    assert chorded.cancel()
    with working(app, concurrency=2):
        with pytest.raises(riverbed.TaskFailed, match=r"ChainStepFailed.*ended cancelled"):
            chained.result(timeout=30)
        with pytest.raises(riverbed.TaskFailed, match="ChordHeaderFailed"):
            chorded.result(timeout=30)
    assert ran == []


def test_a_failed_chain_requeued_from_the_dead_letters_completes(app: riverbed.App) -> None:
    broken = {"on": True}

    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    @app.task
    def flaky(x: int) -> int:
        if broken["on"]:
            raise RuntimeError("step broke")
        return x * 10

    with working(app, concurrency=2):
        handle = riverbed.chain(add.s(1, 1), flaky.s(), add.s(100)).delay()
        with pytest.raises(riverbed.TaskFailed, match="ChainStepFailed"):
            handle.result(timeout=30)
        broken["on"] = False
        # The failed step only: the one after it, which never ran, waits for its result.
        assert len(app.tasks.broker.requeue(None)) == 1
        assert handle.result(timeout=30) == 120


def test_a_failed_chord_requeued_from_the_dead_letters_completes(app: riverbed.App) -> None:
    broken = {"on": True}

    @app.task
    def part(x: int) -> int:
        if x == 2 and broken["on"]:
            raise RuntimeError("header broke")
        time.sleep(0.2)
        return x * 10

    @app.task
    def total(values: list[int]) -> int:
        return sum(values)

    with working(app, concurrency=4):
        handle = riverbed.chord([part.s(i) for i in range(4)], total.s()).delay()
        with pytest.raises(riverbed.TaskFailed, match="ChordHeaderFailed"):
            handle.result(timeout=30)
        broken["on"] = False
        # The failed header and the callback, at once: the callback waits for the header.
        assert len(app.tasks.broker.requeue(None)) == 2
        assert handle.result(timeout=30) == 60


def test_rate_limit_holds_across_workers(app: riverbed.App) -> None:
    stamps: list[float] = []
    lock = threading.Lock()

    @app.task(rate_limit="10/s")
    def limited(i: int) -> None:
        with lock:
            stamps.append(time.monotonic())

    handles = [limited.delay(i) for i in range(25)]
    with working(app, concurrency=4), working(app, concurrency=4):
        for handle in handles:
            handle.result(timeout=60)
    stamps.sort()
    # 25 tasks at 10/s, from a bucket holding one token: at least 2.4 s from first to last.
    assert stamps[-1] - stamps[0] >= 2.0
    for i, start in enumerate(stamps):
        in_one_second = sum(1 for s in stamps[i:] if s - start < 1.0)
        assert in_one_second <= 12, in_one_second


def test_unknown_task_goes_to_the_dead_letter_queue(app: riverbed.App, broker_url: str) -> None:
    with riverbed.App("other", tasks_url=broker_url) as other:

        @other.task(name="only.elsewhere")
        def elsewhere() -> None: ...

        @app.task
        def known() -> int:
            return 1

        handle = elsewhere.delay()
        with working(app):
            with pytest.raises(riverbed.TaskFailed, match=r"no task named 'only\.elsewhere'"):
                handle.result(timeout=30)
            assert known.delay().result(timeout=30) == 1
        (dead,) = app.tasks.broker.dead()
        assert dead.error is not None and dead.error.type == "UnknownTaskError"


def test_bad_input_fails_at_delay(app: riverbed.App) -> None:
    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    with pytest.raises(riverbed.TaskArgumentsError, match=r"argument 1 .* cannot be serialized"):
        add.delay(1, object())  # type: ignore[arg-type]
    with pytest.raises(riverbed.TaskArgumentsError, match="missing a required argument: 'b'"):
        add.delay(1)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="priority 12"):
        add.options(priority=12).delay(1, 2)
    with pytest.raises(ValueError, match="queue name"):
        add.options(queue="no spaces").delay(1, 2)
    with pytest.raises(ValueError, match="rate_limit"):
        app.task(rate_limit="fast")(lambda: None)
    with pytest.raises(riverbed.RiverbedError, match="already registered"):
        app.task(name=add.name)(lambda: None)
    assert app.tasks.broker.list_tasks() == []  # nothing was enqueued


def test_unreachable_broker_fails_fast() -> None:
    start = time.monotonic()
    with pytest.raises(riverbed.BrokerUnavailableError):
        connect_broker("redis://127.0.0.1:1/0")
    assert time.monotonic() - start < 10
    with pytest.raises(riverbed.InvalidUrlError, match="result_ttl"):
        connect_broker("sqlite:///x.db?result_ttl=never")


def test_results_expire_back_to_the_baseline(broker_url: str) -> None:
    url = broker_url + ("&" if "?" in broker_url else "?") + "result_ttl=1"
    with riverbed.App("ttl", tasks_url=url) as app:

        @app.task
        def echo(n: int) -> int:
            return n

        broker = app.tasks.broker

        def footprint() -> int:
            broker.housekeep()
            return broker.footprint()

        with working(app):
            # The baseline: the broker's fixed entries (counters, queue names, this worker).
            echo.delay(-1).result(timeout=30)
            time.sleep(1.5)
            baseline = footprint()
            handles = [echo.options(key=f"k{i}").delay(i) for i in range(50)]
            assert [h.result(timeout=30) for h in handles] == list(range(50))
            assert footprint() >= baseline + 50
            wait_until(lambda: footprint() <= baseline, 30, "results and keys to expire")
        with pytest.raises(riverbed.ResultExpiredError):
            handles[0].result(timeout=1)


def test_stats_list_and_purge(app: riverbed.App) -> None:
    @app.task(queue="bulk")
    def job(i: int) -> None: ...

    for i in range(5):
        job.delay(i)
    job.options(countdown=60).delay(99)
    stats = app.tasks.broker.stats()
    assert stats.queues["bulk"].queued == 5
    assert stats.queues["bulk"].scheduled == 1
    assert len(app.tasks.broker.list_tasks(TaskState.QUEUED, "bulk")) == 5
    assert app.tasks.broker.purge("bulk") == 6
    assert app.tasks.broker.list_tasks(queue="bulk") == []


def test_process_pool_children_inherit_no_lock_another_thread_held(
    app: riverbed.App, tmp_path: Any
) -> None:
    """A child forked while another thread of the worker's process was inside SQLite would
    inherit SQLite's lock held, and hang when its task opened a database."""
    database = str(tmp_path / "busy.db")

    @app.task
    def open_then_die(n: int) -> int:
        sqlite3.connect(database).close()
        if n < 0:
            return n
        os._exit(3)  # the pool forks another child for the next task

    stop = threading.Event()

    def open_and_close() -> None:  # another thread of the worker's process, inside SQLite
        while not stop.is_set():
            sqlite3.connect(database).close()

    busy = threading.Thread(target=open_and_close, daemon=True)
    with working(app, pool="process", concurrency=2):
        assert open_then_die.delay(-1).result(timeout=30) == -1  # the pool has started
        busy.start()
        try:
            handles = [open_then_die.delay(n) for n in range(30)]
            for handle in handles:
                with pytest.raises(riverbed.TaskFailed, match="exited with status 3"):
                    handle.result(timeout=30)
        finally:
            stop.set()
            busy.join()


def test_process_pool_children_open_their_own_connections(app: riverbed.App) -> None:
    """The worker's thread has a broker connection (SQLite's, which a fork must not share): a
    child's task that enqueues another opens one of its own."""
    broker = app.tasks.broker

    @app.task
    def double(n: int) -> int:
        return 2 * n

    @app.task
    def inherited_then_enqueue(n: int) -> bool:
        local = getattr(getattr(broker, "_file", None), "_local", None)
        inherited = getattr(local, "conn", None) is not None
        double.delay(n)
        return inherited

    with working(app, pool="process", concurrency=1):
        assert inherited_then_enqueue.delay(4).result(timeout=30) is False


def test_a_process_pool_worker_that_never_ran_ends_its_forker_when_dropped(
    app: riverbed.App,
) -> None:
    @app.task
    def noop() -> None:
        return None

    before = children_of_this_process()
    worker = app.tasks.worker(pool="process", concurrency=1)
    forkers = children_of_this_process() - before
    assert len(forkers) == 1
    del worker
    gc.collect()
    assert not children_of_this_process() & forkers  # ended and reaped, not left a zombie


def children_of_this_process() -> set[int]:
    children = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rpartition(")")[2].split()
            except OSError:  # ended meanwhile
                continue
            if int(fields[1]) == os.getpid():
                children.add(int(entry))
    return children


def test_a_feeder_asking_for_a_child_after_the_pool_stopped_gets_none() -> None:
    forker = Forker(lambda pipe: None, ())
    forked = forker.fork()
    assert forked is not None
    forked[1].close()
    assert forker.reap(forked[0]) == 0
    forker.close()
    assert forker.fork() is None  # not an OSError in the feeder's thread at shutdown


def test_a_worker_whose_heartbeat_fails_for_good_stops_with_the_error(
    app: riverbed.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    @app.task
    def double(n: int) -> int:
        return 2 * n

    def extend(*args: Any) -> Any:
        raise ValueError("the server refused the reply")  # not an outage: no retry mends it

    monkeypatch.setattr(app.tasks.broker, "extend", extend)
    worker = app.tasks.worker(lease=2.0, shutdown_timeout=5.0)
    failures: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except ValueError as error:
            failures.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()  # it stopped, instead of fetching tasks it could not keep
    assert [str(error) for error in failures] == ["the server refused the reply"]
