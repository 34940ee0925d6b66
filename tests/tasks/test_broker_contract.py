"""The broker contract, run against every broker (``sqlite`` and a real Redis).

A behaviour tested here holds on both. Waiting is asserted generously (seconds, against timeouts of
tens of seconds), never tightly: these tests check that a call wakes, not how fast.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from riverbed.errors import InvalidUrlError
from riverbed.tasks.brokers import Broker, connect_broker
from riverbed.tasks.brokers.redis import RedisBroker
from riverbed.tasks.brokers.sqlite import SqliteBroker
from riverbed.tasks.errors import BrokerUnavailableError
from riverbed.tasks.messages import (
    ENCODER,
    ChordSpec,
    ErrorInfo,
    Heartbeat,
    Outcome,
    TaskMessage,
    TaskState,
    new_task_id,
    now_ms,
)
from tests.services import free_port
from tests.services.redis import start_redis
from tests.support import wait_until
from tests.tasks.conftest import OpenBroker

W1, W2 = "worker-1", "worker-2"
LEASE = 60_000
# Long enough that a test never sees it run out while it runs.
PATIENCE = 30.0
# What "promptly" means for a call that blocks up to PATIENCE seconds: below the Redis broker's
# blocking slice (5 s), so that a missed wakeup fails a test instead of hiding behind a re-poll.
PROMPT = 3.0
PAYLOAD = ENCODER.encode([[], {}])
BOOM = ErrorInfo("ValueError", "boom", "Traceback (most recent call last):\n  ...")

T = TypeVar("T")


def task(name: str = "job", **fields: Any) -> TaskMessage:
    return TaskMessage(id=new_task_id(), name=name, payload=PAYLOAD, enqueued_ms=now_ms(), **fields)


def ids(messages: Sequence[TaskMessage]) -> list[str]:
    return [message.id for message in messages]


def fetch(
    broker: Broker, worker: str = W1, queues: Sequence[str] = ("default",), limit: int = 100
) -> list[TaskMessage]:
    return broker.fetch(worker, queues, limit, LEASE)


def finish(
    broker: Broker,
    message: TaskMessage,
    state: TaskState = TaskState.SUCCEEDED,
    worker: str = W1,
    **fields: Any,
) -> None:
    broker.finish(worker, [Outcome(message, state, **fields)])


def state_of(broker: Broker, task_id: str) -> TaskState | None:
    info = broker.info([task_id]).get(task_id)
    return None if info is None else info.state


def timed(call: Callable[[], T]) -> tuple[T, float]:
    start = time.monotonic()
    return call(), time.monotonic() - start


def in_thread(call: Callable[[], T]) -> Callable[[], tuple[T, float]]:
    """Run ``call`` in a thread; the function returned joins it and gives its result and how
    long it took."""
    box: list[tuple[T, float]] = []
    thread = threading.Thread(target=lambda: box.append(timed(call)), daemon=True)
    thread.start()

    def join() -> tuple[T, float]:
        thread.join(PATIENCE + PROMPT)
        assert box, "the thread did not finish"
        return box[0]

    return join


# Enqueueing and fetching


def test_enqueue_stores_queued_tasks_and_returns_their_ids(broker: Broker) -> None:
    first, second = task(), task(queue="emails", priority=3)
    assert broker.enqueue([first, second]) == [first.id, second.id]
    infos = broker.info([first.id, second.id, "unknown"])
    assert set(infos) == {first.id, second.id}
    assert infos[second.id].message == second
    assert infos[second.id].state is TaskState.QUEUED
    assert (infos[second.id].worker, infos[second.id].result, infos[second.id].error) == (
        "",
        b"",
        None,
    )


def test_fetch_takes_the_highest_priority_first_then_the_oldest(broker: Broker) -> None:
    low, high, mid, high_later = task(), task(priority=9), task(priority=5), task(priority=9)
    broker.enqueue([low, high, mid, high_later])
    assert ids(fetch(broker, limit=1)) == [high.id]
    assert ids(fetch(broker)) == [high_later.id, mid.id, low.id]


def test_fetch_merges_the_listed_queues_and_leaves_the_others(broker: Broker) -> None:
    a_old = task(queue="a")
    b_urgent = task(queue="b", priority=3)
    a_urgent = task(queue="a", priority=3)
    c_top = task(queue="c", priority=9)
    broker.enqueue([a_old, b_urgent, a_urgent, c_top])
    assert ids(fetch(broker, queues=["a", "b"])) == [b_urgent.id, a_urgent.id, a_old.id]
    assert state_of(broker, c_top.id) is TaskState.QUEUED


def test_fetch_leases_up_to_its_limit_to_the_worker(broker: Broker) -> None:
    messages = [task() for _ in range(3)]
    broker.enqueue(messages)
    before = now_ms()
    assert fetch(broker, limit=2) == messages[:2]
    info = broker.info([messages[0].id])[messages[0].id]
    assert (info.state, info.worker) == (TaskState.RUNNING, W1)
    assert info.started_ms >= before
    assert state_of(broker, messages[2].id) is TaskState.QUEUED
    assert fetch(broker, W2) == messages[2:]
    assert fetch(broker) == []


def test_a_lapsed_lease_is_delivered_again_in_its_place(broker: Broker) -> None:
    first = task()
    broker.enqueue([first])
    broker.fetch(W1, ["default"], 1, lease_ms=100)
    later = task()
    broker.enqueue([later])
    time.sleep(0.3)
    assert fetch(broker, W2, limit=1) == [first]
    info = broker.info([first.id])[first.id]
    assert (info.state, info.worker) == (TaskState.RUNNING, W2)
    assert broker.extend(W1, [first.id], LEASE) == Heartbeat(lost=frozenset({first.id}))


def test_extend_keeps_the_lease(broker: Broker) -> None:
    message = task()
    broker.enqueue([message])
    broker.fetch(W1, ["default"], 1, lease_ms=200)
    assert broker.extend(W1, [message.id], LEASE) == Heartbeat()
    time.sleep(0.4)
    assert fetch(broker, W2) == []
    assert broker.info([message.id])[message.id].worker == W1


def test_extend_names_the_tasks_the_worker_does_not_hold(broker: Broker) -> None:
    message = task()
    broker.enqueue([message])
    fetch(broker)
    heartbeat = broker.extend(W2, [message.id, "unknown"], LEASE)
    assert heartbeat == Heartbeat(lost=frozenset({message.id, "unknown"}))


def test_release_gives_tasks_back_to_their_queue_or_schedules_them(broker: Broker) -> None:
    now_task, later_task = task(), task()
    broker.enqueue([now_task, later_task])
    fetch(broker)
    broker.release(W2, [now_task.id])  # not W2's: ignored
    assert state_of(broker, now_task.id) is TaskState.RUNNING
    broker.release(W1, [now_task.id])
    broker.release(W1, [later_task.id], eta_ms=now_ms() + 60_000)
    info = broker.info([now_task.id])[now_task.id]
    assert (info.state, info.worker) == (TaskState.QUEUED, "")
    assert state_of(broker, later_task.id) is TaskState.SCHEDULED
    assert fetch(broker, W2) == [now_task]


# Scheduled tasks


def test_a_scheduled_task_waits_for_its_eta(broker: Broker) -> None:
    message = task(eta_ms=now_ms() + 400)
    broker.enqueue([message])
    assert state_of(broker, message.id) is TaskState.SCHEDULED
    assert fetch(broker) == []
    time.sleep(0.5)
    assert fetch(broker) == [message]


def test_due_tasks_are_delivered_once_to_concurrent_fetchers(
    broker: Broker, open_broker: OpenBroker
) -> None:
    eta = now_ms() + 300
    messages = [task(eta_ms=eta) for _ in range(150)] + [task() for _ in range(50)]
    broker.enqueue(messages)
    fetched: list[str] = []
    lock = threading.Lock()

    def fetcher(worker: str) -> None:
        mine = open_broker()
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            with lock:
                if len(fetched) >= len(messages):
                    return
            got = mine.fetch(worker, ["default"], 7, LEASE, timeout=0.2)
            with lock:
                fetched.extend(ids(got))

    threads = [threading.Thread(target=fetcher, args=(f"w{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert Counter(fetched) == Counter(ids(messages))


# Blocking fetch


def test_fetch_blocks_until_a_task_is_enqueued(broker: Broker, open_broker: OpenBroker) -> None:
    fetcher = open_broker()
    join = in_thread(partial(fetcher.fetch, W1, ["default"], 1, LEASE, PATIENCE))
    time.sleep(0.3)
    message = task()
    broker.enqueue([message])
    got, elapsed = join()
    assert got == [message]
    assert elapsed < PROMPT


def test_fetch_wakes_when_a_scheduled_task_falls_due(
    broker: Broker, open_broker: OpenBroker
) -> None:
    fetcher = open_broker()
    join = in_thread(partial(fetcher.fetch, W1, ["default"], 1, LEASE, PATIENCE))
    time.sleep(0.3)
    message = task(eta_ms=now_ms() + 500)
    broker.enqueue([message])
    got, elapsed = join()
    assert got == [message]
    assert elapsed < PROMPT


def test_idle_fetchers_join_in_turn(broker: Broker, open_broker: OpenBroker) -> None:
    joins = [
        in_thread(partial(open_broker().fetch, worker, ["default"], 1, LEASE, PATIENCE))
        for worker in (W1, W2)
    ]
    time.sleep(0.3)
    messages = [task(), task()]
    broker.enqueue(messages)
    got = [join() for join in joins]
    assert sorted(ids(got[0][0]) + ids(got[1][0])) == sorted(ids(messages))
    assert all(elapsed < PROMPT for _, elapsed in got)


def test_fetch_returns_nothing_after_its_timeout(broker: Broker) -> None:
    got, elapsed = timed(lambda: broker.fetch(W1, ["default"], 1, LEASE, timeout=0.3))
    assert got == []
    assert elapsed >= 0.25


# Idempotency keys


def test_an_idempotency_key_maps_later_enqueues_to_the_first_task(broker: Broker) -> None:
    first, again, other = task(key="order-1"), task(key="order-1"), task(key="order-2")
    assert broker.enqueue([first]) == [first.id]
    assert broker.enqueue([again, other]) == [first.id, other.id]
    twin_a, twin_b = task(key="order-3"), task(key="order-3")
    assert broker.enqueue([twin_a, twin_b]) == [twin_a.id, twin_a.id]
    assert set(broker.info([again.id, twin_b.id])) == set()
    assert ids(fetch(broker)) == [first.id, other.id, twin_a.id]


def test_an_idempotency_key_holds_until_its_task_finishes_then_for_the_results_ttl(
    open_broker: OpenBroker,
) -> None:
    broker = open_broker(result_ttl="0.5")
    first = task(key="once", eta_ms=now_ms() + 1_500)  # due after the result's TTL
    assert broker.enqueue([first]) == [first.id]
    time.sleep(0.8)
    assert broker.enqueue([task(key="once")]) == [first.id]  # pending: the key holds
    wait_until(lambda: bool(fetch(broker)), 10, "the task to fall due")
    time.sleep(0.6)  # running longer than the result's TTL
    assert broker.enqueue([task(key="once")]) == [first.id]
    finish(broker, first)
    assert broker.enqueue([task(key="once")]) == [first.id]  # its result is kept
    time.sleep(0.8)
    later = task(key="once")
    assert broker.enqueue([later]) == [later.id]  # the result expired, and the key with it


def test_a_requeued_dead_letter_holds_its_idempotency_key_again(
    open_broker: OpenBroker,
) -> None:
    broker = open_broker(dead_ttl="0.5")
    first = task(key="charge-42")
    broker.enqueue([first])
    fetch(broker)
    finish(broker, first, TaskState.FAILED, error=BOOM)  # a dead letter: key kept dead_ttl
    assert broker.requeue([first.id]) == [first.id]
    time.sleep(0.8)  # past the dead letter's TTL: the requeued task waits on
    assert broker.enqueue([task(key="charge-42")]) == [first.id]  # not a second charge


def store_undecodable(broker: Broker, message: TaskMessage) -> None:
    """Replace a stored message by what another version of riverbed might store: a priority
    that is no number."""
    raw = msgspec.msgpack.encode([message.id, message.name, PAYLOAD, "default", "high"])
    if isinstance(broker, SqliteBroker):
        broker._conn.execute("UPDATE tasks SET message = ? WHERE id = ?", (raw, message.id))
    else:
        assert isinstance(broker, RedisBroker)
        broker._redis.hset(broker._key("t", message.id), "message", raw)


def test_a_leased_task_whose_message_does_not_decode_is_dead_lettered_not_handed_on(
    broker: Broker,
) -> None:
    bad, good = task("from-another-version"), task()
    broker.enqueue([bad, good])
    store_undecodable(broker, bad)
    assert fetch(broker) == [good]
    info = broker.info([bad.id])[bad.id]
    assert info.state is TaskState.FAILED
    assert info.error is not None and info.error.type == "UndecodableTaskError"
    assert "high" in info.error.traceback  # the stored bytes, for a look
    assert [dead.message.name for dead in broker.dead()] == ["from-another-version (undecodable)"]
    assert broker.requeue() == [bad.id]  # runs nothing: no task has that name
    assert fetch(broker)[0].name == "from-another-version (undecodable)"


# Outcomes


def test_a_scheduled_outcome_retries_the_task_at_its_eta(broker: Broker) -> None:
    message = task()
    broker.enqueue([message])
    fetch(broker)
    retried = msgspec.structs.replace(message, attempt=1, eta_ms=now_ms() + 400)
    broker.finish(W1, [Outcome(retried, TaskState.SCHEDULED, error=BOOM)])
    info = broker.info([message.id])[message.id]
    assert (info.state, info.message, info.error, info.worker) == (
        TaskState.SCHEDULED,
        retried,
        BOOM,
        "",
    )
    assert fetch(broker) == []
    time.sleep(0.5)
    assert fetch(broker) == [retried]


def test_a_success_stores_its_result_and_its_follow_ups_together(broker: Broker) -> None:
    step, failing = task("step"), task("failing")
    broker.enqueue([step, failing])
    fetch(broker)
    next_step, never = task("next"), task("never")
    broker.finish(
        W1,
        [
            Outcome(step, TaskState.SUCCEEDED, result=b"\x2a", follow_ups=(next_step,)),
            Outcome(failing, TaskState.FAILED, error=BOOM, follow_ups=(never,)),
        ],
    )
    info = broker.info([step.id])[step.id]
    assert (info.state, info.result, info.worker) == (TaskState.SUCCEEDED, b"\x2a", W1)
    assert info.finished_ms >= info.started_ms > 0
    assert state_of(broker, next_step.id) is TaskState.QUEUED
    assert state_of(broker, never.id) is None
    assert fetch(broker) == [next_step]


def test_an_expired_outcome_finishes_the_task(broker: Broker) -> None:
    message = task()
    broker.enqueue([message])
    fetch(broker)
    late = ErrorInfo("TaskExpired", "not started before its expiry")
    finish(broker, message, TaskState.EXPIRED, error=late)
    info = broker.wait([message.id], PATIENCE)[message.id]
    assert (info.state, info.error) == (TaskState.EXPIRED, late)


def test_finish_ignores_an_outcome_for_a_lost_lease(broker: Broker) -> None:
    message, never_fetched = task(), task()
    broker.enqueue([message])
    broker.fetch(W1, ["default"], 1, lease_ms=100)
    broker.enqueue([never_fetched])
    time.sleep(0.3)
    assert fetch(broker, W2, limit=1) == [message]
    follow_up = task("follow-up")
    finish(broker, message, worker=W1, result=b"stale", follow_ups=(follow_up,))
    finish(broker, never_fetched, worker=W1)
    info = broker.info([message.id])[message.id]
    assert (info.state, info.worker) == (TaskState.RUNNING, W2)
    assert state_of(broker, follow_up.id) is None
    assert state_of(broker, never_fetched.id) is TaskState.QUEUED
    finish(broker, message, worker=W2, result=b"fresh")
    assert broker.info([message.id])[message.id].result == b"fresh"


# Dead letters


def test_failed_tasks_wait_in_the_dead_letter_queue_until_requeued(broker: Broker) -> None:
    first, second = task(), task()
    broker.enqueue([first, second])
    fetch(broker)
    broker.finish(
        W1,
        [
            Outcome(msgspec.structs.replace(first, attempt=2), TaskState.FAILED, error=BOOM),
            Outcome(second, TaskState.FAILED, error=BOOM),
        ],
    )
    dead = broker.dead()
    assert {info.id for info in dead} == {first.id, second.id}
    assert all(info.error == BOOM and info.state is TaskState.FAILED for info in dead)
    assert broker.stats().dead == 2
    assert broker.requeue([first.id, "unknown"]) == [first.id]
    info = broker.info([first.id])[first.id]
    assert (info.state, info.message.attempt, info.error) == (TaskState.QUEUED, 0, None)
    assert broker.wait([first.id], 0.3) == {}  # its earlier finish wakes no one now
    assert broker.requeue() == [second.id]
    assert broker.dead() == []
    assert broker.requeue() == []
    assert sorted(ids(fetch(broker))) == sorted([first.id, second.id])


def test_finished_tasks_expire_and_the_footprint_returns_to_its_baseline(
    open_broker: OpenBroker,
) -> None:
    broker = open_broker(result_ttl="0.5", dead_ttl="0.5")

    def one_of_everything() -> list[str]:
        chord_ok, chord_bad = new_task_id(), new_task_id()
        heads_ok = [task(chord=chord_ok) for _ in range(2)]
        heads_bad = [task(chord=chord_bad) for _ in range(2)]
        callback_ok, callback_bad = task("callback"), task("callback")
        plain, keyed, failing, cancelled = task(), task(key=new_task_id()), task(), task()
        follow_up = task("follow-up")
        broker.enqueue(heads_ok, ChordSpec(chord_ok, 2, callback_ok))
        broker.enqueue(heads_bad, ChordSpec(chord_bad, 2, callback_bad))
        broker.enqueue([plain, keyed, failing, cancelled])
        broker.cancel(cancelled.id)
        assert broker.lead(W1, 300)
        outcomes = [Outcome(m, TaskState.SUCCEEDED) for m in [*heads_ok, heads_bad[1], keyed]]
        outcomes += [
            Outcome(plain, TaskState.SUCCEEDED, follow_ups=(follow_up,)),
            Outcome(failing, TaskState.FAILED, error=BOOM),
            Outcome(heads_bad[0], TaskState.FAILED, error=BOOM),
        ]
        assert len(fetch(broker)) == len(outcomes)
        broker.finish(W1, outcomes)
        assert sorted(ids(fetch(broker))) == sorted([callback_ok.id, follow_up.id])
        broker.finish(W1, [Outcome(callback_ok, TaskState.SUCCEEDED)])
        broker.finish(W1, [Outcome(follow_up, TaskState.SUCCEEDED)])
        everything = [*heads_ok, *heads_bad, plain, keyed, failing, cancelled, follow_up]
        assert broker.extend(W1, [], LEASE) == Heartbeat()
        return [*ids(everything), callback_ok.id, callback_bad.id]

    one_of_everything()  # the first round creates what stays: counters, queue names, workers
    time.sleep(1.0)
    broker.housekeep()
    baseline = broker.footprint()
    task_ids = one_of_everything()
    assert broker.footprint() > baseline
    assert len(broker.info(task_ids)) == len(task_ids)
    time.sleep(1.0)
    broker.housekeep()
    assert broker.info(task_ids) == {}
    assert broker.dead() == []
    assert broker.list_tasks() == []
    assert broker.footprint() == baseline


# Cancelling


def test_cancel_in_every_state(broker: Broker) -> None:
    running = task()
    broker.enqueue([running])
    fetch(broker)
    queued, scheduled = task(), task(eta_ms=now_ms() + 60_000)
    broker.enqueue([queued, scheduled])

    assert broker.cancel(queued.id) is TaskState.CANCELLED
    assert broker.cancel(scheduled.id) is TaskState.CANCELLED
    assert broker.wait([queued.id, scheduled.id], PATIENCE).keys() == {queued.id, scheduled.id}
    assert fetch(broker) == []
    assert broker.info([queued.id])[queued.id].error is not None

    assert broker.cancel(running.id) is TaskState.RUNNING
    assert broker.info([running.id])[running.id].cancel_requested
    assert broker.extend(W1, [running.id], LEASE) == Heartbeat(cancelled=frozenset({running.id}))
    finish(broker, running, TaskState.CANCELLED, error=ErrorInfo("TaskCancelled", "interrupted"))
    info = broker.info([running.id])[running.id]
    assert (info.state, info.cancel_requested) == (TaskState.CANCELLED, False)

    assert broker.cancel(running.id) is TaskState.CANCELLED
    assert broker.cancel("unknown") is None
    assert broker.stats().queues == {}


def test_a_cancel_request_outlives_no_run(broker: Broker) -> None:
    """A finished task forgets its cancel request, and a succeeded one cannot be cancelled."""
    message = task()
    broker.enqueue([message])
    fetch(broker)
    broker.cancel(message.id)
    finish(broker, message)
    info = broker.info([message.id])[message.id]
    assert (info.state, info.cancel_requested) == (TaskState.SUCCEEDED, False)
    assert broker.cancel(message.id) is TaskState.SUCCEEDED


def test_a_task_cancelled_while_running_is_not_retried(broker: Broker) -> None:
    """It failed, to be retried, before its worker heard of the cancel: it ends cancelled."""
    plain = task()
    headers, callback = chord(broker, 2)
    broker.enqueue([plain])
    fetch(broker)
    for message in (plain, headers[0]):
        assert broker.cancel(message.id) is TaskState.RUNNING
        retried = msgspec.structs.replace(message, attempt=1, eta_ms=now_ms() + 100)
        broker.finish(W1, [Outcome(retried, TaskState.SCHEDULED, error=BOOM)])
        info = broker.info([message.id])[message.id]
        assert info.state is TaskState.CANCELLED
        assert info.error is not None and "not retried" in info.error.message
    time.sleep(0.2)
    assert fetch(broker) == []  # the retry was never scheduled
    assert state_of(broker, callback.id) is TaskState.FAILED  # the chord heard of it


def test_a_cancel_asked_of_a_task_whose_worker_went_away_holds(broker: Broker) -> None:
    message = task()
    broker.enqueue([message])
    broker.fetch(W1, ["default"], 10, 300)  # W1 leases it for 0.3 s, then goes away
    assert broker.cancel(message.id) is TaskState.RUNNING
    time.sleep(0.4)
    assert fetch(broker, W2) == []  # not run again
    info = broker.wait([message.id], PATIENCE)[message.id]
    assert info.state is TaskState.CANCELLED


# Chains


@pytest.mark.parametrize(
    "ending",
    ["failed", "cancelled", "cancelled while running", "cancelled, its worker gone", "purged"],
)
def test_a_chains_later_steps_fail_when_a_step_does_not_succeed(
    broker: Broker, ending: str
) -> None:
    later = (task("second"), task("third"))
    step = task("first", link=later)
    broker.enqueue([step])
    if ending == "cancelled, its worker gone":
        broker.fetch(W1, ["default"], 10, 300)  # W1 leases it for 0.3 s, then goes away
        assert broker.cancel(step.id) is TaskState.RUNNING
        time.sleep(0.4)
        assert fetch(broker, W2) == []  # the fetch that finds the lapsed lease finishes it
    elif ending == "failed":
        fetch(broker)
        finish(broker, step, TaskState.FAILED, error=ErrorInfo("KeyError", "no such sku"))
    elif ending == "cancelled":
        assert broker.cancel(step.id) is TaskState.CANCELLED
    elif ending == "purged":
        assert broker.purge("default") == 1
    else:
        fetch(broker)
        broker.cancel(step.id)
        retried = msgspec.structs.replace(step, attempt=1, eta_ms=now_ms())
        broker.finish(W1, [Outcome(retried, TaskState.SCHEDULED, error=BOOM)])
    found = broker.wait(ids(later), PATIENCE)
    for message in later:
        info = found[message.id]
        assert info.state is TaskState.FAILED
        assert info.error is not None and info.error.type == "ChainStepFailed"
        assert f"step first[{step.id}] of its chain ended" in info.error.message
    if ending == "failed":
        assert "no such sku" in found[later[-1].id].error.message  # type: ignore[union-attr]
    if ending == "cancelled, its worker gone":
        assert "went away" in found[later[-1].id].error.message  # type: ignore[union-attr]
    if ending == "purged":
        assert "purged from its queue" in found[later[-1].id].error.message  # type: ignore[union-attr]
    assert fetch(broker) == []  # none of them runs


def test_a_requeued_chain_step_makes_its_later_steps_wait_again(broker: Broker) -> None:
    """Not still failed from its last run: the chain's handle waits on its last step."""
    later = (task("second"), task("third"))
    step = task("first", link=later)
    broker.enqueue([step])
    for _ in range(2):  # each failure records them again
        leased = fetch(broker)
        assert [message.id for message in leased] == [step.id]
        finish(broker, leased[0], TaskState.FAILED, error=BOOM)
        states = {info.state for info in broker.wait(ids(later), PATIENCE).values()}
        assert states == {TaskState.FAILED}
        assert broker.requeue([step.id]) == [step.id]
        assert broker.info(ids(later)) == {}
        assert broker.wait(ids(later), 0.2) == {}


