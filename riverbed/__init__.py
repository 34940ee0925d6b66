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
    InvalidRecordError,
    InvalidTopicError,
    RecordTooLargeError,
    TopicExistsError,
    UnknownGroupError,
    UnknownPartitionError,
    UnknownTopicError,
)
from riverbed.serde.codecs import DeserializationError, SerializationError
from riverbed.serde.compat import Compatibility
from riverbed.serde.registry import IncompatibleSchemaError
from riverbed.streams import App, Topic, TypedRecord
from riverbed.streams.aggregators import (
    Aggregator,
    collect,
    count,
    latest,
    max,
    mean,
    min,
    sum,
)
from riverbed.streams.handlers import Backoff, exponential
from riverbed.streams.windows import Windowed, hopping, session, sliding, tumbling

__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "App",
    "Backoff",
    "BrokerUnavailableError",
    "ClosedError",
    "CommitFailedError",
    "Compatibility",
    "Consumer",
    "CorruptLogError",
    "DeliveryError",
    "DeserializationError",
    "GroupDescription",
    "IncompatibleSchemaError",
    "InvalidRecordError",
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
    "SerializationError",
    "Topic",
    "TopicDescription",
    "TopicExistsError",
    "TopicInfo",
    "TypedRecord",
    "UnknownGroupError",
    "UnknownPartitionError",
    "UnknownTopicError",
    "Windowed",
    "__version__",
    "collect",
    "connect",
    "count",
    "exponential",
    "hopping",
    "latest",
    "max",
    "mean",
    "min",
    "session",
    "sliding",
    "sum",
    "tumbling",
]
