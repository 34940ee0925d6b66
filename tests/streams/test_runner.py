"""Pipelines run on the log, at least once, on every backend."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

import riverbed
from riverbed.log.errors import CommitFailedError
from riverbed.log.sqlite import groups
from riverbed.log.sqlite.producer import CHECKPOINT_BYTES
from riverbed.streams.app import stopping_on_signals
from riverbed.testing import run_app
from tests.support import consume, running, wait_until


class Payment(msgspec.Struct):
    card: str
    amount: int


class Alert(msgspec.Struct):
    card: str
    amount: int


def fraud_app(url: str, source: str, target: str) -> riverbed.App:
    app = riverbed.App(f"fraud-{source}", url=url)
    payments = app.topic(source, partitions=2, value=Payment, key=str)
    alerts = app.topic(target, partitions=2, value=Alert, key=str)
    app.stream(payments).filter(lambda p: p.amount > 100).map(lambda p: Alert(p.card, p.amount)).to(
        alerts
    )
    return app


def test_pipeline_processes_commits_and_parks_bad_records(
    log_url: str, topic_name: Callable[[str], str]
) -> None:
    source, target = topic_name("payments"), topic_name("alerts")
    with fraud_app(log_url, source, target) as app:
        app.start()
        with app.log.producer() as producer:
            for i in range(200):
                key, value, _ = app.topics[source].encode(Payment(f"c{i}", i), key=f"c{i}")
                producer.send(source, value, key=key)
            producer.send(source, b"{not json", key=b"c-bad")
        with running(app):
            wait_until(lambda: _lag(app) == 0, 60, "lag 0")
        with app.log.consumer(topics=[target], from_beginning=True) as consumer:
            alerts = [app.topics[target].decode(r).value for r in consume(consumer, 99)]
        assert sorted(a.amount for a in alerts) == list(range(101, 200))
        with app.log.consumer(topics=[source + ".dlq"], from_beginning=True) as consumer:
            (parked,) = consume(consumer, 1)
        assert parked.key == b"c-bad"
        assert b"not a valid Payment" in parked.headers["riverbed-error"]

    # A restart goes on from the committed offsets: only new records are processed.
    with fraud_app(log_url, source, target) as app:
        app.start()
        app.topics[source].send(app.producer, Payment("late", 1000), key="late").result()
        with running(app):
            wait_until(lambda: _lag(app) == 0, 60, "lag 0")
        with app.log.consumer(topics=[target], from_beginning=True) as consumer:
            assert len(consume(consumer, 100)) == 100
            assert consumer.poll(timeout=1.0) == []  # exactly once: nothing more


def _lag(app: riverbed.App) -> int:
    """The group's lag over the app's input (once the group has committed for all of it)."""
    try:
        lag = app.log.group_lag(app.name)
    except riverbed.UnknownGroupError:
        return -1
    return sum(lag.values()) if len(lag) == 2 else -1


def test_an_app_without_pipelines_says_so() -> None:
    app = riverbed.App("empty", url="sqlite:///never-opened.db")
    with pytest.raises(riverbed.RiverbedError, match="has no pipeline or handler to run"):
        app.run()


def test_run_gives_the_signal_handlers_back(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with fraud_app(f"sqlite:///{tmp_path}/log.db", "payments", "alerts") as app:
        stop = threading.Event()
        stop.set()  # nothing to do: start, join, leave
        app.run(stop)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_the_producer_thread_checkpoints_the_embedded_log(tmp_path: Path) -> None:
    """A runner commits through its producer many times a second: the WAL is copied into the
    database file by the producer's thread once its appends pass CHECKPOINT_BYTES, not by
    SQLite inside one of those commits (which it would do only past 1,000 pages, 16 MiB)."""
    path = tmp_path / "log.db"
    log = riverbed.connect(f"sqlite:///{path}")
    try:
        log.create_topic("big", partitions=1)
        before = path.stat().st_size
        value = b"x" * 10_000
        with log.producer() as producer:
            producer.send_many("big", [(None, value)] * (CHECKPOINT_BYTES // len(value) + 10))
            producer.flush()
            wait_until(
                lambda: path.stat().st_size > before + CHECKPOINT_BYTES,
                timeout=10,
                what="the producer's thread to checkpoint the WAL",
            )
    finally:
        log.close()


def test_at_least_once_state_commits_with_the_offsets_on_the_embedded_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose offsets fail to commit leaves no state behind either: the batch runs again
    on the state it started from, so a count is not counted twice."""
    app = riverbed.App("counts", exactly_once=False, state_dir=tmp_path)
    words = app.topic("words", value=str, key=str)
    totals = app.topic("totals", value=int, key=str)
    app.stream(words).count(name="counts").to(totals)
    store_offsets = groups.store_offsets
    failures = [CommitFailedError("the group rebalanced (injected)")]

    def failing_once(*args: Any, **kwargs: Any) -> None:
        if failures:
            raise failures.pop()
        store_offsets(*args, **kwargs)

    monkeypatch.setattr(groups, "store_offsets", failing_once)
    result = run_app(app, {words: [("a", "x"), ("a", "y"), ("b", "z")]})
    assert not failures
    assert result.state["counts"] == {"a": (2,), "b": (1,)}


def test_a_signal_that_comes_while_the_main_thread_holds_stops_lock_still_stops() -> None:
    """A second Ctrl-C (a terminal's and a parent worker's) lands inside the first one's
    Event.set, or any signal inside Event.wait: the handler must not wait on stop's lock."""
    stop = threading.Event()
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a shell's background job
    with stopping_on_signals(stop):
        handler = signal.getsignal(signal.SIGINT)
        assert callable(handler)
        with stop._cond:  # type: ignore[attr-defined]  # as the interrupted Event.set holds it
            handler(signal.SIGINT, None)
            handler(signal.SIGTERM, None)
        assert stop.wait(5)
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_records_out_counts_writes_to_internal_topics_too(tmp_path: Path) -> None:
    """A key_by's repartition topic and an interval join's topic are written like any output:
    the records-out metric counts them per topic, as records-in counts reading them."""
    from riverbed.streams.metrics import RunnerMetrics

    app = riverbed.App("shop", url=f"sqlite:///{tmp_path}/log.db", state_dir=tmp_path / "state")
    views = app.topic("views", value=str, key=str)
    buys = app.topic("buys", value=str, key=str)
    counts = app.topic("counts", value=int, key=str)
    matched = app.topic("matched", value=str, key=str)
    app.stream(views).key_by(lambda view: view).count().to(counts)
    app.stream(views).join(app.stream(buys), lambda v, b: f"{v}->{b}", within=5).to(matched)
    metrics = RunnerMetrics(app.name)
    with app:
        app.start()
        for key, view in (("u1", "shoes"), ("u2", "hat")):
            views.send(app.producer, view, key=key)
        buys.send(app.producer, "shoes!", key="u1")
        app.producer.flush()
        with app.runner(metrics) as runner:
            while runner.run_once(0.2) or runner.run_once(0.2):
                pass
    written = {
        sample.labels["topic"]: sample.value
        for metric in metrics.registry.collect()
        if metric.name == "riverbed_records_out"
        for sample in metric.samples
        if sample.name == "riverbed_records_out_total"
    }
    # The join writes each side's record; the repartition, one record per run of items.
    assert written == {"counts": 2, "matched": 1, "shop-join-2": 3, "shop-repartition-0": 1}
