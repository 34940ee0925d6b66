"""``riverbed projections``: where an app's projections and process managers stand, their parked
events, rebuilds.

Each command loads the app (``module:attribute``) and works on the event store it uses: its
``events_url``, else ``$RIVERBED_EVENTS_URL``, else the SQLite default."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table

from riverbed.cli.common import err, out
from riverbed.cli.worker import load_app
from riverbed.errors import RiverbedError
from riverbed.eventsourcing.claims import owner
from riverbed.eventsourcing.errors import NotParkedError
from riverbed.eventsourcing.runtime import EventSourcing
from riverbed.eventsourcing.subscriptions import SubscriberStatus

app = typer.Typer(
    help=(
        "Look after an app's projections and process managers: status and lag, parked events, "
        "rebuilds."
    ),
    no_args_is_help=True,
)

Target = Annotated[str, typer.Argument(help="The app, as module:attribute.")]
Name = Annotated[str, typer.Argument(help="The projection's or process manager's name.")]
Positions = Annotated[
    list[str],
    typer.Argument(
        metavar="POSITIONS...", help="Positions of parked events, as `parked` lists them."
    ),
]


# A whole number, its thousands grouped by commas or not ("1200", "1,200", "-5").
_POSITION = re.compile(r"-?(\d+|\d{1,3}(,\d{3})+)")


def _positions(given: list[str]) -> list[int]:
    """Each position once, as ints; "1,200" as ``list`` prints it is 1200. An error naming
    what is not one."""
    positions = []
    for text in given:
        try:
            if not _POSITION.fullmatch(text):  # 1,2 is no position, nor 12
                raise ValueError(text)
            positions.append(int(text.replace(",", "")))
        except ValueError:
            raise RiverbedError(
                f"{text!r} is not a position: give whole numbers, as `riverbed projections "
                "parked` lists them"
            ) from None
    return list(dict.fromkeys(positions))


@contextmanager
def open_events(target: str) -> Iterator[EventSourcing]:
    """The app's event sourcing, on its event store (closed afterwards)."""
    events = getattr(load_app(target), "events", None)
    if not isinstance(events, EventSourcing):
        raise RiverbedError(f"{target} has no event store: create it with riverbed.App(...)")
    # Looking creates nothing: a mistyped URL is an error, not an empty store made there.
    missing = events.missing()
    if missing is not None:
        raise RiverbedError(
            f"{missing}: check {target}'s events_url (or $RIVERBED_EVENTS_URL); a worker "
            "running the app, or its first save, creates the store"
        )
    try:
        yield events
    finally:
        events.close()


@app.command("list")
def list_subscribers(target: Target) -> None:
    """Each projection (at its active version), then each process manager: the position it
    handled last, the store's last position, the lag between them and how many events it
    parked."""
    with open_events(target) as events:
        names = [*events.projections.registered, *events.process_managers]
        statuses = [events.status(name) for name in names]
        others = {name: _other_app(events, name) for name in names}
    if not statuses:
        out.print(f"{target} registers no projections or process managers")
        return
    projections = [s for s in statuses if s.version is not None]
    if projections:
        table = _table("projection", projections, "version")
        for status in projections:
            table.add_row(status.name, str(status.version), *_progress(status))
        out.print(table)
    managers = [s for s in statuses if s.version is None]
    if managers:
        table = _table("process manager", managers)
        for status in managers:
            table.add_row(status.name, *_progress(status))
        out.print(table)
    for name, other in others.items():
        if other is not None:
            err.print(_run_by(other, name))
    for status in statuses:
        if status.stopped_at is not None:
            error = (status.stopped_error or "").partition("\n")[0]
            out.print(
                f"{status.name} stopped at {status.stopped_where()} (on_error = 'stop'): "
                f"{error}; fix it and restart the worker",
                markup=False,
            )


def _other_app(events: EventSourcing, name: str) -> str | None:
    """The other app that runs ``name`` in the store (their state is one), if one does."""
    found = owner(events.store, events.subscriber(name).claim_name)
    return found if found not in (None, events.app_name) else None


def _run_by(other: str, name: str) -> str:
    return (
        f"note: app {other!r} runs {name!r} in this event store, so what is shown of it is "
        "that app's: give this app's another name, or the app a store of its own"
    )


