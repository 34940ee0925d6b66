"""Layer 0: the partitioned log."""

from __future__ import annotations

from riverbed.log.api import (
    Consumer,
    Log,
    Producer,
    Record,
    RecordMetadata,
    SendFuture,
    TopicInfo,
)
from riverbed.urls import parse_url, resolve_url


def connect(url: str | None = None, *, create: bool = True) -> Log:
    """Open the log at ``url``; None means ``$RIVERBED_URL`` or ``sqlite:///.riverbed/log.db``.
    ``create=False`` refuses an embedded log whose file does not exist (``NoLogError``) instead
    of making it: for tools that only look, where a mistyped path would show an empty log."""
    parsed = parse_url(resolve_url(url), ("sqlite", "kafka"))
    if parsed.scheme == "kafka":
        from riverbed.log.kafka import KafkaLog

        return KafkaLog.from_url(parsed)
    from riverbed.log.sqlite import SqliteLog

    return SqliteLog.from_url(parsed, create)


__all__ = [
    "Consumer",
    "Log",
    "Producer",
    "Record",
    "RecordMetadata",
    "SendFuture",
    "TopicInfo",
    "connect",
]
