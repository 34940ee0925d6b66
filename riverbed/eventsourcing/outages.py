"""Waiting out outages: a runner (projection, process manager, relay) whose store or log cannot
be reached pauses and tries again, as a Kafka consumer or a Celery worker does, instead of
ending its thread while the worker goes on without it."""

from __future__ import annotations

import logging
import threading

from riverbed.backoff import Backoff
from riverbed.log.errors import BrokerUnavailableError, DeliveryError

log = logging.getLogger("riverbed.eventsourcing")

# What a relay waits out: its store or log unreachable, or the log not taking a page, or not in
# time (which is then not checkpointed, so publishing it again loses nothing). A store alone
# raises the first.
UNREACHABLE = (BrokerUnavailableError, DeliveryError, TimeoutError)
# Pauses grow from 0.1 s to 5 s: a restarting server is found again within seconds of its return.
OUTAGE_BACKOFF = Backoff(base=0.1, max=5.0)


class Outage:
    """A runner's pauses between its attempts while its store or log is unreachable."""

    def __init__(self, runner: str, max_pause: float | None = None) -> None:
        """``max_pause``: a bound below the backoff's own, in seconds."""
        self.runner = runner
        self.attempts = 0
        self.max_pause = max_pause

    def wait(self, error: Exception, stop: threading.Event) -> None:
        """Pause after a failed attempt, until the next one or ``stop``."""
        self.attempts += 1
        pause = OUTAGE_BACKOFF.delay(self.attempts)
        if self.max_pause is not None:
            pause = min(pause, self.max_pause)
        log.warning("%s: %s; trying again in %.1f s", self.runner, error, pause)
        stop.wait(pause)

    def over(self) -> None:
        if self.attempts:
            log.warning("%s: reached its store and log again", self.runner)
            self.attempts = 0
