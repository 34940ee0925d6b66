"""Periodic tasks: intervals and cron expressions, ticked by whichever worker leads.

Ticks are instants on a fixed grid (interval schedules are aligned to the epoch; cron ones follow
the expression in UTC), so every worker computes the same ticks. The leader enqueues the latest due
tick through ``Broker.claim_tick``, which records it atomically: one run per tick however many
workers run or take over the lead. Ticks missed while no worker ran are coalesced into one run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cronsim import CronSim, CronSimError


@dataclass(frozen=True)
class Schedule:
    """When a periodic task runs: every ``interval`` seconds, or per a ``cron`` expression."""

    interval_ms: int = 0
    cron: str = ""

    @classmethod
    def of(cls, every: float | timedelta | None, cron: str | None) -> Schedule:
        if (every is None) == (cron is None):
            raise ValueError("a periodic task needs every= (seconds) or cron= ('*/5 * * * *')")
        if cron is not None:
            try:
                CronSim(cron, datetime.now(UTC))
            except CronSimError as error:
                raise ValueError(f"cron expression {cron!r}: {error}") from None
            return cls(cron=cron)
        seconds = every.total_seconds() if isinstance(every, timedelta) else float(every or 0)
        if seconds < 0.001:
            raise ValueError(f"every= must be at least 1 ms, got {seconds} s")
        return cls(interval_ms=int(seconds * 1000))

    def due_ticks(self, after_ms: int, now_ms: int, limit: int) -> list[int]:
        """The ticks in ``(after_ms, now_ms]`` (epoch ms), oldest first: at most the ``limit``
        latest, so a schedule that was not ticked for long runs once or a few times, not for
        every tick it missed."""
        if self.interval_ms:
            latest = now_ms - now_ms % self.interval_ms
            first = max(
                after_ms - after_ms % self.interval_ms + self.interval_ms,
                latest - (limit - 1) * self.interval_ms,
            )
            return list(range(first, latest + 1, self.interval_ms))
        ticks: list[int] = []
        for moment in CronSim(self.cron, datetime.fromtimestamp(after_ms / 1000, UTC)):
            tick = int(moment.timestamp() * 1000)
            if tick > now_ms:
                break
            ticks.append(tick)
        return ticks[-limit:]

    def __str__(self) -> str:
        return f"cron {self.cron!r}" if self.cron else f"every {self.interval_ms / 1000:g} s"