# Chords


def chord(broker: Broker, size: int) -> tuple[list[TaskMessage], TaskMessage]:
    chord_id = new_task_id()
    headers = [task("header", chord=chord_id) for _ in range(size)]
    callback = task("callback", gather=tuple(ids(headers)))
    broker.enqueue(headers, ChordSpec(chord_id, size, callback))
    return headers, callback


def test_a_chord_callback_is_enqueued_when_every_header_succeeded(broker: Broker) -> None:
    headers, callback = chord(broker, 3)
    assert fetch(broker) == headers
    for header in headers[:2]:
        finish(broker, header)
    assert state_of(broker, callback.id) is None
    assert fetch(broker) == []
    finish(broker, headers[2])
    assert state_of(broker, callback.id) is TaskState.QUEUED
    assert fetch(broker) == [callback]


def test_a_chord_callback_fails_when_a_header_fails(broker: Broker) -> None:
    headers, callback = chord(broker, 2)
    fetch(broker)
    finish(broker, headers[0], TaskState.FAILED, error=ErrorInfo("KeyError", "no such sku"))
    info = broker.wait([callback.id], PATIENCE)[callback.id]
    assert info.state is TaskState.FAILED
    assert info.error is not None
    assert headers[0].id in info.error.message
    assert "no such sku" in info.error.message
    assert callback.id in {dead.id for dead in broker.dead()}
    finish(broker, headers[1])
    assert state_of(broker, callback.id) is TaskState.FAILED
    assert fetch(broker) == []


