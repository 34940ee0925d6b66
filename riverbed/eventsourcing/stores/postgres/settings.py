"""What a ``postgresql://`` URL asks for: the server to connect to (libpq's conninfo, without
riverbed's own options), the schema the store's tables live in and the size of the pool."""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlencode, urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from riverbed.errors import InvalidUrlError, RiverbedError
from riverbed.eventsourcing.errors import EventSourcingError, StoreUnavailableError
from riverbed.eventsourcing.stores.postgres.spinning import MAX_SPIN_US, SPIN_US
from riverbed.urls import BackendUrl

# riverbed's options and their defaults.
# How long the pool tries to replace a lost connection before it gives up, to try again at the
# next call: its pauses between tries double from a second, so after a long outage it would find
# the server back only a long while after it returned.
RECONNECT_S = 2.0
RIVERBED_OPTIONS = {
    "schema": "public", "pool_size": "10", "pool_timeout": "30", "spin_us": str(SPIN_US),
    "command_timeout": "60",
}  # fmt: skip
# Runners wait outages out by calling again: a call need not wait longer than this (the
# pool's clock takes no infinite wait).
MAX_POOL_TIMEOUT_S = 86_400
# libpq's parameters a URL may carry on to the server connection ("" = libpq's default): its
# own URI query parameters, such as host=/run/postgresql for a unix socket. An unreachable
# server fails within ``connect_timeout`` seconds, not after the OS's TCP timeout.
# libpq's target_session_attrs values that pick a server or session refusing writes.
READ_ONLY_SESSIONS = frozenset({"read-only", "standby", "prefer-standby"})
LIBPQ_OPTIONS = {
    "connect_timeout": "3",
    **dict.fromkeys(
        (
            "host", "hostaddr", "port", "dbname", "user", "password", "passfile", "service",
            "application_name", "target_session_attrs", "load_balance_hosts",
            "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
            "tcp_user_timeout", "sslmode", "sslrootcert", "sslcert", "sslkey", "sslpassword",
            "sslcrl", "gssencmode", "channel_binding", "require_auth",
        ),
        "",
    ),
}  # fmt: skip
# What a server that answered says when it refuses the URL for good (its user, password or
# database): a worker fails on these instead of waiting them out. Servers whose messages are not
# in English are waited out, as if down.
_REFUSED_FOR_GOOD = (
    "does not exist",
    "authentication failed",
    "no pg_hba.conf entry",
    "permission denied",
    "not permitted to log in",
    "no password supplied",
)
# libpq's words for a parameter value it cannot take (a port, sslmode, keepalives...), or a
# requirement of the URL the server cannot meet: no wait makes them work.
_BAD_VALUE = re.compile(
    r"invalid (\w+ )?(value|port number)|definition of service|could not match \d+ port"
    r"|could not parse network address|authentication method requirement|channel binding "
    r"required|server does not support SSL"
)
# A plain lower-case identifier: it is spliced into search_path and the NOTIFY channel's name
# (riverbed_events_<schema>), which PostgreSQL refuses past 63 bytes.
SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,46}")


@dataclass(frozen=True)
class Settings:
    conninfo: str  # what psycopg connects with; may hold a password
    where: str  # the server for messages: never the password
    schema: str
    channel: str  # NOTIFY channel of this store's appends
    pool_size: int
    # How long a call waits for a connection of the pool (all busy, or the server down).
    pool_timeout: float
    # Microseconds a sync append polls for the server's answer before it sleeps (spinning.py).
    spin_us: int
    # Seconds the sync store waits for the answer to a statement (0: no limit; watchdog.py).
    command_timeout: float


