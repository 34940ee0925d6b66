"""Whether the server closed a connection while it sat idle in the pool: it restarted, or an
idle timeout ended the session (the server's ``idle_session_timeout``, or a proxy's or NAT's
between). The pool finds out only when a call uses the connection and fails; a look at its
socket finds out first, for no round trip."""

from __future__ import annotations

import select
from typing import Any

import psycopg
from psycopg import pq


def closed_by_server(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], poller: select.poll | None = None
) -> bool:
    """Whether the server closed this idle connection: only then has its socket something to
    read, the server's last message and the end (or, on a live one, a notice to take in).
    ``poller``, of the connection's socket, looks at it for less than ``select`` does."""
    pgconn = conn.pgconn
    try:
        # libpq sees the end only on a read after the last message's: read until nothing is
        # left (a live connection has only a notice or two).
        while poller.poll(0) if poller else select.select([pgconn.socket], [], [], 0)[0]:
            pgconn.consume_input()
            if pgconn.status != pq.ConnStatus.OK:
                return True
    except psycopg.OperationalError:
        return True
    return False