def test_purging_a_chords_header_fails_its_callback(broker: Broker) -> None:
    _, callback = chord(broker, 2)
    assert broker.purge("default") == 2
    info = broker.wait([callback.id], PATIENCE)[callback.id]
    assert info.state is TaskState.FAILED
    assert info.error is not None and "purged" in info.error.message
    assert fetch(broker) == []


def test_cancelling_a_queued_header_fails_the_chord(broker: Broker) -> None:
    headers, callback = chord(broker, 2)
    assert broker.cancel(headers[1].id) is TaskState.CANCELLED
    info = broker.wait([callback.id], PATIENCE)[callback.id]
    assert info.state is TaskState.FAILED
    assert info.error is not None and headers[1].id in info.error.message


# Waiting for results


def test_wait_returns_promptly_when_the_task_finishes(
    broker: Broker, open_broker: OpenBroker
) -> None:
    message = task()
    broker.enqueue([message])
    fetch(broker)
    waiter = open_broker()
    join = in_thread(partial(waiter.wait, [message.id], PATIENCE))
    time.sleep(0.3)
    finish(broker, message, result=b"done")
    infos, elapsed = join()
    assert infos[message.id].result == b"done"
    assert elapsed < PROMPT


def test_every_waiter_of_a_task_wakes(broker: Broker, open_broker: OpenBroker) -> None:
    message = task()
    broker.enqueue([message])
    fetch(broker)
    joins = [in_thread(partial(open_broker().wait, [message.id], PATIENCE)) for _ in range(3)]
    time.sleep(0.3)
    finish(broker, message)
    for join in joins:
        infos, elapsed = join()
        assert infos[message.id].state is TaskState.SUCCEEDED
        assert elapsed < PROMPT


