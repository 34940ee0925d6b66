"""Session windows: a key's records closer than ``gap`` to each other form one session.

A record within ``gap`` of one or more sessions of its key joins them (merging them if it bridges
two); otherwise it starts a new one. A session ``[start, end]`` closes once stream time reaches
``end + gap + grace``. State: per key, its open sessions as ``(start, end, accumulators)``.
"""

from __future__ import annotations

from typing import Any

from riverbed.streams.nodes import EMPTY, Batch, Item
from riverbed.streams.windows.base import (
    Windowed,
    WindowNode,
    WindowSettings,
    ms,
    stream_time_after,
    stream_times,
)

Session = tuple[int, int, list[Any]]


class SessionWindows:
    kind = "session"

    def __init__(self, gap_ms: int) -> None:
        self.gap_ms = gap_ms

    def node(self, settings: WindowSettings) -> WindowNode[Any]:
        return SessionNode(self.gap_ms, settings)


def session(seconds: float | None = None, *, milliseconds: int | None = None) -> SessionWindows:
    """Sessions of activity separated by at least ``seconds`` (or ``milliseconds``) of silence."""
    return SessionWindows(ms(seconds, milliseconds, "session gap"))


class SessionNode(WindowNode[list[Session]]):
    def __init__(self, gap_ms: int, settings: WindowSettings) -> None:
        assert settings.aggregation is not None
        settings.aggregation.check_mergeable("session")
        state_type = settings.aggregation.state_type
        session_type: Any = tuple.__class_getitem__((int, int, state_type))
        super().__init__(settings, list[session_type])
        self.gap = gap_ms

    def process(
        self,
        partition: int,
        entries: dict[Any, list[Session]],
        dirty: set[Any],
        batch: Batch,
        times: list[int],
        before: int,
    ) -> tuple[Batch, Batch]:
        gap, horizon, closing = self.gap, self.gap + self.grace_ms, self._closing()
        aggregation = self.aggregation
        late: list[Item] = []
        changed: dict[Any, None] = {}
        for item, ts, now in zip(batch, times, stream_times(before, times), strict=True):
            if ts + horizon <= now:
                late.append(item)
                continue
            key = item[0]
            start, end = ts, ts
            merged: list[Any] | None = None
            kept: list[Session] = []
            # Sessions are kept in start order, so partial results merge in time order.
            for session in entries.get(key, ()):
                if session[0] - gap <= ts <= session[1] + gap:
                    start, end = min(start, session[0]), max(end, session[1])
                    partial = list(session[2])
                    merged = partial if merged is None else aggregation.merge(merged, partial)
                else:
                    kept.append(session)
            accs = aggregation.add_many(merged, [item[1]])
            kept.append((start, end, accs))
            kept.sort(key=lambda s: s[0])
            entries[key] = kept
            dirty.add(key)
            changed[key] = None
        if self.emit == "update":
            after = stream_time_after(before, times)
            return Batch.of(late), Batch.of(
                self._result(key, session)
                for key in changed
                for session in entries[key]
                if session[1] + closing > after
            )
        return Batch.of(late), EMPTY

    def close(
        self, partition: int, entries: dict[Any, list[Session]], dirty: set[Any], stream_time: int
    ) -> Batch:
        closing = self._closing()
        emitted: list[Item] = []
        final = self.emit == "final"
        for key in list(entries):
            sessions = entries[key]
            if sessions[0][1] + closing > stream_time and all(
                s[1] + closing > stream_time for s in sessions
            ):
                continue
            open_sessions = [s for s in sessions if s[1] + closing > stream_time]
            if final:
                emitted.extend(
                    self._result(key, s) for s in sessions if s[1] + closing <= stream_time
                )
            if open_sessions:
                entries[key] = open_sessions
            else:
                del entries[key]
            dirty.add(key)
        emitted.sort(key=lambda item: item[2])
        return Batch.of(emitted)

    def _closing(self) -> int:
        """How long after its end a session closes: a record on time (up to gap + grace behind
        stream time) can still join it up to a gap after its end, and bridge it to another, so
        whether it does cannot depend on where a batch ended."""
        return 2 * self.gap + self.grace_ms

    def _result(self, key: Any, session: Session) -> Item:
        start, end, accs = session
        return key, Windowed(start, end + 1, self.aggregation.result(list(accs))), end