def _table(kind: str, statuses: list[SubscriberStatus], *columns: str) -> Table:
    """A table whose first column shows each name whole, in a narrow terminal or a pipe too:
    the name is what the other commands take."""
    table = Table()
    table.add_column(kind, no_wrap=True, min_width=max(len(s.name) for s in statuses))
    for column in (*columns, "checkpoint", "head", "lag", "parked"):
        table.add_column(column)
    return table


def _progress(status: SubscriberStatus) -> list[str]:
    counts = (status.checkpoint, status.head, status.lag, status.parked)
    return [f"{count:,}" for count in counts]


@app.command("parked")
def parked(
    target: Target,
    name: Name,
    show_traceback: Annotated[
        bool, typer.Option("--traceback", help="Print each error's whole traceback.")
    ] = False,
) -> None:
    """The events a projection or process manager could not handle (and a manager's timers that
    failed, at negative positions), one per line: position, event id, type, when, and the
    error's first line."""
    with open_events(target) as events:
        entries = events.parked(name)
        other = _other_app(events, name)
    if other is not None:
        err.print(_run_by(other, name))
    for entry in entries:
        first_line, _, rest = entry.error.partition("\n")
        parked_at = datetime.fromtimestamp(entry.parked_ms / 1000, UTC)
        out.print(
            f"{entry.position}  {entry.event_id}  {entry.type}  "
            f"parked={parked_at:%Y-%m-%d %H:%M:%S}  {first_line}"
        )
        if show_traceback and rest.strip():
            out.print(rest.rstrip())
    if not entries:
        out.print(f"{name} has no parked events")


# A parked timer's position is negative: an argument, not an option.
POSITIONAL_NEGATIVES = {"ignore_unknown_options": True}


@app.command("unpark", context_settings=POSITIONAL_NEGATIVES)
def unpark(
    target: Target,
    name: Name,
    given: Positions,
) -> None:
    """Forget parked events once dealt with: the projection or process manager goes on without
    them (a parked timer never fires). The events stay in the store; ``rebuild`` applies every
    event again, parked ones included."""
    positions = _positions(given)
    with open_events(target) as events:
        missing = [p for p in positions if not events.unpark(name, p)]
    out.print(f"unparked {len(positions) - len(missing)} events of {name}")
    if missing:
        raise RiverbedError(f"not parked by {name}: {', '.join(map(str, missing))}")


@app.command("retry", context_settings=POSITIONAL_NEGATIVES)
def retry(
    target: Target,
    name: Name,
    given: Positions,
) -> None:
    """Handle parked events again, once the handler is fixed: each now, after the events that
    followed it, and unparked once handled (a parked timer fires with its data); one that fails
    again stays parked with the new error. For handlers that do not depend on the order of
    events; else ``rebuild``."""
    positions = _positions(given)
    with open_events(target) as events:
        parked = {p.position for p in events.parked(name)}  # an unknown name fails here, once
        failed, missing = [], [p for p in positions if p not in parked]
        for position in (p for p in positions if p in parked):
            try:
                again = events.retry_parked(name, position)
            except NotParkedError:  # another retry handled it, or it was unparked, meanwhile
                missing.append(position)
                continue
            if again is None:
                out.print(f"{position}  applied")
            else:
                out.print(f"{position}  failed again: {again.error.partition(chr(10))[0]}",
                          markup=False)  # fmt: skip
                failed.append(position)
    problems = [f"still parked by {name}: {', '.join(map(str, failed))}"] if failed else []
    if missing:
        problems.append(f"not parked by {name}: {', '.join(map(str, missing))}")
    if problems:
        raise RiverbedError("; ".join(problems))


@app.command("rebuild")
def rebuild(target: Target, name: Name) -> None:
    """Fill the projection's next version from the first event, beside the live one; switch
    queries and running workers to it once it has caught up, and drop the old version's
    collections."""
    with open_events(target) as events:
        projections = events.projections
        old = projections.active_version(name)
        new = projections.rebuild(name)
        applied = projections.status(name).checkpoint
    out.print(f"rebuilt {name}: version {new} is active (was {old}), at position {applied:,}")