def parse_settings(parsed: BackendUrl) -> Settings:
    if "options" in parsed.options:
        raise InvalidUrlError(
            f"options= in {parsed.shown!r}: riverbed sets the connections' options itself "
            "(search_path from schema=); set other server settings on the database or role "
            "(ALTER ROLE ... SET)"
        )
    options = parsed.pop_options({**RIVERBED_OPTIONS, **LIBPQ_OPTIONS})
    schema = options["schema"]
    if not SCHEMA_NAME.fullmatch(schema):
        raise InvalidUrlError(
            f"schema={schema!r} in the event store URL is not a plain lower-case name of up to "
            "47 letters, digits and underscores; pick one like schema=shop_events"
        )
    if schema == "information_schema" or schema.startswith("pg_"):
        raise InvalidUrlError(
            f"schema={schema!r} in the event store URL is one of PostgreSQL's own; pick one "
            "like schema=shop_events"
        )
    try:
        pool_size = int(options["pool_size"])
    except ValueError:
        pool_size = 0
    if pool_size < 1:
        raise InvalidUrlError(
            f"pool_size={options['pool_size']!r} in the event store URL is not a positive "
            "number of connections; use e.g. pool_size=10"
        )
    try:
        pool_timeout = float(options["pool_timeout"])
    except ValueError:
        pool_timeout = 0.0
    if not 0 < pool_timeout <= MAX_POOL_TIMEOUT_S:
        raise InvalidUrlError(
            f"pool_timeout={options['pool_timeout']!r} in the event store URL is not a positive "
            f"number of seconds up to {MAX_POOL_TIMEOUT_S:,} (a day); use e.g. pool_timeout=5"
        )
    spin_us = options["spin_us"]
    if not (re.fullmatch(r"\d{1,5}", spin_us) and int(spin_us) <= MAX_SPIN_US):
        raise InvalidUrlError(
            f"spin_us={spin_us!r} in the event store URL is not a whole number of microseconds "
            f"from 0 to {MAX_SPIN_US:,}: how long an append polls for the server's answer "
            f"before it sleeps (default {SPIN_US}; 0 sleeps at once)"
        )
    try:
        command_timeout = float(options["command_timeout"])
    except ValueError:
        command_timeout = -1.0
    if not 0 <= command_timeout <= MAX_POOL_TIMEOUT_S:
        raise InvalidUrlError(
            f"command_timeout={options['command_timeout']!r} in the event store URL is not a "
            f"number of seconds from 0 to {MAX_POOL_TIMEOUT_S:,} (a day): how long a call waits "
            "for the server's answer to a statement before it gives the connection up (default "
            "60; 0 waits as long as it takes)"
        )
    if not re.fullmatch(r"\d{1,9}", options["connect_timeout"]):
        raise InvalidUrlError(
            f"connect_timeout={options['connect_timeout']!r} in the event store URL is not a "
            "whole number of seconds; use e.g. connect_timeout=3"
        )
    if options["target_session_attrs"] in READ_ONLY_SESSIONS:
        # Such a session (a standby's, or one read-only by default) refuses every write: the
        # store would wait for a writable server that the URL rules out.
        raise InvalidUrlError(
            f"target_session_attrs={options['target_session_attrs']} in the event store URL "
            "picks servers that refuse writes, and riverbed writes its events, checkpoints and "
            "read models; use read-write or primary (or leave it out)"
        )
    parts = urlsplit(parsed.raw)
    libpq = {key: options[key] for key in LIBPQ_OPTIONS if options[key]}
    query = urlencode(libpq, quote_via=quote)  # a space as %20: libpq reads no "+"
    conninfo = f"postgresql://{parts.netloc}{parts.path}?{query}"
    try:
        parsed_info = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as error:
        raise InvalidUrlError(
            f"invalid PostgreSQL URL {parsed.shown!r}: {_without_secrets(str(error), parts)}"
        ) from None
    where = _where(parsed_info)
    channel = f"riverbed_events_{schema}"
    return Settings(
        conninfo, where, schema, channel, pool_size, pool_timeout, int(spin_us), command_timeout
    )


def _where(info: Mapping[str, object]) -> str:
    """The server, database and user for messages, never the password: what libpq connects to
    (a socket directory as ``?host=``)."""
    hosts = str(info.get("host") or "").split(",")
    ports = str(info.get("port") or "").split(",")
    shown, sockets = [], []
    for i, host in enumerate(hosts):
        port = ports[i] if i < len(ports) else ports[-1]
        if host.startswith(("/", "@")):
            sockets.append(host)
            continue
        named = f"[{host}]" if ":" in host else host
        shown.append(f"{named}:{port}" if named and port else named)
    user = f"{info['user']}@" if info.get("user") else ""
    where = f"postgresql://{user}{','.join(shown)}/{info.get('dbname') or ''}"
    return where + (f"?host={','.join(sockets)}" if sockets else "")


def _without_secrets(message: str, parts: SplitResult) -> str:
    for secret in (parts.password, *(v for k, v in parse_qsl(parts.query) if "password" in k)):
        if secret:
            message = message.replace(secret, "***").replace(unquote(secret), "***")
    return message


def connection_options(settings: Settings) -> str:
    """libpq ``options`` for every connection: unqualified names resolve in the store's schema,
    and each statement of the append function sees what committed before it (READ COMMITTED),
    whatever the server's default isolation."""
    return f"-c search_path={settings.schema} -c default_transaction_isolation=read\\ committed"


def closed(settings: Settings) -> EventSourcingError:
    return EventSourcingError(f"the event store at {settings.where} is closed")


def cancelled(settings: Settings, error: Exception) -> StoreUnavailableError:
    """The server cancelled a statement of the store's (a ``statement_timeout`` or
    ``lock_timeout`` of the database or role, ``pg_cancel_backend``): nothing of it happened,
    and like an outage it is waited out, a runner's wait for its turn included."""
    message = " ".join(str(error).split())
    setting = "lock_timeout" if "lock timeout" in message else "statement_timeout"
    return StoreUnavailableError(
        f"the event store's server at {settings.where} cancelled a statement: {message}; a "
        "statement_timeout or lock_timeout set on the database or role cuts riverbed's waits "
        f"for its locks short (turn it off for the store's user: ALTER ROLE ... SET {setting} "
        "= 0)"
    )


