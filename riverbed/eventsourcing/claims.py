"""Which app runs each projection, process manager, relay and inbox of a store. Their
checkpoints, leases, parked events and inbox entries are named without the app's name, so two
apps sharing a store (the default one, run from one directory) must give theirs different names:
a name another app claimed there is refused, before any of its state is touched."""

from __future__ import annotations

from riverbed.eventsourcing.errors import EventSourcingError
from riverbed.eventsourcing.stores.api import EventStore

RUNNERS = "riverbed.runners"  # the claims: what -> {"app": name}
# Kinds that file their parked events under the same names (a projection also reads those filed
# under its bare name, as they were before per-version filing; a process manager files there).
_SHARING = ("projection", "process manager")


def claim(store: EventStore, app_name: str, whats: list[str]) -> None:
    """Record that app ``app_name`` runs ``whats`` ("projection totals", "relay to orders",
    "inbox mailer"), refusing one another app claimed."""
    if all(owner(store, what) == app_name and all(owner(store, rival) in (None, app_name)
                                                   for rival in _rivals(what))
           for what in whats):  # fmt: skip
        return  # claimed already: no write (a transaction would wait for the store's writers)
    with store.transaction(RUNNERS) as tx:
        for what in whats:
            for rival in _rivals(what):
                claimed = tx.get(RUNNERS, rival)
                if claimed is not None and claimed["app"] != app_name:
                    raise EventSourcingError(
                        f"app {claimed['app']!r} runs the {rival} in this event store, so app "
                        f"{app_name!r} cannot run the {what} too (they would share its state): "
                        "rename one, or give this app a store of its own (events_url=...); if "
                        f"app {claimed['app']!r} was renamed to {app_name!r}, call "
                        f"app.events.take_over_names({claimed['app']!r}) once"
                    )
            if tx.get(RUNNERS, what) is None:
                tx.put(RUNNERS, what, {"app": app_name})


def take_over(store: EventStore, app_name: str, renamed_from: str) -> int:
    """Hand what app ``renamed_from`` claimed over to ``app_name``; how many. The events it
    saved are this app's from now on (``renamed_to``)."""
    with store.transaction(RUNNERS) as tx:
        whats = [what for what, claimed in store.documents(RUNNERS).items()
                 if claimed["app"] == renamed_from]  # fmt: skip
        for what in [*whats, _RENAMED + renamed_from]:  # earlier renames to it move along
            tx.put(RUNNERS, what, {"app": app_name})
    return len([what for what in whats if not what.startswith(_RENAMED)])


def renamed_to(store: EventStore, app_name: str) -> str | None:
    """The app that took app ``app_name``'s names over, if one did."""
    return owner(store, _RENAMED + app_name)


_RENAMED = "renamed app "


def owner(store: EventStore, what: str) -> str | None:
    """The app that claimed ``what`` ("projection totals") in the store, if one did."""
    claimed = store.get_document(RUNNERS, what)
    return None if claimed is None else str(claimed["app"])


def _rivals(what: str) -> list[str]:
    """The claims that would clash with ``what``: its own, and a projection's and a process
    manager's of one name clash."""
    kind, name = next(((k, what.removeprefix(k + " ")) for k in _SHARING
                       if what.startswith(k + " ")), (None, ""))  # fmt: skip
    if kind is None:
        return [what]
    return [what] + [f"{other} {name}" for other in _SHARING if other != kind]