def test_wait_gives_up_after_its_timeout_with_what_finished(broker: Broker) -> None:
    done, pending = task(), task()
    broker.enqueue([done, pending])
    fetch(broker, limit=1)
    finish(broker, done)
    infos, elapsed = timed(lambda: broker.wait([done.id], PATIENCE))
    assert infos.keys() == {done.id}
    assert elapsed < PROMPT
    for unfinished in (pending.id, "unknown"):
        infos, elapsed = timed(lambda: broker.wait([done.id, unfinished], 0.3))  # noqa: B023
        assert infos.keys() == {done.id}
        assert 0.25 <= elapsed < PROMPT


def test_wait_wakes_for_a_task_enqueued_after_it_began(
    broker: Broker, open_broker: OpenBroker
) -> None:
    step, next_step = task("step"), task("next")
    broker.enqueue([step])
    join = in_thread(partial(open_broker().wait, [next_step.id], PATIENCE))
    time.sleep(0.3)
    fetch(broker)
    finish(broker, step, follow_ups=(next_step,))
    assert fetch(broker) == [next_step]
    finish(broker, next_step, result=b"last")
    infos, elapsed = join()
    assert infos[next_step.id].result == b"last"
    assert elapsed < PROMPT


# Inspection


def test_list_tasks_filters_by_state_and_queue_oldest_first(broker: Broker) -> None:
    queued = task(queue="a")
    scheduled = task(queue="a", eta_ms=now_ms() + 60_000)
    running, succeeded, failed = (task(queue="a", priority=9) for _ in range(3))
    elsewhere = task(queue="b")
    everything = [queued, scheduled, running, succeeded, failed, elsewhere]
    broker.enqueue(everything)
    fetch(broker, queues=["a"], limit=3)
    finish(broker, succeeded)
    finish(broker, failed, TaskState.FAILED, error=BOOM)

    assert ids([info.message for info in broker.list_tasks()]) == ids(everything)
    assert [info.id for info in broker.list_tasks(limit=2)] == ids(everything[:2])
    assert [info.id for info in broker.list_tasks(TaskState.QUEUED)] == [queued.id, elsewhere.id]
    assert [info.id for info in broker.list_tasks(queue="b")] == [elsewhere.id]
    for message, state in [
        (scheduled, TaskState.SCHEDULED),
        (running, TaskState.RUNNING),
        (succeeded, TaskState.SUCCEEDED),
        (failed, TaskState.FAILED),
    ]:
        assert [info.id for info in broker.list_tasks(state, "a")] == [message.id]
    assert broker.list_tasks(TaskState.CANCELLED) == []
    assert broker.list_tasks(TaskState.QUEUED, "nowhere") == []


