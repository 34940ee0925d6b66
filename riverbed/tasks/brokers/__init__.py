"""Task brokers: ``sqlite:///.riverbed/tasks.db`` (default) and ``redis://host:6379/0``."""

from __future__ import annotations

from riverbed.errors import MissingExtraError
from riverbed.tasks.brokers.api import Broker
from riverbed.urls import parse_url, resolve_url

TASKS_URL_ENV = "RIVERBED_TASKS_URL"
DEFAULT_TASKS_URL = "sqlite:///.riverbed/tasks.db"


def connect_broker(url: str | None = None, *, create: bool = True) -> Broker:
    """The broker at ``url``, else ``$RIVERBED_TASKS_URL``, else the SQLite default.

    Fails fast (``BrokerUnavailableError``) when a server URL cannot be reached; with
    ``create=False``, a SQLite task database that does not exist is an error, not made."""
    resolved = resolve_url(url, TASKS_URL_ENV, DEFAULT_TASKS_URL)
    parsed = parse_url(resolved, ("sqlite", "redis", "rediss"))  # rediss: Redis over TLS
    if parsed.scheme == "sqlite":
        from riverbed.tasks.brokers.sqlite import SqliteBroker

        return SqliteBroker(parsed, create=create)
    try:
        import redis  # noqa: F401
    except ImportError:
        raise MissingExtraError("the redis:// task broker", "redis", "redis") from None
    from riverbed.tasks.brokers.redis import RedisBroker

    return RedisBroker(parsed)


__all__ = ["DEFAULT_TASKS_URL", "TASKS_URL_ENV", "Broker", "connect_broker"]
