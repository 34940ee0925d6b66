"""Stateful operators on both backends, through riverbed.testing.run_app: key_by, branch, merge,
every window kind with grace and late records, aggregators, and joins."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

import riverbed
from riverbed.log.sqlite import SqliteLog
from riverbed.testing import run_app

W = riverbed.Windowed


class Payment(msgspec.Struct):
    card: str
    amount: float
    ts: int = 0


Names = Callable[[str], str]
BASE_MS = 1_700_000_000_000  # record timestamps are epoch ms; Kafka takes 0 to mean "now"


def T(ms: int) -> int:  # noqa: N802
    return BASE_MS + ms


def send_then_run(
    app: riverbed.App, topic: riverbed.Topic[str, Any], *rows: tuple[Any, int]
) -> int:
    """Send ``rows`` (value, ms from ``BASE_MS``) with key "k", then process until idle: a batch
    of their own. The records counted late."""
    for value, ms in rows:
        key, data, headers = topic.encode(value, "k")
        app.producer.send(topic.name, data, key=key, headers=headers, timestamp_ms=T(ms))
    app.producer.flush()
    # Done when polls stay empty: the embedded log answers at once, a broker needs longer.
    idle_s = 0.2 if isinstance(app.log, SqliteLog) else 2.0
    with app.runner() as runner:
        while runner.run_once(idle_s) or runner.run_once(idle_s):
            pass
        return runner.late


@pytest.fixture
def make_app(log_url: str, topic_name: Names, tmp_path: Path) -> Callable[[], riverbed.App]:
    return lambda: riverbed.App(topic_name("app"), url=log_url, state_dir=tmp_path / "state")


def test_tumbling_window_after_key_by_with_grace_and_late_output(
    make_app: Callable[[], riverbed.App], topic_name: Names, log_url: str
) -> None:
    app = make_app()
    payments = app.topic(topic_name("payments"), value=Payment)
    totals = app.topic(topic_name("totals"), partitions=2, value=W[dict[str, float]], key=str)
    late = app.topic(topic_name("late"), value=Payment, key=str)
    (
        app.stream(payments)
        .filter(lambda p: p.amount > 0)
        .key_by(lambda p: p.card, partitions=1)  # one partition, so one stream time
        .window(riverbed.tumbling(seconds=10), timestamp=lambda p: p.ts, grace=2, late=late)
        .aggregate(n=riverbed.count(), total=riverbed.sum(lambda p: p.amount))
        .to(totals)
    )
    rows = [
        Payment("a", 1, 1_000),
        Payment("b", 2, 2_000),
        Payment("a", -5, 3_000),  # filtered out
        Payment("a", 3, 9_999),
        Payment("a", 4, 10_000),  # the next window
        Payment("b", 5, 11_500),  # within grace of [0, 10 s): window 0 still open
        Payment("a", 6, 8_000),  # out of order, within grace: counted in [0, 10 s)
        Payment("b", 7, 12_000),  # stream time 12 s: [0, 10 s) closes
        Payment("a", 8, 5_000),  # late: its window closed
        Payment("b", 9, 40_000),  # closes [10 s, 20 s)
    ]
    result = run_app(app, {payments: [(None, p) for p in rows]}, url=log_url)
    windows = sorted(result.outputs[totals.name], key=lambda kv: (kv[1].start_ms, kv[0]))
    assert windows == [
        ("a", W(0, 10_000, {"n": 3, "total": 10.0})),
        ("b", W(0, 10_000, {"n": 1, "total": 2.0})),
        ("a", W(10_000, 20_000, {"n": 1, "total": 4.0})),
        ("b", W(10_000, 20_000, {"n": 2, "total": 12.0})),
    ]
    assert result.outputs[late.name] == [("a", Payment("a", 8, 5_000))]
    assert result.late == 1
    # Only the window [40 s, 50 s) of b is still open.
    (state,) = result.state.values()
    assert list(state) == [("b", 40_000)]


@pytest.mark.parametrize(
    ("spec", "closed_counts"),
    [(riverbed.tumbling(seconds=10), [1]), (riverbed.hopping(seconds=10, advance=5), [1, 1])],
    ids=["tumbling", "hopping"],
)
def test_a_batch_of_late_records_only_is_counted_late(
    make_app: Callable[[], riverbed.App],
    topic_name: Names,
    spec: Any,
    closed_counts: list[int],
) -> None:
    app = make_app()
    events = app.topic(topic_name("events"), value=int, key=str)
    counts = app.topic(topic_name("counts"), value=W[int], key=str)
    app.stream(events).window(spec).count().to(counts)

    with app:
        app.start()
        # Stream time 25 s: the windows of 1 s closed.
        assert send_then_run(app, events, (1, 1_000), (2, 25_000)) == 0
        assert send_then_run(app, events, (3, 2_000)) == 1  # alone in its batch, and late
        assert sum(app.log.group_lag(app.name).values()) == 0
        with app.log.consumer(topics=[counts.name], from_beginning=True) as consumer:
            closed = [counts.decode(record).value for record in consumer.poll(timeout=2.0)]
    assert [window.value for window in closed] == closed_counts  # the late one in none


def test_key_by_a_composite_key_then_aggregate(
    make_app: Callable[[], riverbed.App], topic_name: Names, log_url: str
) -> None:
    app = make_app()
    payments = app.topic(topic_name("payments"), value=Payment)
    counts = app.topic(topic_name("counts"), value=int, key=tuple[str, int])
    windowed = app.topic(topic_name("windowed"), value=W[int], key=tuple[str, int])
    by_card_and_size = app.stream(payments).key_by(lambda p: (p.card, int(p.amount) // 10))
    by_card_and_size.count().to(counts)
    by_card_and_size.window(riverbed.tumbling(seconds=10), timestamp=lambda p: p.ts).count().to(
        windowed
    )
    rows = [Payment("a", 1, T(0)), Payment("a", 2, T(1)), Payment("a", 15, T(2))]
    rows.append(Payment("b", 1, T(20_000)))  # closes the first window
    result = run_app(app, {payments: [(None, p) for p in rows]}, url=log_url)
    assert sorted(result.outputs[counts.name])[-2:] == [(("a", 1), 1), (("b", 0), 1)]
    assert (("a", 0), 2) in result.outputs[counts.name]
    assert sorted((key, w.value) for key, w in result.outputs[windowed.name]) == [
        (("a", 0), 2), (("a", 1), 1),
    ]  # fmt: skip


def test_records_written_by_to_keep_their_event_time(
    make_app: Callable[[], riverbed.App], topic_name: Names, log_url: str
) -> None:
    app = make_app()
    events = app.topic(topic_name("events"), value=int, key=str)
    kept = app.topic(topic_name("kept"), value=int, key=str)
    counts = app.topic(topic_name("counts"), value=W[int], key=str)
    direct = app.topic(topic_name("direct"), value=W[int], key=str)
    app.stream(events).filter(lambda v: v > 0).to(kept)  # a first stage
    app.stream(kept).window(riverbed.tumbling(seconds=10), emit="update").count().to(counts)
    app.stream(events).window(riverbed.tumbling(seconds=10), emit="update").count().to(direct)
    inputs = [("k", 1, T(1_000)), ("k", 1, T(4_000)), ("k", 1, T(15_000))]
    result = run_app(app, {events: inputs}, url=log_url)
    windows = sorted((w.start_ms, w.value) for _, w in result.outputs[counts.name])
    assert windows == sorted((w.start_ms, w.value) for _, w in result.outputs[direct.name])
    assert windows[-1] == (T(10_000), 1)  # by event time, not by when the first stage ran


def test_session_windows_do_not_depend_on_batching(
    make_app: Callable[[], riverbed.App], topic_name: Names
) -> None:
    rows = [(1, 1_000), (2, 5_200), (3, 1_900)]  # gap 1 s, grace 3 s: 3 is on time at 5.2 s
    found = []
    for batches in ([rows], [[row] for row in rows]):
        app = make_app()
        clicks = app.topic(topic_name("clicks"), value=int, key=str)
        sessions = app.topic(topic_name("sessions"), value=W[list[int]], key=str)
        app.stream(clicks).window(riverbed.session(seconds=1), grace=3).aggregate(
            riverbed.collect(state_type=int)
        ).to(sessions)
        with app:
            app.start()
            for batch in [*batches, [(99, 100_000)]]:  # the last closes every session
                send_then_run(app, clicks, *batch)
            with app.log.consumer(topics=[sessions.name], from_beginning=True) as consumer:
                windows = [sessions.decode(r).value for r in consumer.poll(timeout=2.0)]
        found.append(sorted((w.start_ms - BASE_MS, w.value) for w in windows))
    # 3 is on time at 5.2 s and joins the session of 1 s however the records were batched.
    assert found[0] == found[1] == [(1_000, [1, 3]), (5_200, [2])]


def test_hopping_windows(
    make_app: Callable[[], riverbed.App], topic_name: Names, log_url: str
) -> None:
    app = make_app()
    events = app.topic(topic_name("events"), value=int, key=str)
    counts = app.topic(topic_name("counts"), value=W[int], key=str)
    app.stream(events).window(riverbed.hopping(seconds=10, advance=5)).count().to(counts)
    inputs = [("k", 1, T(1_000)), ("k", 1, T(7_000)), ("k", 1, T(12_000)), ("k", 1, T(30_000))]
    result = run_app(app, {events: inputs}, url=log_url)
    assert result.outputs[counts.name] == [
        ("k", W(T(-5_000), T(5_000), 1)),
        ("k", W(T(0), T(10_000), 2)),
        ("k", W(T(5_000), T(15_000), 2)),
        ("k", W(T(10_000), T(20_000), 1)),
    ]


def test_session_windows_merge_and_close(
    make_app: Callable[[], riverbed.App], topic_name: Names, log_url: str
) -> None:
    app = make_app()
    clicks = app.topic(topic_name("clicks"), value=str, key=str)
    sessions = app.topic(topic_name("sessions"), value=W[list[str]], key=str)
    app.stream(clicks).window(riverbed.session(seconds=5)).aggregate(
        riverbed.collect(state_type=str)
    ).to(sessions)
    inputs = [
        ("u1", "home", T(0)),
        ("u1", "cart", T(8_000)),  # a new session: 8 s > 5 s gap
        ("u1", "item", T(4_000)),  # bridges the two: one session 0-8 s
        ("u2", "home", T(9_000)),
        ("u1", "pay", T(30_000)),  # closes u1's 0-8 s (8 + 5 <= 30) and u2's
    ]
    result = run_app(app, {clicks: inputs}, url=log_url)
    assert result.outputs[sessions.name] == [
        ("u1", W(T(0), T(8_001), ["home", "cart", "item"])),
        ("u2", W(T(9_000), T(9_001), ["home"])),
    ]


def test_sliding_windows(
    make_app: Callable[[], riverbed.App], topic_name: Names, log_url: str
) -> None:
    app = make_app()
    amounts = app.topic(topic_name("amounts"), value=float, key=str)
    sums = app.topic(topic_name("sums"), value=W[float], key=str)
    app.stream(amounts).window(riverbed.sliding(seconds=10), grace=1).aggregate(riverbed.sum()).to(
        sums
    )
    inputs = [
        ("k", 1.0, T(1_000)), ("k", 2.0, T(5_000)), ("k", 4.0, T(12_000)), ("k", 8.0, T(30_000))
    ]  # fmt: skip
    result = run_app(app, {amounts: inputs}, url=log_url)
    assert result.outputs[sums.name] == [
        ("k", W(T(-8_999), T(1_001), 1.0)),
        ("k", W(T(-4_999), T(5_001), 3.0)),
        ("k", W(T(2_001), T(12_001), 6.0)),  # 1 s has left the window, 5 s is still in it
    ]


def test_emit_every_update(
    make_app: Callable[[], riverbed.App], topic_name: Names, log_url: str
) -> None:
    app = make_app()
    events = app.topic(topic_name("events"), value=int, key=str)
    counts = app.topic(topic_name("counts"), value=W[int], key=str)
    app.stream(events).window(riverbed.tumbling(seconds=10), emit="update").count().to(counts)
    result = run_app(app, {events: [("k", 1, T(1_000)), ("k", 1, T(2_000))]}, url=log_url)
    # One batch: the window's result once, with both records.
    assert result.outputs[counts.name] == [("k", W(T(0), T(10_000), 2))]


def test_aggregators_without_window(
    make_app: Callable[[], riverbed.App], topic_name: Names, log_url: str
) -> None:
    app = make_app()
    payments = app.topic(topic_name("payments"), value=Payment, key=str)
    stats = app.topic(topic_name("stats"), value=dict, key=str)
    biggest = app.topic(topic_name("biggest"), value=Payment, key=str)
    spread = riverbed.Aggregator(
        initial=lambda: [None, None],
        add=lambda acc, p: [
            p.amount if acc[0] is None else min(acc[0], p.amount),
            p.amount if acc[1] is None else max(acc[1], p.amount),
        ],
        result=lambda acc: acc[1] - acc[0],
        name="spread",
    )
    amount: Callable[[Payment], float] = lambda p: p.amount  # noqa: E731
    stream = app.stream(payments)
    stream.aggregate(
        n=riverbed.count(),
        total=riverbed.sum(amount),
        low=riverbed.min(amount),
        high=riverbed.max(amount),
        mean=riverbed.mean(amount),
        all=riverbed.collect(amount, state_type=float),
        last=riverbed.latest(amount, state_type=float),
        spread=spread,
    ).to(stats)
    stream.reduce(lambda a, b: a if a.amount >= b.amount else b).to(biggest)
    inputs = [("a", Payment("a", x)) for x in (3.0, 1.0, 8.0)] + [("b", Payment("b", 2.0))]
    result = run_app(app, {payments: inputs}, url=log_url)
    final = dict(result.outputs[stats.name])
    assert final["a"] == {
        "n": 3, "total": 12.0, "low": 1.0, "high": 8.0, "mean": 4.0,
        "all": [3.0, 1.0, 8.0], "last": 8.0, "spread": 7.0,
    }  # fmt: skip
    assert final["b"]["n"] == 1
    assert dict(result.outputs[biggest.name]) == {"a": Payment("a", 8.0), "b": Payment("b", 2.0)}


def test_branch_and_merge(
    make_app: Callable[[], riverbed.App], topic_name: Names, log_url: str
) -> None:
    app = make_app()
    numbers = app.topic(topic_name("numbers"), value=int)
    small = app.topic(topic_name("small"), value=int)
    other = app.topic(topic_name("other"), value=int)
    negative, zero, rest = app.stream(numbers).branch(lambda n: n < 0, lambda n: n == 0)
    negative.map(lambda n: -n).merge(zero).to(small)
    rest.to(other)
    result = run_app(app, {numbers: [(None, n) for n in (-3, 0, 5, -1, 7)]}, url=log_url)
    assert sorted(v for _, v in result.outputs[small.name]) == [0, 1, 3]
    assert [v for _, v in result.outputs[other.name]] == [5, 7]


class Order(msgspec.Struct):
    order_id: str
    customer: str


class Customer(msgspec.Struct):
    name: str
    tier: str


def test_stream_table_join(
    make_app: Callable[[], riverbed.App], topic_name: Names, log_url: str
) -> None:
    app = make_app()
    customers = app.topic(topic_name("customers"), value=Customer, key=str, compact=True)
    orders = app.topic(topic_name("orders"), value=Order, key=str)
    enriched = app.topic(topic_name("enriched"), value=dict, key=str)
    table = app.table(customers)
    app.stream(orders).join_table(
        table,
        lambda order, customer: {"order": order.order_id, "tier": customer and customer.tier},
        on=lambda order: order.customer,
        how="left",
    ).to(enriched)
    result = run_app(
        app,
        {
            customers: [("c1", Customer("Ada", "gold")), ("c2", Customer("Bob", "basic"))],
            orders: [("o1", Order("o1", "c1")), ("o2", Order("o2", "c9"))],
        },
        url=log_url,
    )
    assert dict(result.outputs[enriched.name]) == {
        "o1": {"order": "o1", "tier": "gold"},
        "o2": {"order": "o2", "tier": None},
    }


def test_interval_join(
    make_app: Callable[[], riverbed.App], topic_name: Names, log_url: str
) -> None:
    app = make_app()
    views = app.topic(topic_name("views"), value=str, key=str)
    buys = app.topic(topic_name("buys"), value=str, key=str)
    matched = app.topic(topic_name("matched"), value=str, key=str)
    app.stream(views).join(
        app.stream(buys), lambda view, buy: f"{view}->{buy}", within=5, grace=30
    ).to(matched)
    result = run_app(
        app,
        {
            views: [("u1", "shoes", T(1_000)), ("u2", "hat", T(1_000))],
            buys: [("u1", "shoes!", T(4_000)), ("u2", "hat!", T(20_000))],  # u2: 19 s apart
        },
        url=log_url,
    )
    assert result.outputs[matched.name] == [("u1", "shoes->shoes!")]


def test_interval_join_keeps_partners_of_records_still_on_time(
    make_app: Callable[[], riverbed.App], topic_name: Names
) -> None:
    app = make_app()
    views = app.topic(topic_name("views"), value=str, key=str)
    buys = app.topic(topic_name("buys"), value=str, key=str)
    matched = app.topic(topic_name("matched"), value=str, key=str)
    app.stream(views).join(app.stream(buys), lambda v, b: f"{v}->{b}", within=5).to(matched)

    with app:
        app.start()
        send_then_run(app, views, ("view@0.5s", 500))
        send_then_run(app, buys, ("buy@6s", 6_000))  # stream time 6 s
        # On time (1.5 + 5 >= 6), and 1 s after the view: a match.
        send_then_run(app, buys, ("buy@1.5s", 1_500))
        with app.log.consumer(topics=[matched.name], from_beginning=True) as consumer:
            joined = [matched.decode(record).value for record in consumer.poll(timeout=2.0)]
    assert joined == ["view@0.5s->buy@1.5s"]


def test_key_by_needs_a_value_type_after_an_unannotated_map(tmp_path: Path) -> None:
    app = riverbed.App("typed", url=f"sqlite:///{tmp_path}/log.db")
    payments = app.topic("payments", value=Payment)
    with pytest.raises(riverbed.RiverbedError, match=r"key_by\(\.\.\., value=Type\)"):
        app.stream(payments).map(lambda p: p).key_by(lambda p: p.card)

    def annotated(p: Payment) -> Payment:
        return p

    app.stream(payments).map(annotated).key_by(lambda p: p.card)  # the type is known
    # Kept in its state, which came back from the store as dicts, not Payments.
    with pytest.raises(riverbed.RiverbedError, match=r"keep them in its state: pass reduce\("):
        app.stream(payments).map(lambda p: p).reduce(lambda a, b: a)
    with pytest.raises(riverbed.RiverbedError, match=r"pass reduce\(\.\.\., value=Type\)"):
        app.stream(payments).map(lambda p: p).window(riverbed.tumbling(seconds=1)).reduce(
            lambda a, b: a
        )


def test_a_reduce_given_its_type_reloads_its_state(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/log.db"
    totals: list[list[Payment]] = []
    for run in (1, 2):  # the second run reloads the state the first one stored
        app = riverbed.App("reduced", url=url, state_dir=tmp_path / "state")
        payments = app.topic("payments", value=Payment, key=str)
        out = app.topic("out", value=Payment, key=str)
        doubled = app.stream(payments).map(lambda p: Payment(p.card, p.amount * 2))
        doubled.reduce(lambda a, b: Payment(a.card, a.amount + b.amount), value=Payment).to(out)
        with app:
            app.start()
            payments.send(app.producer, Payment("c1", run), key="c1").result(timeout=30)
            with app.runner() as runner:
                while runner.run_once(0.2) or runner.run_once(0.2):  # the embedded log
                    pass
            with app.log.consumer(topics=["out"], from_beginning=True) as consumer:
                totals.append([out.decode(r).value for r in consumer.poll(timeout=1.0)])
    assert [p.amount for p in totals[-1]] == [2.0, 6.0]  # 1 * 2, then + 2 * 2


def test_aggregate_refuses_mixed_forms_and_unmergeable_sessions() -> None:
    app = riverbed.App("misuse", url="sqlite:///never-opened.db")
    numbers = app.topic("numbers", value=int, key=str)
    with pytest.raises(riverbed.RiverbedError, match="pass one aggregator, or several by name"):
        app.stream(numbers).aggregate(riverbed.count(), n=riverbed.count())
    plain = riverbed.Aggregator(initial=int, add=lambda acc, n: acc + n, name="plus")
    with pytest.raises(riverbed.RiverbedError, match="aggregator 'plus' has no merge"):
        app.stream(numbers).window(riverbed.session(seconds=1)).aggregate(plain)


def test_a_table_record_that_does_not_decode_is_skipped_with_a_warning(
    make_app: Callable[[], riverbed.App], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path}/log.db"
    with riverbed.connect(url) as log:
        log.create_topic("customers", compact=True)
        with log.producer() as producer:
            producer.send("customers", b"not json", key=b"c3")  # a plain producer's mistake
    app = make_app()
    customers = app.topic("customers", value=Customer, key=str, compact=True)
    orders = app.topic("orders", value=Order, key=str)
    enriched = app.topic("enriched", value=dict, key=str)
    app.stream(orders).join_table(
        app.table(customers),
        lambda order, customer: {"order": order.order_id, "tier": customer and customer.tier},
        on=lambda order: order.customer,
        how="left",
    ).to(enriched)
    with caplog.at_level(logging.WARNING):
        result = run_app(app, {orders: [("o1", Order("o1", "c3"))]}, url=url)
    assert dict(result.outputs[enriched.name]) == {"o1": {"order": "o1", "tier": None}}
    assert "table customers skips record customers[0]@0, which does not decode" in caplog.text
