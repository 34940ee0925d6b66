"""Periodic schedules and rate limits: which ticks are due, and what a bad spec says."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from riverbed.tasks.schedules import Schedule
from riverbed.tasks.task import RateLimit


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


NOON = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def test_interval_ticks_are_aligned_to_the_epoch() -> None:
    every_5s = Schedule.of(5, None)
    now = ms(NOON) + 12_300
    assert every_5s.due_ticks(ms(NOON), now, 10) == [ms(NOON) + 5000, ms(NOON) + 10_000]
    assert every_5s.due_ticks(ms(NOON) + 10_000, now, 10) == []
    assert Schedule.of(timedelta(minutes=1), None).interval_ms == 60_000


def test_cron_ticks_follow_the_expression_in_utc() -> None:
    every_15m = Schedule.of(None, "*/15 * * * *")
    ticks = every_15m.due_ticks(ms(NOON), ms(NOON + timedelta(hours=1)), 10)
    assert ticks == [ms(NOON + timedelta(minutes=m)) for m in (15, 30, 45, 60)]
    nightly = Schedule.of(None, "30 2 * * *")
    (tick,) = nightly.due_ticks(ms(NOON), ms(NOON + timedelta(days=1)), 10)
    assert datetime.fromtimestamp(tick / 1000, UTC) == datetime(2026, 11, 27, 2, 30, tzinfo=UTC)


def test_only_the_latest_missed_ticks_run() -> None:
    every_1s = Schedule.of(1, None)
    ticks = every_1s.due_ticks(ms(NOON), ms(NOON) + 3_600_000, 3)
    assert ticks == [ms(NOON) + 3_598_000, ms(NOON) + 3_599_000, ms(NOON) + 3_600_000]
    every_minute = Schedule.of(None, "* * * * *")
    assert len(every_minute.due_ticks(ms(NOON), ms(NOON + timedelta(hours=2)), 5)) == 5


@pytest.mark.parametrize(
    ("every", "cron", "message"),
    [
        (None, None, "needs every="),
        (5, "* * * * *", "needs every="),
        (0, None, "at least 1 ms"),
        (None, "61 * * * *", "cron expression '61 \\* \\* \\* \\*'"),
        (None, "every day", "cron expression"),
    ],
)
def test_a_bad_schedule_is_refused(every: float | None, cron: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Schedule.of(every, cron)


def test_rate_limits() -> None:
    assert RateLimit.parse("100/s").per_second == 100
    assert RateLimit.parse("30/m").per_second == 0.5
    assert RateLimit.parse("7.2 / h").per_second == pytest.approx(0.002)
    assert RateLimit.parse("100/s").capacity == 10
    assert RateLimit.parse("30/m").capacity == 1
    for bad in ("fast", "0/s", "10/d", "-1/s"):
        with pytest.raises(ValueError, match="rate_limit"):
            RateLimit.parse(bad)
