"""``riverbed.App``: the one object users wire streams, handlers and tasks onto."""

from __future__ import annotations

from pathlib import Path

from riverbed.eventsourcing.runtime import EventSourcing
from riverbed.streams.app import DEFAULT_STATE_DIR
from riverbed.streams.app import App as StreamApp
from riverbed.tasks.registry import Tasks


class App(StreamApp):
    """An application: topics and pipelines on its log (``url``), tasks on its task broker
    (``tasks_url``, else ``$RIVERBED_TASKS_URL``, else ``sqlite:///.riverbed/tasks.db``), and
    aggregates, projections and sagas on its event store (``events_url``, else
    ``$RIVERBED_EVENTS_URL``, else ``sqlite:///.riverbed/events.db``)."""

    def __init__(
        self,
        name: str,
        url: str | None = None,
        *,
        tasks_url: str | None = None,
        events_url: str | None = None,
        exactly_once: bool = True,
        state_dir: str | Path = DEFAULT_STATE_DIR,
    ) -> None:
        super().__init__(name, url, exactly_once=exactly_once, state_dir=state_dir)
        self.tasks = Tasks(name, tasks_url)
        self.task = self.tasks.task
        self.periodic = self.tasks.periodic
        self.events = EventSourcing(name, events_url)

    def close(self) -> None:
        self.tasks.close()
        self.events.close()
        super().close()
