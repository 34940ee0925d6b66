"""Consumer groups on the embedded log: membership, generations, assignment and fenced commits.

Members heartbeat into ``group_members``. A join, a leave or an expired heartbeat bumps the group's
generation; every member recomputes the assignment from the live members with the same
deterministic range assignor, so no coordinator process is needed. A commit succeeds only if, inside
its transaction, the member is still live and still owns each partition it commits: a fenced member
(expired, or whose partitions moved) can never overwrite the new owner's offsets.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping

import msgspec

from riverbed.log.api import TopicPartition
from riverbed.log.errors import CommitFailedError
from riverbed.log.sqlite.store import now_ms, write_transaction


class Member(msgspec.Struct, frozen=True):
    member_id: str
    topics: tuple[str, ...]


def assign(
    members: Iterable[Member], partitions: Mapping[str, int]
) -> dict[str, set[TopicPartition]]:
    """Kafka's RangeAssignor: per topic, runs of partitions to the subscribed members by id.

    ``partitions`` maps each existing topic to its partition count.
    """
    ordered = sorted(members, key=lambda m: m.member_id)
    assignment: dict[str, set[TopicPartition]] = {m.member_id: set() for m in ordered}
    for topic in sorted({t for m in ordered for t in m.topics}):
        count = partitions.get(topic, 0)
        subscribers = [m.member_id for m in ordered if topic in m.topics]
        share, extra = divmod(count, len(subscribers))
        start = 0
        for index, member_id in enumerate(subscribers):
            size = share + (1 if index < extra else 0)
            assignment[member_id].update((topic, p) for p in range(start, start + size))
            start += size
    return assignment


def live_members(conn: sqlite3.Connection, group: str) -> list[Member]:
    rows = conn.execute(
        "SELECT member_id, topics FROM group_members WHERE group_id = ?", (group,)
    ).fetchall()
    return [Member(member_id, tuple(json.loads(topics))) for member_id, topics in rows]


def topic_partition_counts(conn: sqlite3.Connection, topics: Iterable[str]) -> dict[str, int]:
    names = sorted(set(topics))
    marks = ",".join("?" * len(names))
    rows = conn.execute(
        f"SELECT name, partitions FROM topics WHERE name IN ({marks})", names
    ).fetchall()
    return dict(rows)


def generation(conn: sqlite3.Connection, group: str) -> int:
    row = conn.execute("SELECT generation FROM groups WHERE group_id = ?", (group,)).fetchone()
    return int(row[0]) if row else 0


def _bump_generation(conn: sqlite3.Connection, group: str) -> None:
    conn.execute(
        "INSERT INTO groups (group_id, generation) VALUES (?, 1) "
        "ON CONFLICT (group_id) DO UPDATE SET generation = generation + 1",
        (group,),
    )


def _expire_members(conn: sqlite3.Connection, group: str, now: int) -> bool:
    cursor = conn.execute(
        "DELETE FROM group_members WHERE group_id = ? AND heartbeat_ms + session_timeout_ms < ?",
        (group, now),
    )
    return cursor.rowcount > 0


def join(
    conn: sqlite3.Connection, group: str, member_id: str, topics: Iterable[str], session_ms: int
) -> None:
    now = now_ms()
    with write_transaction(conn):
        _expire_members(conn, group, now)
        conn.execute(
            "INSERT OR REPLACE INTO group_members (group_id, member_id, topics, "
            "session_timeout_ms, heartbeat_ms) VALUES (?, ?, ?, ?, ?)",
            (group, member_id, json.dumps(sorted(set(topics))), session_ms, now),
        )
        _bump_generation(conn, group)


def leave(conn: sqlite3.Connection, group: str, member_id: str) -> None:
    with write_transaction(conn):
        cursor = conn.execute(
            "DELETE FROM group_members WHERE group_id = ? AND member_id = ?", (group, member_id)
        )
        if cursor.rowcount:
            _bump_generation(conn, group)


def heartbeat(conn: sqlite3.Connection, group: str, member_id: str) -> bool:
    """Record that the member lives and expire dead ones; False if the member itself was expired."""
    now = now_ms()
    with write_transaction(conn):
        if _expire_members(conn, group, now):
            _bump_generation(conn, group)
        cursor = conn.execute(
            "UPDATE group_members SET heartbeat_ms = ? WHERE group_id = ? AND member_id = ?",
            (now, group, member_id),
        )
        return cursor.rowcount > 0


def current_assignment(
    conn: sqlite3.Connection, group: str
) -> tuple[int, dict[str, set[TopicPartition]]]:
    """The group's generation and assignment, read in the caller's transaction."""
    members = live_members(conn, group)
    counts = topic_partition_counts(conn, (t for m in members for t in m.topics))
    return generation(conn, group), assign(members, counts)


def commit_offsets(
    conn: sqlite3.Connection, group: str, member_id: str, offsets: Mapping[TopicPartition, int]
) -> None:
    """Store ``offsets`` if ``member_id`` still owns every one of their partitions."""
    with write_transaction(conn):
        store_offsets(conn, group, member_id, offsets)


def store_offsets(
    conn: sqlite3.Connection,
    group: str,
    member_id: str,
    offsets: Mapping[TopicPartition, int],
    generation: int | None = None,
) -> None:
    """``commit_offsets`` inside the caller's write transaction (a transactional producer's).

    With ``generation`` (the one the member's positions come from), any rebalance since fences
    the commit: the member may have lost a partition and got it back, and its positions would
    then undo the commits made by the owner in between.
    """
    now = now_ms()
    gen, assignment = current_assignment(conn, group)
    if generation is not None and gen != generation:
        raise CommitFailedError(
            f"commit rejected: group '{group}' rebalanced (generation {generation} -> {gen}) "
            "since this member's last poll; the transaction is aborted and its records are "
            "processed again after the next poll"
        )
    owned = assignment.get(member_id)
    if owned is None:
        raise CommitFailedError(
            f"commit rejected: member {member_id} of group '{group}' was fenced (its "
            f"session expired; the group is at generation {gen}); the records polled since "
            "the last commit go to the partitions' new owner, poll again to rejoin"
        )
    lost = sorted(set(offsets) - owned)
    if lost:
        topic, partition = lost[0]
        raise CommitFailedError(
            f"commit rejected: partition {topic}[{partition}] of group '{group}' moved to "
            f"another member in generation {gen}; its records since the last commit go to "
            "the new owner, poll again to get the new assignment"
        )
    conn.executemany(
        "INSERT INTO group_offsets (group_id, topic, partition, committed_offset, commit_ms) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (group_id, topic, partition) DO UPDATE SET "
        "committed_offset = excluded.committed_offset, commit_ms = excluded.commit_ms",
        [(group, t, p, offset, now) for (t, p), offset in offsets.items()],
    )


def committed_offsets(conn: sqlite3.Connection, group: str) -> dict[TopicPartition, int]:
    rows = conn.execute(
        "SELECT topic, partition, committed_offset FROM group_offsets WHERE group_id = ?",
        (group,),
    ).fetchall()
    return {(t, p): o for t, p, o in rows}


def list_groups(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT group_id FROM group_members UNION SELECT group_id FROM group_offsets ORDER BY 1"
    ).fetchall()
    return [r[0] for r in rows]