CANCELLED = (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable)


def unavailable(settings: Settings, error: Exception) -> RiverbedError:
    """``StoreUnavailableError`` (waited out as an outage), unless libpq refused a value of
    the URL or the server refused it for good (no such user or database, a wrong password)."""
    message = " ".join(str(error).split())  # libpq's lines, as one
    if bad := _BAD_VALUE.search(message):
        return InvalidUrlError(
            f"the event store's URL {settings.where} cannot work: {message[bad.start() :].strip()}"
        )
    if any(reason in message for reason in _REFUSED_FOR_GOOD):
        return EventSourcingError(
            f"the PostgreSQL server refused the event store's URL {settings.where}: {message}; "
            "check the URL's user, password and database"
        )
    return StoreUnavailableError(
        f"cannot reach the event store at {settings.where}: {message}; check that "
        "PostgreSQL runs there and that the URL's user, database and password are right"
    )


def unanswered(settings: Settings) -> StoreUnavailableError:
    """The server did not answer a statement within ``command_timeout``: its connection was
    given up (watchdog.py)."""
    return StoreUnavailableError(
        f"the event store's server at {settings.where} did not answer within "
        f"{settings.command_timeout:g} s (command_timeout in the URL), so its connection was "
        "closed: the server or its host may be stopped or stalled, or the statement waited that "
        "long for a lock another session held"
    )


def read_only(settings: Settings, error: Exception) -> EventSourcingError:
    return EventSourcingError(
        f"the event store at {settings.where} is read-only for this connection "
        f"({str(error).strip()}): riverbed writes its events, checkpoints and read models "
        "there; connect to the primary server, as a user whose transactions may write"
    )


def no_connection(
    settings: Settings, error: Exception, stats: dict[str, int], pool: str, waited: float
) -> RiverbedError:
    """The error for a pool (named ``pool``) that gave no connection within ``waited`` seconds
    (``stats``: the pool's): the server unreachable or refusing, or all of them in use."""
    # The pool's wait says only that it got no connection: what failed is its last attempt to
    # connect, if that failed (the pool counts the connections it is making as its own, so a
    # full pool with none free may be one that is reconnecting).
    cause = _last_connect_error.pop(pool, None)
    if cause is not None:
        return unavailable(settings, Exception(cause))
    if stats.get("pool_size", 0) >= settings.pool_size and not stats.get("pool_available", 0):
        return StoreUnavailableError(
            f"no connection to the event store at {settings.where} came free within "
            f"{waited:g} s: all {settings.pool_size} of the pool's were in use; "
            "raise pool_size= (or pool_timeout=) in the URL, or have fewer calls at once"
        )
    return unavailable(settings, error)


# The pools of riverbed's stores are named so: their connection attempts during an outage are
# riverbed's to report (once per wait), not one warning each from psycopg_pool.
POOL_NAME_PREFIX = "riverbed-events"


class _QuietDuringOutages(logging.Filter):
    """Drops psycopg_pool's warnings about riverbed's pools, keeping the last connection
    error of each: what a call that got no connection reports (a login refused for good stops
    a worker, an outage is waited out)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        # Named in the record, or the pool of the connection it discards (one the server
        # closed, which the store replaces before a call meets it).
        names = (getattr(getattr(a, "_pool", None), "name", a) for a in args)
        pool = next(
            (a for a in names if isinstance(a, str) and a.startswith(POOL_NAME_PREFIX)), None
        )
        if pool is None or record.levelno != logging.WARNING:
            return True
        if record.msg.startswith("error connecting") and len(args) == 2:
            _last_connect_error[pool] = str(args[1])
        return False


# The last error each of riverbed's pools met connecting, by pool name.
_last_connect_error: dict[str, str] = {}


def pool_options(settings: Settings) -> dict[str, Any]:
    """What the sync and the async store open their pools with, a name of its own (which the
    pool's ``configure`` hook passes to ``forget_connect_error``) among them."""
    return {
        "conninfo": settings.conninfo,
        "kwargs": {"autocommit": True, "options": connection_options(settings)},
        "min_size": 1,
        "max_size": settings.pool_size,
        "timeout": settings.pool_timeout,
        "num_workers": 1,
        "name": f"{POOL_NAME_PREFIX}-{next(_pool_numbers)}",
        "reconnect_timeout": RECONNECT_S,
        "open": False,
    }


def forget_connect_error(pool: str) -> None:
    """Pool ``pool`` made a connection (or closed): what failed before is no longer why a call
    would get none (a login refused, then granted again, is not a later outage's reason)."""
    _last_connect_error.pop(pool, None)


_pool_numbers = itertools.count(1)


logging.getLogger("psycopg.pool").addFilter(_QuietDuringOutages())
