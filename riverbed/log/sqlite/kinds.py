"""What kind of riverbed file a SQLite database is. Each kind says so in the file's header
(``PRAGMA application_id``), so that the URL of one kind pointed at another kind's file (the
event store's at the log's, say) is refused instead of adding its tables there and taking the
file's schema version over. Files that riverbed releases wrote before the header are told apart
by a table only their kind has."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from riverbed.errors import RiverbedError

# Each kind's application id ("RBLG", "RBTK", "RBES") and a table and column of its own.
KINDS = {
    "log": (0x52424C47, "topics", "max_record_bytes"),
    "task database": (0x5242544B, "tasks", "message"),
    "event store": (0x52424553, "events", "record"),
}


def kind_of(conn: sqlite3.Connection) -> str | None:
    """The kind of riverbed file ``conn`` opened: "" for an empty database, None for one riverbed
    did not create."""
    application_id = conn.execute("PRAGMA application_id").fetchone()[0]
    for kind, (kind_id, _, _) in KINDS.items():
        if application_id == kind_id:
            return kind
    if application_id != 0:
        return None
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables:
        return ""
    if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
        return None
    for kind, (_, table, column) in KINDS.items():
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if table in tables and column in columns:
            return kind
    return None


def check_file(path: Path, kind: str) -> None:
    """Before a file is opened as one of ``kind`` (which switches it to WAL): an error if it
    is another kind's, or another program's, leaving it as it is. ``sqlite3.DatabaseError`` if
    it is not a database."""
    if path.is_dir():  # which SQLite reports as a "disk I/O error"
        raise RiverbedError(
            f"{kind} {str(path)!r} is a directory; name a file (in it, say) in the URL"
        )
    if not path.exists() or path.stat().st_size == 0:
        return
    conn = _read_only(path)
    try:
        _refuse_other(conn, kind, path)
    finally:
        conn.close()


def claim(conn: sqlite3.Connection, kind: str, path: Path) -> None:
    """Mark the file as one of ``kind`` (in the transaction that creates its schema); an error if
    it is another kind's, or another program's."""
    _refuse_other(conn, kind, path)
    conn.execute(f"PRAGMA application_id={KINDS[kind][0]}")


def _refuse_other(conn: sqlite3.Connection, kind: str, path: Path) -> None:
    found = kind_of(conn)
    if found is None:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master LIMIT 3")]
        raise RiverbedError(
            f"{kind} {str(path)!r} is a database riverbed did not create (it holds "
            f"{', '.join(tables)}); give riverbed a file of its own"
        )
    if found not in ("", kind):
        raise RiverbedError(
            f"{kind} {str(path)!r} is a riverbed {found}, not {_article(kind)} {kind}; give the "
            f"{kind} a file of its own (check the URL)"
        )


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def file_kind(path: Path) -> str | None:
    """The kind of riverbed file at ``path`` (as ``kind_of``), opened read-only: looking changes
    nothing. ``sqlite3.DatabaseError`` if it is not a database."""
    conn = _read_only(path)
    try:
        return kind_of(conn)
    finally:
        conn.close()


def _read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