def test_stats_count_tasks_per_queue_and_state(broker: Broker) -> None:
    assert broker.stats().queues == {}
    running, failed = task(queue="a", priority=9), task(queue="a", priority=9)
    broker.enqueue([running, failed, task(queue="a"), task(queue="a", eta_ms=now_ms() + 60_000)])
    broker.enqueue([task(queue="b") for _ in range(2)])
    fetch(broker, queues=["a"], limit=2)
    finish(broker, failed, TaskState.FAILED, error=BOOM)
    broker.extend(W1, [running.id], LEASE)
    stats = broker.stats()
    assert {name: msgspec.structs.astuple(counts) for name, counts in stats.queues.items()} == {
        "a": (1, 1, 1),
        "b": (2, 0, 0),
    }
    assert stats.dead == 1
    assert W1 in stats.workers
    broker.leave(W1)  # a worker that stopped is not listed until its last beat expires
    assert W1 not in broker.stats().workers


def test_purge_deletes_the_queued_and_scheduled_tasks_of_one_queue(broker: Broker) -> None:
    running = task(queue="a", priority=9)
    doomed = [task(queue="a") for _ in range(3)]
    doomed += [task(queue="a", eta_ms=now_ms() + 60_000) for _ in range(2)]
    spared = task(queue="b")
    broker.enqueue([running, *doomed, spared])
    fetch(broker, queues=["a"], limit=1)
    assert broker.purge("a") == 5
    assert broker.info(ids(doomed)) == {}
    assert state_of(broker, running.id) is TaskState.RUNNING
    assert state_of(broker, spared.id) is TaskState.QUEUED
    assert broker.purge("a") == 0
    assert fetch(broker, queues=["a"]) == []


