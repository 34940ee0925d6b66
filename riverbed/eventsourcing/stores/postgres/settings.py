"""What a ``postgresql://`` URL asks for: the server to connect to (libpq's conninfo, without
riverbed's own options), the schema the store's tables live in and the size of the pool."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

from riverbed.errors import InvalidUrlError
from riverbed.eventsourcing.errors import EventSourcingError, StoreUnavailableError
from riverbed.urls import BackendUrl

# riverbed's options and their defaults.
# How long the pool tries to replace a lost connection before it gives up, to try again at the
# next call: its pauses between tries double from a second, so after a long outage it would find
# the server back only a long while after it returned.
RECONNECT_S = 2.0
RIVERBED_OPTIONS = {"schema": "public", "pool_size": "10", "pool_timeout": "30"}
# libpq's parameters a URL may carry on to the server connection ("" = libpq's default). An
# unreachable server fails within ``connect_timeout`` seconds, not after the OS's TCP timeout.
LIBPQ_OPTIONS = {
    "connect_timeout": "3",
    "application_name": "",
    "sslmode": "",
    "sslrootcert": "",
    "sslcert": "",
    "sslkey": "",
    "target_session_attrs": "",
}
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


def parse_settings(parsed: BackendUrl) -> Settings:
    options = parsed.pop_options({**RIVERBED_OPTIONS, **LIBPQ_OPTIONS})
    schema = options["schema"]
    if not SCHEMA_NAME.fullmatch(schema):
        raise InvalidUrlError(
            f"schema={schema!r} in the event store URL is not a plain lower-case name of up to "
            "47 letters, digits and underscores; pick one like schema=shop_events"
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
    if not pool_timeout > 0:
        raise InvalidUrlError(
            f"pool_timeout={options['pool_timeout']!r} in the event store URL is not a positive "
            "number of seconds; use e.g. pool_timeout=5"
        )
    parts = urlsplit(parsed.raw)
    libpq = {key: options[key] for key in LIBPQ_OPTIONS if options[key]}
    conninfo = parts._replace(scheme="postgresql", query=urlencode(libpq), fragment="").geturl()
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    user = f"{parts.username}@" if parts.username else ""
    port = f":{parts.port}" if parts.port else ""
    where = f"postgresql://{user}{host}{port}{parts.path}"
    channel = f"riverbed_events_{schema}"
    return Settings(conninfo, where, schema, channel, pool_size, pool_timeout)


def connection_options(settings: Settings) -> str:
    """libpq ``options`` for every connection: unqualified names resolve in the store's schema,
    and each statement of the append function sees what committed before it (READ COMMITTED),
    whatever the server's default isolation."""
    return f"-c search_path={settings.schema} -c default_transaction_isolation=read\\ committed"


def closed(settings: Settings) -> EventSourcingError:
    return EventSourcingError(f"the event store at {settings.where} is closed")


def unavailable(settings: Settings, error: Exception) -> StoreUnavailableError:
    return StoreUnavailableError(
        f"cannot reach the event store at {settings.where}: {str(error).strip()}; check that "
        "PostgreSQL runs there and that the URL's user, database and password are right"
    )


def no_connection(
    settings: Settings, error: Exception, stats: dict[str, int]
) -> StoreUnavailableError:
    """The error for a pool that gave no connection in time (``stats``: the pool's): all of
    them in use, or the server unreachable."""
    if stats.get("pool_size", 0) >= settings.pool_size and not stats.get("pool_available", 0):
        return StoreUnavailableError(
            f"no connection to the event store at {settings.where} came free within "
            f"{settings.pool_timeout:g} s: all {settings.pool_size} of the pool's were in use; "
            "raise pool_size= (or pool_timeout=) in the URL, or have fewer calls at once"
        )
    return unavailable(settings, error)
