"""Riverbed: a partitioned log, stream processing, tasks, event sourcing and vector search."""

from __future__ import annotations

from riverbed.errors import InvalidUrlError, MissingExtraError, RiverbedError
from riverbed.log import connect
from riverbed.log.api import (
    Consumer,
    GroupDescription,
    Log,
    PartitionInfo,
    Producer,
    Record,
    RecordMetadata,
    SendFuture,
    TopicDescription,
    TopicInfo,
)
from riverbed.log.errors import (
    BrokerUnavailableError,
    ClosedError,
    CommitFailedError,
    CorruptLogError,
    DeliveryError,
    InvalidTopicError,
    RecordTooLargeError,
    TopicExistsError,
    UnknownGroupError,
    UnknownPartitionError,
    UnknownTopicError,
)

__version__ = "0.1.0"

__all__ = [
    "BrokerUnavailableError",
    "ClosedError",
    "CommitFailedError",
    "Consumer",
    "CorruptLogError",
    "DeliveryError",
    "GroupDescription",
    "InvalidTopicError",
    "InvalidUrlError",
    "Log",
    "MissingExtraError",
    "PartitionInfo",
    "Producer",
    "Record",
    "RecordMetadata",
    "RecordTooLargeError",
    "RiverbedError",
    "SendFuture",
    "TopicDescription",
    "TopicExistsError",
    "TopicInfo",
    "UnknownGroupError",
    "UnknownPartitionError",
    "UnknownTopicError",
    "__version__",
    "connect",
]
