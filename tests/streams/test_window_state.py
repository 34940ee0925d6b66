"""Fixed windows' stored state and the repartition topic's runs, on both backends: results do not
depend on how records were batched, how runs were split, or how a window's rows were laid out
when the state was reloaded."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

import riverbed
from riverbed.streams import nodes, runner
from riverbed.streams.windows import time_based
from riverbed.testing import run_app

W = riverbed.Windowed
Names = Callable[[str], str]
BASE_MS = 1_700_000_000_000
WINDOW_MS = 10_000


class Payment(msgspec.Struct):
    card: str
    amount: int
    ts: int


# Stream time past the end of the test's windows plus their grace, in both partitions of the
# repartition topic (sent after everything else was processed): they all close.
CLOSING = [Payment(f"c{i}", 1, BASE_MS + 2 * 3_600_000) for i in range(10)]


def payments(count: int, cards: int, start_ms: int, seed: int) -> list[Payment]:
    """``count`` payments over ``cards`` cards, in the two windows from ``start_ms``."""
    rng = random.Random(seed)
    return [
        Payment(f"c{rng.randrange(cards)}", rng.randrange(1, 100), start_ms + rng.randrange(20_000))
        for _ in range(count)
    ]


def card_then_start(result: tuple[str, W[dict[str, int]]]) -> tuple[str, int]:
    return result[0], result[1].start_ms


def expected(rows: list[Payment]) -> list[tuple[str, W[dict[str, int]]]]:
    totals: dict[tuple[str, int], dict[str, int]] = {}
    for p in rows:
        start = p.ts - p.ts % WINDOW_MS
        total = totals.setdefault((p.card, start), {"n": 0, "total": 0})
        total["n"] += 1
        total["total"] += p.amount
    windows = [(card, W(start, start + WINDOW_MS, t)) for (card, start), t in totals.items()]
    return sorted(windows, key=card_then_start)


class Pipeline:
    """An app keying payments by card into 10 s windows (count and sum) on the log at ``url``;
    a second Pipeline of the same names continues where the first one committed."""

    def __init__(self, names: tuple[str, str, str], state_dir: Path, url: str) -> None:
        name, source_name, out_name = names
        self.url = url
        self.app = riverbed.App(name, url=url, state_dir=state_dir)
        self.source = self.app.topic(source_name, partitions=2, value=Payment, key=str)
        self.out = self.app.topic(out_name, value=W[dict[str, int]], key=str)
        (
            self.app.stream(self.source)
            .key_by(lambda p: p.card, partitions=2)
            .window(riverbed.tumbling(seconds=10), timestamp=lambda p: p.ts, grace=3600)
            .aggregate(n=riverbed.count(), total=riverbed.sum(lambda p: p.amount))
            .to(self.out)
        )

    def results(self, rows: list[Payment]) -> list[tuple[str, W[dict[str, int]]]]:
        """Every window result in the output topic, after processing ``rows`` too."""
        result = run_app(self.app, {self.source: [(p.card, p) for p in rows]}, url=self.url)
        assert result.late == 0
        return sorted(result.outputs[self.out.name], key=card_then_start)


def names(topic_name: Names) -> tuple[str, str, str]:
    return topic_name("app"), topic_name("payments"), topic_name("totals")


def test_results_do_not_depend_on_batches_or_runs(
    topic_name: Names, tmp_path: Path, log_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = payments(300, 40, BASE_MS, seed=1)
    pipeline = Pipeline(names(topic_name), tmp_path / "a", log_url)
    pipeline.results(rows)
    whole = pipeline.results(CLOSING)
    assert whole == expected(rows)
    # A commit every few records, and a repartition record per item.
    monkeypatch.setattr(runner, "BATCH_RECORDS", 7)
    monkeypatch.setattr(runner, "COMMIT_RECORDS", 7)
    monkeypatch.setattr(nodes, "RUN_RECORD_BYTES", 1)
    pipeline = Pipeline(names(topic_name), tmp_path / "b", log_url)
    pipeline.results(rows)
    assert pipeline.results(CLOSING) == whole


def test_window_rows_reload_in_every_layout(
    topic_name: Names, tmp_path: Path, log_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows grow from one row to many across commits, are reloaded by a second app (on
    Kafka, from the changelog into a new state dir), change again, then close."""
    monkeypatch.setattr(time_based, "ROW_ENTRIES", 4)
    monkeypatch.setattr(runner, "BATCH_RECORDS", 25)
    monkeypatch.setattr(runner, "COMMIT_RECORDS", 25)
    same = names(topic_name)
    first = payments(400, 60, BASE_MS, seed=2)
    assert Pipeline(same, tmp_path / "first", log_url).results(first) == []  # none closed yet
    second = payments(100, 60, BASE_MS, seed=3)
    reloaded = Pipeline(same, tmp_path / "second", log_url)
    reloaded.results(second)
    assert reloaded.results(CLOSING) == expected(first + second)
