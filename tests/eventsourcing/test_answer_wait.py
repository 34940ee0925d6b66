"""How the sync PostgreSQL store waits for an append's answer: it polls without sleeping for up
to ``spin_us`` while answers come that fast, and sleeps otherwise (spinning.py)."""

from __future__ import annotations

import os
import select
import time
import uuid
from typing import Any

import pytest

from riverbed.eventsourcing.stores import connect_store
from riverbed.eventsourcing.stores.postgres import spinning
from riverbed.eventsourcing.stores.postgres.spinning import SPIN_US, AnswerWait
from tests.eventsourcing.test_store_contract import append_to, positions

READY = [(3, select.POLLIN)]


class Poller:
    """A stand-in for ``select.poll()``: the socket is readable from the ``ready_after``-th
    non-blocking poll on, and a blocking poll takes ``sleep`` seconds. ``calls`` holds each
    poll's timeout (None: blocking)."""

    def __init__(self, ready_after: int | None = None, sleep: float = 0.0) -> None:
        self.ready_after = ready_after
        self.sleep = sleep
        self.calls: list[float | None] = []

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        self.calls.append(timeout)
        if timeout is None:
            time.sleep(self.sleep)
            return READY
        polled = self.calls.count(0)
        return READY if self.ready_after is not None and polled >= self.ready_after else []


def waited(answers: AnswerWait, poller: Poller) -> list[float | None]:
    answers.wait(poller)  # type: ignore[arg-type]
    return poller.calls


def test_an_answer_within_the_spin_is_polled_for_without_sleeping() -> None:
    answers = AnswerWait(SPIN_US, cpus=2)
    assert waited(answers, Poller(ready_after=3)) == [0, 0, 0]


def test_an_answer_later_than_the_spin_is_slept_for() -> None:
    answers = AnswerWait(50, cpus=2)
    calls = waited(answers, Poller())
    assert calls[-1] is None and len(calls) > 1 and set(calls[:-1]) == {0}


@pytest.mark.parametrize(("spin_us", "cpus"), [(0, 2), (SPIN_US, 1)])
def test_no_spin_is_asked_for_or_a_single_cpu_sleeps_at_once(spin_us: int, cpus: int) -> None:
    """A process allowed one CPU would spin on the CPU a server beside it needs."""
    assert waited(AnswerWait(spin_us, cpus=cpus), Poller(ready_after=1)) == [None]


def test_while_another_thread_spins_it_sleeps_at_once() -> None:
    """Appends from several threads wait for each other on the server anyway."""
    with spinning._spinning:
        assert waited(AnswerWait(SPIN_US, cpus=2), Poller(ready_after=1)) == [None]
    assert waited(AnswerWait(SPIN_US, cpus=2), Poller(ready_after=1)) == [0]


def test_a_child_forked_while_a_thread_spun_spins_itself() -> None:
    with spinning._spinning:
        child = os.fork()
        if child == 0:
            spins = waited(AnswerWait(SPIN_US, cpus=2), Poller(ready_after=1)) == [0]
            os._exit(0 if spins else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_while_answers_come_slower_than_the_spin_it_sleeps_at_once_then_spins_again() -> None:
    answers = AnswerWait(SPIN_US, cpus=2)
    for _ in range(8):  # slow answers: a server far away, or busy
        answers.wait(Poller(sleep=0.005))  # type: ignore[arg-type]
    assert waited(answers, Poller(ready_after=1)) == [None]
    for _ in range(10):  # fast answers bring the running average back under the spin
        answers.wait(Poller(ready_after=1))  # type: ignore[arg-type]
    assert waited(answers, Poller(ready_after=1)) == [0]


def test_one_slow_answer_does_not_stop_the_spin() -> None:
    """A wait for a lock, say: the answers after it come fast again."""
    answers = AnswerWait(SPIN_US, cpus=2)
    answers.wait(Poller(sleep=0.05))  # type: ignore[arg-type]
    assert waited(answers, Poller(ready_after=1)) == [0]


def test_the_cpus_a_process_may_use_are_its_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    """``taskset -c 0`` on a machine of many CPUs leaves the process one."""
    monkeypatch.setattr(spinning.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(spinning.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert spinning.usable_cpus() == 1
    assert AnswerWait(SPIN_US).spin_s == 0


def test_spin_us_in_the_url_sets_the_stores_spin(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spins: list[float] = []
    wait = AnswerWait.wait

    def recorded(self: AnswerWait, poller: Any) -> None:
        spins.append(self.spin_s)
        wait(self, poller)

    monkeypatch.setattr(spinning, "usable_cpus", lambda: 2)
    monkeypatch.setattr(AnswerWait, "wait", recorded)
    for spin_us, spin_s in [("", SPIN_US / 1e6), ("&spin_us=0", 0.0), ("&spin_us=50", 50e-6)]:
        store = connect_store(f"{postgres_url}?schema=spin_{uuid.uuid4().hex[:8]}{spin_us}")
        try:
            spins.clear()
            assert append_to(store, "s", 0, 3) == 3
            assert positions(store.read_all()) == [1, 2, 3]
            assert spins and set(spins) == {spin_s}
        finally:
            store.close()