def test_purge_deletes_a_task_whose_message_does_not_decode_and_says_so(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    bad, good = task("from-another-version"), task()
    broker.enqueue([bad, good])
    store_undecodable(broker, bad)
    with caplog.at_level(logging.WARNING):
        assert broker.purge("default") == 2
    assert broker.info([bad.id, good.id]) == {}
    assert f"purged task {bad.id} (from-another-version), whose message does not decode" in (
        caplog.text
    )


def test_purge_frees_the_idempotency_keys_of_what_it_deleted(broker: Broker) -> None:
    first = task(key="nightly-report")
    broker.enqueue([first])
    assert broker.purge("default") == 1
    second = task(key="nightly-report")
    assert broker.enqueue([second]) == [second.id]


def test_enqueueing_an_id_again_changes_nothing(broker: Broker) -> None:
    message = task()
    assert broker.enqueue([message]) == [message.id]
    assert broker.enqueue([message]) == [message.id]
    assert fetch(broker) == [message]


# Rate limits, leadership and schedules


def test_a_token_bucket_grants_what_it_holds_and_refills_at_its_rate(broker: Broker) -> None:
    assert broker.take_tokens("api", rate=10, capacity=5, wanted=3) == (3, 0.0)
    granted, wait = broker.take_tokens("api", rate=10, capacity=5, wanted=5)
    assert granted == 2
    assert 0 < wait <= 0.1
    assert broker.take_tokens("api", rate=10, capacity=5, wanted=1)[0] == 0
    time.sleep(0.35)
    granted, _ = broker.take_tokens("api", rate=10, capacity=5, wanted=5)
    assert 3 <= granted <= 5
    assert broker.take_tokens("other", rate=1, capacity=1, wanted=1)[0] == 1


def test_the_leader_lease_is_exclusive_until_its_worker_leaves_or_it_expires(
    broker: Broker,
) -> None:
    assert broker.lead("a", 60_000)
    assert not broker.lead("b", 60_000)
    broker.leave("b")  # not the holder: nothing happens
    assert broker.lead("a", 60_000)
    broker.leave("a")
    assert broker.lead("b", 300)
    assert not broker.lead("a", 60_000)
    time.sleep(0.5)
    assert broker.lead("a", 60_000)
    assert not broker.lead("b", 60_000)


def test_each_tick_is_claimed_once_by_concurrent_claimers(
    broker: Broker, open_broker: OpenBroker
) -> None:
    claimers = [open_broker() for _ in range(5)]
    ticks = [1_700_000_000_000 + 60_000 * n for n in range(10)]
    barrier = threading.Barrier(len(claimers))
    claims: list[int] = []
    lock = threading.Lock()

    def claim(claimer: Broker) -> None:
        for tick in ticks:
            barrier.wait(PATIENCE)
            if claimer.claim_tick("hourly", tick, task("report")):
                with lock:
                    claims.append(tick)

    threads = [threading.Thread(target=claim, args=(claimer,)) for claimer in claimers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claims) == ticks
    assert broker.last_tick("hourly") == ticks[-1]
    assert broker.last_tick("never") == 0
    assert not broker.claim_tick("hourly", ticks[3], task("report"))
    assert len(fetch(broker)) == len(ticks)


# URLs and connections


def test_an_unknown_url_option_is_refused(broker_url: str) -> None:
    with pytest.raises(InvalidUrlError, match="bogus"):
        connect_broker(broker_url + ("&" if "?" in broker_url else "?") + "bogus=1")


@pytest.mark.parametrize(
    "option", ["result_ttl=0", "result_ttl=0.0001", "dead_ttl=inf", "dead_ttl=1e400",
               "result_ttl=1e17", "result_ttl=nan"],
)  # fmt: skip
def test_a_ttl_option_must_be_from_a_millisecond_to_a_century(broker_url: str, option: str) -> None:
    name = option.partition("=")[0]
    with pytest.raises(InvalidUrlError, match=rf"{name}=.*from 0.001 to"):
        connect_broker(broker_url + ("&" if "?" in broker_url else "?") + option)


@pytest.mark.parametrize("path", ["/abc", "/1/2", "/%203"])
def test_a_redis_url_path_that_is_no_database_number_is_refused(path: str) -> None:
    with pytest.raises(InvalidUrlError, match="is not a database number"):
        connect_broker(f"redis://127.0.0.1:1{path}")


# Redis only: connection failures and the server's script cache


@pytest.mark.parametrize("scheme", ["redis", "rediss"])  # rediss: over TLS
def test_an_unreachable_redis_fails_fast(scheme: str) -> None:
    start = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match="cannot reach the Redis task broker"):
        connect_broker(f"{scheme}://127.0.0.1:{free_port()}/0")
    assert time.monotonic() - start < PROMPT


