"""Errors of the log layer."""

from __future__ import annotations

from riverbed.errors import RiverbedError


class BrokerUnavailableError(RiverbedError, ConnectionError):
    """The log's server could not be reached within the connect timeout."""


class UnknownTopicError(RiverbedError, LookupError):
    def __init__(self, topic: str) -> None:
        super().__init__(
            f"topic '{topic}' does not exist; create it with: riverbed topics create {topic}"
        )
        self.topic = topic


class TopicExistsError(RiverbedError):
    def __init__(self, topic: str) -> None:
        super().__init__(
            f"topic '{topic}' already exists; pick another name or delete it with: "
            f"riverbed topics delete {topic}"
        )
        self.topic = topic


class InvalidTopicError(RiverbedError, ValueError):
    """A topic name or topic setting that the log does not accept."""


class UnknownPartitionError(RiverbedError, LookupError):
    def __init__(self, topic: str, partition: int, partitions: int) -> None:
        super().__init__(
            f"topic '{topic}' has no partition {partition}; it has partitions 0..{partitions - 1}"
        )


class RecordTooLargeError(RiverbedError, ValueError):
    def __init__(self, topic: str, size: int, limit: int) -> None:
        super().__init__(
            f"record of {size} bytes is larger than the {limit}-byte limit of topic '{topic}'; "
            f"send smaller records or raise the limit with "
            f"create_topic(..., max_record_bytes=N)"
        )
        self.size = size
        self.limit = limit


class CorruptLogError(RiverbedError):
    """Stored data failed its checksum or could not be decoded: never return wrong records."""


class CommitFailedError(RiverbedError):
    """The consumer was fenced: its group rebalanced, so its commit would overwrite the new owner's.

    The records polled since the last successful commit are delivered again to the partitions'
    new owner; poll again to rejoin the group.
    """


class UnknownGroupError(RiverbedError, LookupError):
    def __init__(self, group: str) -> None:
        super().__init__(
            f"consumer group '{group}' does not exist; list groups with: riverbed groups list"
        )
        self.group = group


class NoLogError(RiverbedError, LookupError):
    """``connect(url, create=False)`` found no embedded log's file at the URL's path."""


class ClosedError(RiverbedError):
    """The producer, consumer or log was used after close()."""


class DeliveryError(RiverbedError):
    """A record could not be written; the message carries the backend's reason."""


class InvalidRecordError(RiverbedError, ValueError):
    """A record the topic cannot take, such as a record without a key on a compacted topic."""


class TransactionAbortedError(RiverbedError):
    """The record's transaction was aborted, so the record was never made visible."""


class TransactionStateError(RiverbedError):
    """A transactional call out of order: begin, send, then commit or abort."""
