"""One SQLite file in WAL mode, used from many threads: the task broker's and the event store's.

Each thread gets its own connection (workers, projections and relays call from their own
threads); the schema is created once, versioned with ``PRAGMA user_version``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from riverbed.errors import InvalidUrlError, RiverbedError
from riverbed.log.sqlite.kinds import KINDS, check_file, claim
from riverbed.log.sqlite.store import FSYNC_MODES, use_wal, write_transaction
from riverbed.urls import BackendUrl

CHECKPOINT_EVERY_S = 0.1
WRITER_CHECKPOINT_PAGES = 16384  # 64 MiB of 4 KiB pages
JOURNAL_LIMIT_BYTES = 64 * 1024 * 1024
log = logging.getLogger("riverbed.sqlite")


def synchronous_option(url: BackendUrl, options: dict[str, str]) -> str:
    """SQLite's ``synchronous`` setting for the URL's ``fsync=`` option."""
    fsync = options["fsync"]
    if fsync not in FSYNC_MODES:
        raise InvalidUrlError(
            f"fsync={fsync!r} in {url.shown!r}: use one of {', '.join(FSYNC_MODES)}"
        )
    return FSYNC_MODES[fsync]


class SqliteFile:
    def __init__(
        self, path: Path, synchronous: str, what: str, *, background_checkpoints: bool = False
    ) -> None:
        """``what`` names the file in errors ("task database").

        ``background_checkpoints``: SQLite's automatic checkpoint runs inside whichever commit
        finds the write-ahead log full (1,000 pages), and copies the log into the database on
        that writer's time. With this, a thread of this file checkpoints passively every
        ``CHECKPOINT_EVERY_S`` when something was written, and writers only past
        ``WRITER_CHECKPOINT_PAGES``, finding little left to copy."""
        self.path = path
        self.what = what
        self._synchronous = synchronous
        self._local = threading.local()
        # Each connection with the thread it belongs to.
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if background_checkpoints:
            self._checkpointer = threading.Thread(
                target=self._checkpoint_loop, name="riverbed-sqlite-checkpoint", daemon=True
            )

    @property
    def conn(self) -> sqlite3.Connection:
        """This thread's connection."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if self._closed.is_set():
            if conn is not None:  # left open by close(), for this thread to close
                conn.close()
                self._local.conn = None
            raise RiverbedError(f"{self.what} {str(self.path)!r} is closed")
        if conn is None:
            conn = sqlite3.connect(
                self.path, timeout=60.0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA busy_timeout=60000")
            use_wal(conn)
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA cache_size=-65536")
            if self._checkpointer is not None and not self._closed.is_set():
                # The log starts over only when a checkpoint completes between two writes,
                # which this thread cannot arrange under a busy writer: writers still
                # checkpoint, but only past a size, when this thread has copied most of it.
                conn.execute(f"PRAGMA wal_autocheckpoint={WRITER_CHECKPOINT_PAGES}")
                # Give back what a long burst grew the log to, once it starts over.
                conn.execute(f"PRAGMA journal_size_limit={JOURNAL_LIMIT_BYTES}")
                with self._lock:
                    if not self._checkpointer.is_alive():
                        self._checkpointer.start()
            self._local.conn = conn
            with self._lock:
                # Ended threads' connections close now: their threads cannot be using them, and
                # each event loop's or thread pool's threads would otherwise keep one open.
                for thread, other in self._connections:
                    if not thread.is_alive():
                        other.close()
                self._connections = [(thread, other) for thread, other in self._connections
                                     if thread.is_alive()]  # fmt: skip
                self._connections.append((threading.current_thread(), conn))
        return conn

    def create_schema(
        self,
        statements: Sequence[str],
        version: int,
        upgrade: Callable[[sqlite3.Connection, int], None] | None = None,
    ) -> None:
        """Create the tables (idempotent), then ``upgrade`` a file of an older schema version
        (given that version; 0 for a new file); an error if the file is of a newer riverbed, of
        another kind (``what``: one of ``kinds.KINDS``), or another program's.
        Raises ``sqlite3.DatabaseError`` or ``OSError`` when the file cannot be opened."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        check_file(self.path, self.what)  # before the connection switches it to WAL
        conn = self.conn
        if (
            conn.execute("PRAGMA user_version").fetchone()[0] == version
            and conn.execute("PRAGMA application_id").fetchone()[0] == KINDS[self.what][0]
        ):
            return  # made by this riverbed: no write lock, which readers would wait for
        with write_transaction(conn) as conn:
            claim(conn, self.what, self.path)  # left as it is if another kind's or program's
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found > version:
                raise RiverbedError(
                    f"{self.what} {str(self.path)!r} has schema version {found}, newer than "
                    f"this riverbed's {version}; upgrade riverbed"
                )
            for statement in statements:
                conn.execute(statement)
            if upgrade is not None and found < version:
                upgrade(conn, found)
            conn.execute(f"PRAGMA user_version={version}")

    def _checkpoint_loop(self) -> None:
        conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=60000")
        try:
            last = None
            while not self._closed.wait(CHECKPOINT_EVERY_S):
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if version != last:
                    # PASSIVE copies what it can without waiting for readers or writers.
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    last = version
        except sqlite3.Error as error:
            # Writers report a broken file themselves; without checkpoints the log only grows.
            log.warning("checkpoints of %s stopped: %s", self.path, error)
        finally:
            conn.close()

    def close(self) -> None:
        """Close the file. Another live thread's connection may be running a statement, and
        closing it under that would crash the process: that thread closes it on its next call
        (which raises), or it closes when the thread ends."""
        self._closed.set()
        if self._checkpointer is not None and self._checkpointer.is_alive():
            self._checkpointer.join(5)
        with self._lock:
            connections, self._connections = self._connections, []
        me = threading.current_thread()
        for thread, conn in connections:
            if thread is me or not thread.is_alive():
                conn.close()
        self._local.conn = None