def test_a_lost_redis_raises_broker_unavailable(redis_url: str, tmp_path: Path) -> None:
    server = start_redis(tmp_path)
    try:
        broker = connect_broker(f"{server.url}?prefix=lost")
        broker.enqueue([task()])
    finally:
        server.stop()
    with pytest.raises(BrokerUnavailableError, match="did not answer"):
        broker.stats()
    with pytest.raises(BrokerUnavailableError):
        broker.fetch(W1, ["default"], 1, LEASE, timeout=1.0)
    broker.close()


def test_a_redis_that_dropped_its_clients_and_scripts_is_used_again(redis_url: str) -> None:
    """What a restarted server looks like: connections closed, script cache empty."""
    import redis

    broker = connect_broker(f"{redis_url}?prefix=test-{new_task_id()}")
    message = task()
    broker.enqueue([message])
    admin = redis.Redis.from_url(redis_url)
    admin.script_flush()
    assert admin.client_kill_filter(_type="normal") >= 1
    admin.close()
    assert fetch(broker) == [message]
    broker.close()


def test_a_redis_out_of_memory_is_an_outage_waited_out_not_a_crash(redis_url: str) -> None:
    import redis

    broker = connect_broker(f"{redis_url}?prefix=test-{new_task_id()}")
    admin = redis.Redis.from_url(redis_url)
    try:
        admin.config_set("maxmemory", 1)  # below what it uses: every write refused (OOM)
        with pytest.raises(BrokerUnavailableError, match=r"refuses writes for now .*> 'maxmemory'"):
            broker.enqueue([task()])
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
    message = task()
    broker.enqueue([message])  # it recovered
    assert fetch(broker) == [message]
    broker.close()


@pytest.mark.parametrize(
    ("settings", "warning"),
    [
        (("--maxmemory-policy", "allkeys-lru"), "evicts keys when its memory is full"),
        ((), "keeps no append-only file (appendonly no)"),
    ],
)
def test_a_redis_configured_to_lose_tasks_is_warned_of(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    settings: tuple[str, ...],
    warning: str,
) -> None:
    server = start_redis(tmp_path, settings)
    try:
        with caplog.at_level(logging.WARNING, logger="riverbed.tasks.brokers.redis"):
            connect_broker(server.url).close()
            connect_broker(server.url).close()  # once per server
        assert caplog.text.count(warning) == 1
        (tmp_path / "durable").mkdir()
        durable = start_redis(tmp_path / "durable", ("--appendonly", "yes"))
        try:
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="riverbed.tasks.brokers.redis"):
                connect_broker(durable.url).close()
            assert caplog.text == ""
        finally:
            durable.stop()
    finally:
        server.stop()
