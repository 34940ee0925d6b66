"""The log on Apache Kafka: ``kafka://host:9092[,host2:9092]?connect_timeout=10``.

Topics, offsets and groups go through confluent-kafka's ``AdminClient``; ``KafkaProducer`` and
``KafkaConsumer`` wrap librdkafka's producer and consumer, and ``KafkaTransactionalProducer`` its
transactional producer (exactly-once read-process-write; consumers read committed records only).
librdkafka's ``murmur2_random`` partitioner places keyed records exactly as the SQLite backend's
murmur2 does (the tests cross-check them), so a key lands in the same partition number on both;
keyless records are spread by the same ``StickyPartitioner`` on both.

URL options: ``connect_timeout`` (seconds), ``replication_factor`` (of new topics), and any
librdkafka setting, recognised by its dot (``?security.protocol=ssl&client.id=shop``).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from riverbed.errors import InvalidUrlError, MissingExtraError, RiverbedError
from riverbed.log.api import (
    DEFAULT_DELETE_RETENTION_MS,
    DEFAULT_MAX_RECORD_BYTES,
    DEFAULT_SESSION_TIMEOUT_MS,
    MAX_POLL_INTERVAL_MS,
    RECORD_OVERHEAD,
    Closing,
    Consumer,
    DeliveryErrors,
    GroupDescription,
    GroupMember,
    GroupPartitionOffset,
    KeyValueHeaders,
    PartitionInfo,
    RebalanceCallback,
    Record,
    RecordMetadata,
    SendFuture,
    TopicDescription,
    TopicInfo,
    TopicPartition,
    check_batch,
    check_offset,
    check_partition,
    check_record,
    check_time,
    check_timestamp,
    check_types,
    consumer_topics,
    lag_of,
    record_size,
    timed_items,
    validate_topic,
)
from riverbed.log.errors import (
    BrokerUnavailableError,
    ClosedError,
    CommitFailedError,
    DeliveryError,
    InvalidRecordError,
    InvalidTopicError,
    TopicExistsError,
    TransactionAbortedError,
    TransactionStateError,
    UnknownGroupError,
    UnknownTopicError,
)
from riverbed.log.partitioner import StickyPartitioner
from riverbed.urls import BackendUrl

try:
    import confluent_kafka
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka import TopicPartition as KafkaTopicPartition
    from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported, not in __all__
        AdminClient,
        ConfigResource,
        NewTopic,
        OffsetSpec,
        ResourceType,
    )
except ImportError as error:  # riverbed.connect imports this module only for kafka:// URLs
    raise MissingExtraError("kafka:// URLs", "kafka", "confluent-kafka") from error

logger = logging.getLogger(__name__)

URL_OPTIONS = {"connect_timeout": "10", "replication_factor": "1"}
# Admin requests (create, delete, list offsets...) may wait this long for the controller.
REQUEST_TIMEOUT_S = 30.0
# Kafka's max.message.bytes limits a whole record batch; riverbed's max_record_bytes limits one
# record's key, value and headers. The difference leaves room for the batch header (61 bytes) and
# the record's own framing (varint lengths, up to ~10 bytes per header), so a record exactly at
# the limit is accepted on Kafka as on SQLite.
RECORD_BATCH_OVERHEAD = 512
# librdkafka refuses records larger than its message.max.bytes before they reach the broker;
# raise it to just under the broker's socket.request.max.bytes (100 MiB) so that only the topic's
# own limit applies.
CLIENT_MAX_MESSAGE_BYTES = 100_000_000
CLUSTER_INTERNAL_PREFIX = "__"
QUEUE_MAX_MESSAGES = 1_000_000
# How long a producer whose queue is full waits for deliveries between tries.
ROOM_WAIT_S = 0.05
# How long a record to a topic sent one at a time may take to be acknowledged.
UNBATCHED_FLUSH_S = 5.0
# send_many serves delivery reports every this many records; the background thread serves them
# once the sending thread has been idle for this long.
SERVE_EVERY = 1000
IDLE_SERVE_S = 0.005
_NO_EXTRAS: Mapping[str, Any] = {}
UNASSIGNED_PARTITION = -1  # librdkafka's RD_KAFKA_PARTITION_UA: its partitioner chooses

# A member whose group moved on: its commit would overwrite the new owner's offsets.
_FENCED = frozenset(
    {
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.FENCED_INSTANCE_ID,
        KafkaError.STALE_MEMBER_EPOCH,
        KafkaError._ASSIGNMENT_LOST,
        KafkaError._MAX_POLL_EXCEEDED,
    }
)
# A transactional producer whose epoch is stale: the broker aborted its transaction on timeout
# (or another producer took its transactional.id). librdkafka reports it as a fatal error.
_PRODUCER_FENCED = frozenset(
    {KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH}
)
# How records of an aborted transaction are reported (librdkafka purges them).
_PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})
# The broker aborts a transaction open for longer (Kafka Streams' exactly-once default). A
# transactional.id per producer instance means no successor aborts a crashed member's open
# transaction, and until the broker does, read_committed consumers wait at its first record.
# ``?transaction.timeout.ms=N`` in the URL changes it.
TRANSACTION_TIMEOUT_MS = 10_000
# The retry delay after CONCURRENT_TRANSACTIONS (see KafkaTransactionalProducer).
TRANSACTION_RETRY_BACKOFF_MS = 10
_MISSING_TOPIC = frozenset(
    {KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION}
)
LEADER_WAIT_S = 0.05
# What the broker refuses for good: a record too large for the topic, a topic it may not have.
_REFUSED = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_TIMESTAMP,  # outside the topic's message.timestamp.*.max.ms
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
    }
)
# A partition's leader changing, or not yet known to every broker (a new topic): ask again.
_LEADER_MOVING = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_LEADER_EPOCH,
        KafkaError.FENCED_LEADER_EPOCH,
    }
)
# A group coordinator that is still loading (a fresh broker) or moving: ask again.
_COORDINATOR_MOVING = frozenset(
    {
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.NOT_COORDINATOR,
    }
)
# Consumer errors librdkafka recovers from by itself (reconnects, rejoins, offset resets).
_TRANSIENT = frozenset(
    {
        KafkaError._PARTITION_EOF,
        KafkaError._MAX_POLL_EXCEEDED,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._TIMED_OUT,
        KafkaError._AUTO_OFFSET_RESET,
    }
)
_GROUP_STATES = {
    "PREPARING_REBALANCING": "PreparingRebalance",
    "COMPLETING_REBALANCING": "CompletingRebalance",
}


def _check_brokers(url: BackendUrl) -> None:
    """Each of the URL's brokers is a host, and a port from 1 to 65535 if it gives one (else
    librdkafka's 9092): librdkafka would only report, after the connect timeout, that it
    reached none."""
    for broker in url.location.split(","):
        host, colon, port = broker.rpartition(":")
        if broker.endswith("]") or not colon:  # an IPv6 address or a name, without a port
            host, port = broker, "9092"
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise InvalidUrlError(
                f"invalid URL {url.shown!r}: {broker!r} is not host:port with a port from 1 to "
                "65535; write kafka://host:9092 (several as kafka://h1:9092,h2:9092)"
            )


def _kafka_error(error: KafkaException) -> Any:
    """The ``KafkaError`` inside a ``KafkaException`` (librdkafka puts it in ``args[0]``)."""
    return error.args[0] if error.args else None


def _code(error: KafkaException) -> int | None:
    inner = _kafka_error(error)
    return inner.code() if isinstance(inner, KafkaError) else None


class KafkaLog(Closing):
    """A Kafka cluster seen through riverbed's log contract."""

    def __init__(
        self,
        bootstrap: str,
        config: Mapping[str, str] | None = None,
        connect_timeout: float = 10.0,
        replication_factor: int = 1,
        url: str | None = None,
    ) -> None:
        self._bootstrap = bootstrap
        self._url = url or f"kafka://{bootstrap}"
        # librdkafka logs through Python logging instead of writing to stderr.
        self.client_config: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "logger": logger,
            **(config or {}),
        }
        self._connect_timeout = connect_timeout
        self._replication_factor = replication_factor
        self._admin = AdminClient(self.client_config)
        self._children: weakref.WeakSet[KafkaProducer | KafkaConsumer] = weakref.WeakSet()
        self._closed = False
        try:
            self._admin.list_topics(timeout=connect_timeout)
        except KafkaException as error:
            raise BrokerUnavailableError(
                f"cannot reach Kafka at {bootstrap} within {connect_timeout:g} s "
                f"({_kafka_error(error)}); check that the broker runs and the address is right, "
                f"or wait longer with ?connect_timeout=SECONDS"
            ) from None

    @classmethod
    def from_url(cls, url: BackendUrl) -> KafkaLog:
        passthrough = {k: v for k, v in url.options.items() if "." in k}
        options = {k: v for k, v in url.options.items() if "." not in k}
        parsed = BackendUrl(url.raw, url.scheme, url.location, options).pop_options(URL_OPTIONS)
        try:
            connect_timeout = float(parsed["connect_timeout"])
            replication_factor = int(parsed["replication_factor"])
        except ValueError:
            raise InvalidUrlError(
                f"invalid option in {url.shown!r}: connect_timeout must be a number of seconds "
                "and replication_factor a whole number"
            ) from None
        if connect_timeout <= 0 or replication_factor < 1:
            raise InvalidUrlError(
                f"invalid option in {url.shown!r}: connect_timeout must be > 0 "
                "and replication_factor >= 1"
            )
        _check_brokers(url)
        return cls(url.location, passthrough, connect_timeout, replication_factor, url.raw)

    @property
    def url(self) -> str:
        return self._url

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the log is closed; open it again with riverbed.connect()")

    # Topics

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        compact: bool = False,
        retention_ms: int | None = None,
        retention_bytes: int | None = None,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        delete_retention_ms: int = DEFAULT_DELETE_RETENTION_MS,
    ) -> TopicInfo:
        self._check_open()
        info = TopicInfo(
            name,
            partitions,
            compact,
            retention_ms,
            retention_bytes,
            max_record_bytes,
            delete_retention_ms,
        )
        validate_topic(info)
        policy = ["compact"] if compact else []
        if not compact or retention_ms is not None or retention_bytes is not None:
            policy.append("delete")
        config = {
            "cleanup.policy": ",".join(policy),
            # None means keep forever, as on SQLite; Kafka's own default is 7 days.
            "retention.ms": str(-1 if retention_ms is None else retention_ms),
            "retention.bytes": str(-1 if retention_bytes is None else retention_bytes),
            "max.message.bytes": str(max_record_bytes + RECORD_BATCH_OVERHEAD),
            "delete.retention.ms": str(delete_retention_ms),
        }
        topic = NewTopic(name, partitions, self._replication_factor, config=config)
        future = self._admin.create_topics([topic], request_timeout=REQUEST_TIMEOUT_S)[name]
        try:
            future.result()
        except KafkaException as error:
            if _code(error) == KafkaError.TOPIC_ALREADY_EXISTS:
                raise TopicExistsError(name) from None
            raise InvalidTopicError(
                f"Kafka refused to create topic '{name}': {_kafka_error(error)}"
            ) from None
        self._wait_for_leaders(name, partitions)
        return info

    def _wait_for_leaders(self, name: str, partitions: int) -> None:
        # CreateTopics returns once the controller wrote the topic; brokers learn it a moment
        # later. Wait until every partition has a leader, so producing right away succeeds.
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while time.monotonic() < deadline:
            metadata = self._admin.list_topics(topic=name, timeout=self._connect_timeout)
            topic = metadata.topics.get(name)
            if (
                topic is not None
                and topic.error is None
                and len(topic.partitions) == partitions
                and all(p.leader >= 0 and p.error is None for p in topic.partitions.values())
            ):
                return
            time.sleep(0.02)
        raise BrokerUnavailableError(
            f"topic '{name}' was created but its partitions got no leader within "
            f"{REQUEST_TIMEOUT_S:g} s; check the brokers' health"
        )

    def _metadata(self, topic: str | None = None) -> Any:
        try:
            if topic is None:
                return self._admin.list_topics(timeout=self._connect_timeout)
            return self._admin.list_topics(topic=topic, timeout=self._connect_timeout)
        except KafkaException as error:
            raise BrokerUnavailableError(
                f"Kafka at {self._bootstrap} did not answer: {_kafka_error(error)}"
            ) from None

    def partition_count(self, topic: str) -> int:
        """The topic's partition count from the cluster metadata; ``UnknownTopicError`` if none."""
        self._check_open()
        found = self._metadata(topic).topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            raise UnknownTopicError(topic)
        return len(found.partitions)

    def _topic_infos(self, counts: Mapping[str, int]) -> list[TopicInfo]:
        resources = [ConfigResource(ResourceType.TOPIC, name) for name in counts]
        if not resources:
            return []
        futures = self._admin.describe_configs(resources, request_timeout=REQUEST_TIMEOUT_S)
        infos = []
        for resource, future in futures.items():
            name = resource.name
            try:
                entries = future.result()
            except KafkaException as error:
                if _code(error) in _MISSING_TOPIC:
                    raise UnknownTopicError(name) from None
                raise
            config = {key: entry.value for key, entry in entries.items()}
            retention_ms = int(config["retention.ms"])
            retention_bytes = int(config["retention.bytes"])
            infos.append(
                TopicInfo(
                    name=name,
                    partitions=counts[name],
                    compact="compact" in config["cleanup.policy"].split(","),
                    retention_ms=None if retention_ms < 0 else retention_ms,
                    retention_bytes=None if retention_bytes < 0 else retention_bytes,
                    max_record_bytes=max(
                        int(config["max.message.bytes"]) - RECORD_BATCH_OVERHEAD, 0
                    ),
                    delete_retention_ms=int(config["delete.retention.ms"]),
                )
            )
        return sorted(infos, key=lambda info: info.name)

    def list_topics(self) -> list[TopicInfo]:
        self._check_open()
        counts = {
            name: len(topic.partitions)
            for name, topic in self._metadata().topics.items()
            if not name.startswith(CLUSTER_INTERNAL_PREFIX) and topic.error is None
        }
        return self._topic_infos(counts)

    def topic(self, name: str) -> TopicInfo:
        return self._topic_infos({name: self.partition_count(name)})[0]

    def describe_topic(self, name: str) -> TopicDescription:
        info = self.topic(name)
        beginning = self.beginning_offsets(name)
        end = self.end_offsets(name)
        sizes = self._partition_sizes(name)
        return TopicDescription(
            info,
            [
                PartitionInfo(p, beginning[p], end[p], sizes.get(p, 0))
                for p in range(info.partitions)
            ],
        )

    def _partition_sizes(self, topic: str) -> dict[int, int]:
        """Bytes on disk per partition, from the leaders' DescribeLogDirs answers.

        librdkafka has no DescribeLogDirs call (confluentinc/librdkafka#5192), so this sends the
        request itself; it needs a PLAINTEXT listener and reports 0 where it cannot ask.
        """
        if self.client_config.get("security.protocol", "plaintext").lower() != "plaintext":
            return {}
        metadata = self._metadata(topic)
        found = metadata.topics.get(topic)
        if found is None or found.error is not None:
            raise UnknownTopicError(topic)
        leaders: dict[int, list[int]] = {}
        for partition in found.partitions.values():
            leaders.setdefault(partition.leader, []).append(partition.id)
        sizes: dict[int, int] = {}
        for broker_id, partitions in leaders.items():
            broker = metadata.brokers.get(broker_id)
            if broker is None:
                continue
            try:
                answer = describe_log_dirs(broker.host, broker.port, topic, partitions)
            except OSError as error:
                logger.warning("cannot ask broker %s for partition sizes: %s", broker_id, error)
                continue
            sizes.update((p, answer[p]) for p in partitions if p in answer)
        return sizes

    def delete_topic(self, name: str) -> None:
        self._check_open()
        future = self._admin.delete_topics([name], request_timeout=REQUEST_TIMEOUT_S)[name]
        try:
            future.result()
        except KafkaException as error:
            if _code(error) in _MISSING_TOPIC:
                raise UnknownTopicError(name) from None
            raise
        # Wait until the brokers forgot it, so that creating it again right away works.
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while time.monotonic() < deadline and name in self._metadata().topics:
            time.sleep(0.02)

    def _list_offsets(self, topic: str, spec: Any) -> dict[int, int]:
        partitions = self.partition_count(topic)
        request = {KafkaTopicPartition(topic, p): spec for p in range(partitions)}
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while True:
            futures = self._admin.list_offsets(request, request_timeout=REQUEST_TIMEOUT_S)
            try:
                return {tp.partition: future.result().offset for tp, future in futures.items()}
            except KafkaException as error:
                if _code(error) in _MISSING_TOPIC:
                    raise UnknownTopicError(topic) from None
                # Just after a topic is created, a broker may not know yet that it leads a
                # partition: ask again.
                if _code(error) not in _LEADER_MOVING or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def beginning_offsets(self, topic: str) -> dict[int, int]:
        return self._list_offsets(topic, OffsetSpec.earliest())  # type: ignore[no-untyped-call]

    def end_offsets(self, topic: str) -> dict[int, int]:
        return self._list_offsets(topic, OffsetSpec.latest())  # type: ignore[no-untyped-call]

    def offsets_for_times(self, topic: str, timestamp_ms: int) -> dict[int, int | None]:
        check_time(timestamp_ms)
        found = self._list_offsets(topic, OffsetSpec.for_timestamp(timestamp_ms))
        # Kafka answers -1 for a partition without a record at or after the timestamp.
        return {p: (None if offset < 0 else offset) for p, offset in found.items()}

    # Clients

    def producer(self, linger_ms: float = 5.0, batch_size: int = 1_000_000) -> KafkaProducer:
        """``batch_size`` defaults to librdkafka's own 1 MB (the embedded log's default too): a
        batch per partition per linger, not Java's 16 KiB, which costs librdkafka a third of its
        throughput."""
        self._check_open()
        producer = KafkaProducer(self, linger_ms=linger_ms, batch_size=batch_size)
        self._children.add(producer)
        return producer

    def transactional_producer(
        self, consumer: Consumer, linger_ms: float = 5.0, batch_size: int = 1_000_000
    ) -> KafkaTransactionalProducer:
        self._check_open()
        if not isinstance(consumer, KafkaConsumer):
            raise RiverbedError(
                "a transactional producer commits the offsets of a consumer of the same log; "
                "create it with log.consumer(group='name', ...)"
            )
        producer = KafkaTransactionalProducer(self, consumer, linger_ms, batch_size)
        self._children.add(producer)
        return producer

    def consumer(
        self,
        group: str | None = None,
        topics: Iterable[str] = (),
        from_beginning: bool = False,
        session_timeout_ms: int = DEFAULT_SESSION_TIMEOUT_MS,
        on_assign: RebalanceCallback | None = None,
        on_revoke: RebalanceCallback | None = None,
    ) -> KafkaConsumer:
        self._check_open()
        consumer = KafkaConsumer(
            self,
            group=group,
            topics=consumer_topics(group, topics),
            from_beginning=from_beginning,
            session_timeout_ms=session_timeout_ms,
            on_assign=on_assign,
            on_revoke=on_revoke,
        )
        self._children.add(consumer)
        return consumer

    # Groups

    def list_groups(self) -> list[str]:
        self._check_open()
        listed = self._admin.list_consumer_groups(request_timeout=REQUEST_TIMEOUT_S).result()
        return sorted(g.group_id for g in listed.valid if not g.is_simple_consumer_group)

    def describe_group(self, group: str) -> GroupDescription:
        self._check_open()

        def describe() -> Any:  # a new request each time: a future answers once
            futures = self._admin.describe_consumer_groups(
                [group], request_timeout=REQUEST_TIMEOUT_S
            )
            return futures[group].result()

        described = _while_coordinator_moves(describe)
        committed = self._committed_offsets(group)
        state = described.state.name
        if state == "DEAD" and not committed:
            raise UnknownGroupError(group)
        members = sorted(
            (
                GroupMember(
                    m.member_id,
                    sorted((tp.topic, tp.partition) for tp in m.assignment.topic_partitions),
                )
                for m in described.members
            ),
            key=lambda m: m.member_id,
        )
        partitions = set(committed)
        for member in members:
            partitions.update(member.assignment)
        bounds = self._bounds(partitions)
        offsets = []
        for tp in sorted(partitions):
            if tp not in bounds:
                continue  # its topic was deleted
            beginning, end = bounds[tp]
            done = committed.get(tp)
            offsets.append(GroupPartitionOffset(*tp, done, end, lag_of(done, beginning, end)))
        return GroupDescription(
            group=group,
            state=_GROUP_STATES.get(state, state.capitalize()),
            # Kafka's DescribeGroups answer carries no generation for classic groups.
            generation=-1,
            members=members,
            offsets=offsets,
        )

    def _committed_offsets(self, group: str) -> dict[TopicPartition, int]:
        request = [confluent_kafka.ConsumerGroupTopicPartitions(group)]

        def list_offsets() -> Any:  # a new request each time: a future answers once
            futures = self._admin.list_consumer_group_offsets(
                request, request_timeout=REQUEST_TIMEOUT_S
            )
            return futures[group].result()

        answer = _while_coordinator_moves(list_offsets)
        return {
            (tp.topic, tp.partition): tp.offset
            for tp in answer.topic_partitions or []
            if tp.offset >= 0
        }

    def _bounds(
        self, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, tuple[int, int]]:
        """Beginning and end offset of each partition; partitions of deleted topics are left out."""
        bounds = {}
        for topic in sorted({t for t, _ in partitions}):
            try:
                beginning = self.beginning_offsets(topic)
                end = self.end_offsets(topic)
            except UnknownTopicError:
                continue
            bounds.update({(topic, p): (beginning[p], end[p]) for p in beginning})
        return bounds

    def group_lag(self, group: str) -> dict[TopicPartition, int]:
        return {(o.topic, o.partition): o.lag for o in self.describe_group(group).offsets}

    # Lifecycle

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for child in list(self._children):
            child.close()


def _while_coordinator_moves(request: Callable[[], Any]) -> Any:
    """``request()``, again while the group coordinator is loading or moving (up to the request
    timeout)."""
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while True:
        try:
            return request()
        except KafkaException as error:
            if _code(error) not in _COORDINATOR_MOVING or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def describe_log_dirs(
    host: str, port: int, topic: str, partitions: list[int], timeout: float = REQUEST_TIMEOUT_S
) -> dict[int, int]:
    """Size in bytes of ``topic``'s partitions on one broker: Kafka's DescribeLogDirs, version 1.

    Request header v1 (api key 35, version, correlation id, client id), then the topics to
    describe; the answer lists, per log dir, per topic, each partition's size.
    """
    name = topic.encode()
    body = struct.pack(">hhih", 35, 1, 1, 8) + b"riverbed"
    body += struct.pack(">ih", 1, len(name)) + name + struct.pack(">i", len(partitions))
    body += b"".join(struct.pack(">i", p) for p in partitions)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(body)) + body)
        (length,) = struct.unpack(">i", _read_exactly(sock, 4))
        answer = _read_exactly(sock, length)
    sizes: dict[int, int] = {}
    # correlation id, throttle time, then the array of log dir results
    (dirs,) = struct.unpack_from(">i", answer, 8)
    at = 12
    for _ in range(dirs):
        error_code, dir_length = struct.unpack_from(">hh", answer, at)
        at += 4 + dir_length
        (topics,) = struct.unpack_from(">i", answer, at)
        at += 4
        for _ in range(topics):
            (name_length,) = struct.unpack_from(">h", answer, at)
            at += 2 + name_length
            (count,) = struct.unpack_from(">i", answer, at)
            at += 4
            for _ in range(count):
                partition, size = struct.unpack_from(">iq", answer, at)
                at += 4 + 8 + 8 + 1  # partition, size, offset lag, is-future flag
                if error_code == 0:
                    sizes[partition] = sizes.get(partition, 0) + size
    return sizes


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("the broker closed the connection mid-answer")
        chunks += chunk
    return bytes(chunks)


class _DeliveryFuture(SendFuture):
    """A ``SendFuture`` that is its own delivery callback (no closure per record on ``send``); it
    keeps the delivered message and builds the metadata only when asked."""

    __slots__ = ("_error", "_message", "_producer")

    def __init__(self, producer: KafkaProducer) -> None:
        self._callbacks = None
        self._producer = producer
        self._message: Any = None
        self._error: BaseException | None = None

    def _outcome(self) -> RecordMetadata | BaseException | None:
        if self._error is not None:
            return self._error
        message = self._message
        if message is None:
            return None
        return RecordMetadata(
            message.topic(), message.partition(), message.offset(), message.timestamp()[1]
        )

    def _force(self, timeout: float | None) -> None:
        self._producer.flush_for_future(timeout)

    def __call__(self, error: Any, message: Any) -> None:
        # Runs on whichever thread serves delivery reports, for every record: no lock unless a
        # callback was registered (see add_done_callback for why none is missed).
        if error is not None:
            self._error = self._producer.delivery_error(message.topic(), error)
        self._message = message
        if self._callbacks is not None:
            self._run_registered()

    def _run_registered(self) -> None:
        with self._producer.delivery_lock:
            callbacks, self._callbacks = self._callbacks, None
        for callback in callbacks or ():
            callback(self)

    def add_done_callback(self, callback: Callable[[SendFuture], None]) -> None:
        with self._producer.delivery_lock:
            pending = self._message is None
            if pending:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(callback)
        if not pending:
            callback(self)
        elif self._message is not None:
            # Delivered between the check and the registration: __call__ may have looked for
            # callbacks before there were any, so run them here (the swap runs each once).
            self._run_registered()


class KafkaProducer(Closing):
    """librdkafka's idempotent producer: acks=all, ordered per partition, no duplicates on retry."""

    def __init__(
        self,
        log: KafkaLog,
        linger_ms: float,
        batch_size: int,
        extra_config: Mapping[str, Any] = _NO_EXTRAS,
    ) -> None:
        self._log = log
        self._producer = confluent_kafka.Producer(
            {
                **log.client_config,
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": linger_ms,
                "batch.size": batch_size,
                "batch.num.messages": 100_000,
                "queue.buffering.max.messages": QUEUE_MAX_MESSAGES,
                "message.max.bytes": CLIENT_MAX_MESSAGE_BYTES,
                "compression.type": "none",
                # Keyed records without an explicit partition are placed by librdkafka's murmur2,
                # the partitioner the SQLite backend computes in Python (the tests cross-check
                # the two); keyless ones get a partition from riverbed's StickyPartitioner.
                "partitioner": "murmur2_random",
                # A record may wait linger.ms before it is even sent; then a minute to be written.
                "delivery.timeout.ms": int(linger_ms) + 60_000,
                # Records sent without a future (send_many) report here; only failures matter.
                "on_delivery": self._on_bulk_delivery,
                **extra_config,
            }
        )
        self._batch_size = batch_size
        self._topics: dict[str, TopicInfo] = {}
        self._unbatched_topics: set[str] = set()
        self._sticky = StickyPartitioner(batch_size)
        self._errors = DeliveryErrors()
        self.delivery_lock = threading.Lock()
        self._closed = False
        # Delivery reports run Python callbacks, which need the GIL. A thread serving them while
        # the caller is busy sending makes the two trade the GIL for every report (it measured at
        # a quarter of the throughput), so the sending thread serves them itself (every send, and
        # every SERVE_EVERY records of send_many), and the background thread only once the caller
        # has sent nothing for IDLE_SERVE_S: futures still complete without the caller polling,
        # as with the Java producer's sender thread.
        self._sent = 0
        self._stop = threading.Event()
        self._poller = threading.Thread(
            target=self._serve_when_idle, name="riverbed-kafka-producer", daemon=True
        )
        self._poller.start()

    def _serve_when_idle(self) -> None:
        seen = -1
        while not self._stop.is_set():
            if self._sent != seen:
                seen = self._sent
                self._stop.wait(IDLE_SERVE_S)
            else:
                try:
                    self._producer.poll(IDLE_SERVE_S)
                except KafkaException as error:
                    # A fatal error, which every poll raises from now on; the caller's next
                    # call reports it.
                    logger.error("the Kafka producer stopped: %s", _kafka_error(error))
                    return

    def _topic(self, topic: str) -> TopicInfo:
        info = self._topics.get(topic)
        if info is None:
            info = self._topics[topic] = self._log.topic(topic)
            if self._unbatched(info):
                self._unbatched_topics.add(topic)
        return info

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the producer is closed; create a new one with log.producer()")

    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Mapping[str, bytes] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> SendFuture:
        if self._closed:
            self._check_open()
        info = self._topics.get(topic) or self._topic(topic)
        if (key.__class__ is not bytes and key is not None) or (
            value.__class__ is not bytes and value is not None
        ):
            check_types(key, value)
        size = (0 if key is None else len(key)) + (0 if value is None else len(value))
        if headers or size > info.max_record_bytes or (key is None and info.compact):
            check_record(info, key, value, headers)
        if partition is not None:
            check_partition(info, partition)
        elif key is None:
            partition = self._sticky.next(size + RECORD_OVERHEAD, info.partitions)
        else:
            partition = UNASSIGNED_PARTITION
        if topic in self._unbatched_topics:
            self._one_at_a_time()
        future = self._future()
        extra = _NO_EXTRAS  # without a timestamp, librdkafka stamps the record with the time now
        if timestamp_ms is not None:
            check_timestamp(timestamp_ms)
        if timestamp_ms is not None or headers:
            extra = {"timestamp": timestamp_ms or 0, "headers": dict(headers) if headers else None}
        try:
            self._produce(topic, value, key, partition, on_delivery=future, **extra)
        except BufferError:
            self._when_room(self._produce, topic, value, key, partition, on_delivery=future,
                            **extra)  # fmt: skip
        self._sent += 1
        self._producer.poll(0)
        return future

    def _produce(self, topic: str, *args: Any, **kwargs: Any) -> None:
        """librdkafka's produce, its refusals as riverbed's errors: a topic deleted since it was
        looked up is unknown."""
        try:
            self._producer.produce(topic, *args, **kwargs)
        except KafkaException as error:
            raise self.delivery_error(topic, _kafka_error(error)) from None

    def _future(self) -> _DeliveryFuture:
        return _DeliveryFuture(self)

    def send_many(
        self,
        topic: str,
        items: Iterable[tuple[bytes | None, bytes | None]],
        partition: int | None = None,
        headers: Mapping[str, bytes] | None = None,
        timestamps: Sequence[int] | None = None,
    ) -> int:
        self._check_open()
        info = self._topic(topic)
        if partition is not None:
            check_partition(info, partition)
        limit = info.max_record_bytes - record_size(None, None, headers)  # checks them
        if timestamps is not None:
            items = timed_items(items, timestamps)
            stamp = iter(timestamps)
        extra: Mapping[str, Any] = {"headers": dict(headers)} if headers else _NO_EXTRAS
        partitions = info.partitions
        compact = info.compact
        produce = self._producer.produce
        unbatched = topic in self._unbatched_topics
        # StickyPartitioner.next, inlined; its state is written back at the end.
        sticky, filled = self._sticky.partition, self._sticky.filled
        share = self._batch_size // partitions
        count = 0
        # The hot loop: check_record's size and key rules inlined (check_record raises the error).
        for key, value in items:
            if (key.__class__ is not bytes and key is not None) or (
                value.__class__ is not bytes and value is not None
            ):
                check_types(key, value)
            size = (0 if key is None else len(key)) + (0 if value is None else len(value))
            if size > limit or (compact and key is None):
                check_record(info, key, value, headers)
            if partition is not None:
                target = partition
            elif key is None:
                filled += size + RECORD_OVERHEAD
                if filled >= share:
                    filled = 0
                    sticky += 1
                target = sticky % partitions
            else:
                target = UNASSIGNED_PARTITION
            if unbatched:
                self._one_at_a_time()
            if timestamps is not None:
                extra = {**extra, "timestamp": next(stamp)}
            try:
                produce(topic, value, key, target, **extra)
            except BufferError:
                self._when_room(self._produce, topic, value, key, target, **extra)
            except KafkaException as error:
                raise self.delivery_error(topic, _kafka_error(error)) from None
            count += 1
            if count % SERVE_EVERY == 0:
                self._sent += SERVE_EVERY
                self._producer.poll(0)
        self._sent += count % SERVE_EVERY
        self._sticky.partition, self._sticky.filled = sticky, filled
        return count

    def send_batch(self, topic: str, records: Iterable[KeyValueHeaders]) -> list[SendFuture]:
        self._check_open()
        records, _ = check_batch(self._topic(topic), records)
        # librdkafka takes one record per call: this is send's loop, after the batch's check.
        return [self.send(topic, value, key, headers) for key, value, headers in records]

    def _when_room(self, produce: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        """``produce`` once the local queue, full of records or of bytes (a backlog of large
        ones), has room: deliveries free it."""
        while True:
            self._producer.poll(ROOM_WAIT_S)
            try:
                produce(*args, **kwargs)
                return
            except BufferError:
                continue

    def _one_at_a_time(self) -> None:
        """Before a record to a topic sent one at a time (``_unbatched``) is queued: wait until
        those queued before are delivered, for ``UNBATCHED_FLUSH_S``; a log that takes longer is
        not taking records now, and ``TimeoutError`` says so with this record not sent (the
        earlier ones' futures tell their own outcome)."""
        remaining = self._producer.flush(UNBATCHED_FLUSH_S)
        if remaining:
            raise TimeoutError(
                f"{remaining} earlier record(s) not acknowledged within {UNBATCHED_FLUSH_S:g} s: "
                "this one was not sent"
            )

    def _unbatched(self, info: TopicInfo) -> bool:
        # librdkafka batches up to batch.size bytes per partition, but the broker rejects a batch
        # larger than the topic's max.message.bytes, and librdkafka does not split it. Records for
        # topics with a smaller limit are therefore sent one at a time.
        return info.max_record_bytes + RECORD_BATCH_OVERHEAD < self._batch_size

    def _on_bulk_delivery(self, error: Any, message: Any) -> None:
        if error is not None:
            self._errors.add(str(self.delivery_error(message.topic(), error)))

    def delivery_error(self, topic: str, error: Any) -> RiverbedError:
        if error.code() in _MISSING_TOPIC:
            self._topics.pop(topic, None)  # deleted since we cached it: look it up again
            return UnknownTopicError(topic)
        if error.code() in _REFUSED:
            self._topics.pop(topic, None)  # its settings may have changed: look them up again
            return InvalidRecordError(
                f"Kafka refuses the record for '{topic}' ({error.str()}); sending it again "
                "would not help"
            )
        return DeliveryError(f"Kafka did not write a record to '{topic}': {error.str()}")

    def flush_for_future(self, timeout: float | None) -> None:
        """Deliver queued records for ``SendFuture.result``; ``send_many``'s errors stay for
        ``flush``."""
        self._producer.flush(-1 if timeout is None else timeout)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued record is acknowledged; raise errors of ``send_many`` records."""
        remaining = self._producer.flush(-1 if timeout is None else timeout)
        self._errors.raise_if_any()
        if remaining:
            raise TimeoutError(f"{remaining} record(s) not acknowledged within {timeout} s")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
            self._stop.set()
            self._poller.join()


class _Transaction:
    """One transaction's outcome, shared by its records' futures and settled once for all when it
    commits or aborts (a transaction's records are visible all together or not at all)."""

    __slots__ = ("error", "lock", "open", "waiting")

    def __init__(self) -> None:
        self.open = True
        self.error: BaseException | None = None
        # Guards ``waiting`` between a caller adding a callback and the transaction ending.
        self.lock = threading.Lock()
        self.waiting: list[SendFuture] = []

    def end(self, error: BaseException | None) -> None:
        with self.lock:
            self.open = False
            self.error = error
            waiting, self.waiting = self.waiting, []
        for future in waiting:
            future.run_callbacks()


class _TransactionFuture(_DeliveryFuture):
    """A transactional record's future: done when its transaction ends, with the record's metadata
    once committed or ``TransactionAbortedError`` once aborted. The delivery report comes earlier
    (the broker holds the record invisible) and is only kept for the metadata."""

    __slots__ = ("_transaction",)

    def __init__(self, producer: KafkaProducer, transaction: _Transaction) -> None:
        super().__init__(producer)
        self._transaction = transaction

    def _outcome(self) -> RecordMetadata | BaseException | None:
        transaction = self._transaction
        if transaction.open:
            return None
        return transaction.error or super()._outcome()

    def _force(self, timeout: float | None) -> None:
        if self._transaction.open:
            raise TransactionStateError(
                "the record's transaction is still open; its outcome is known once "
                "commit_transaction() or abort_transaction() returns"
            )
        super()._force(timeout)

    def __call__(self, error: Any, message: Any) -> None:
        if error is not None:
            self._error = self._producer.delivery_error(message.topic(), error)
        self._message = message

    def add_done_callback(self, callback: Callable[[SendFuture], None]) -> None:
        transaction = self._transaction
        with transaction.lock:
            if transaction.open:
                if self._callbacks is None:
                    self._callbacks = []
                    transaction.waiting.append(self)
                self._callbacks.append(callback)
                return
        callback(self)


class KafkaTransactionalProducer(KafkaProducer):
    """librdkafka's transactional producer, bound to a group consumer (exactly-once v2, KIP-447).

    ``commit_transaction`` sends the consumer's offsets with its group metadata, so the broker
    fences a member whose generation is stale; that, not the transactional.id, keeps zombies out,
    hence an id per instance. Errors: a fenced member or producer aborts the transaction and raises
    ``CommitFailedError``; any other abortable error aborts it and raises
    ``TransactionAbortedError``; a fatal error leaves the producer unusable.
    """

    def __init__(
        self, log: KafkaLog, consumer: KafkaConsumer, linger_ms: float, batch_size: int
    ) -> None:
        if consumer.group is None:
            raise RiverbedError(
                "a transactional producer commits its consumer's group offsets, and this "
                "consumer has no group; create it with log.consumer(group='name', ...)"
            )
        timeout_ms = int(log.client_config.get("transaction.timeout.ms", TRANSACTION_TIMEOUT_MS))
        super().__init__(
            log,
            linger_ms,
            batch_size,
            {
                "transactional.id": f"riverbed-{consumer.group}-{uuid.uuid4().hex}",
                "transaction.timeout.ms": timeout_ms,
                # librdkafka refuses a delivery timeout longer than the transaction's.
                "delivery.timeout.ms": min(int(linger_ms) + 60_000, timeout_ms),
                # A transaction begun right after a commit finds the broker still writing the
                # last one's markers (CONCURRENT_TRANSACTIONS); librdkafka retries after
                # retry.backoff.ms, 100 ms by default, which capped back-to-back transactions
                # near 10/s. Java's client retries that case after 20 ms (KAFKA-5477).
                "retry.backoff.ms": TRANSACTION_RETRY_BACKOFF_MS,
            },
        )
        self._consumer = consumer
        self._group = consumer.group
        self._timeout_s = timeout_ms / 1000
        self._transaction: _Transaction | None = None
        self._broken: str | None = None  # why a fatal error made the producer unusable
        try:
            # init_transactions finding no broker connection up retries after 500 ms (the
            # PID timer): that was half of a worker's start. A metadata request needs one up:
            # the first is answered by the bootstrap connection, which librdkafka then drops
            # for the brokers it names; the second waits for one of those (0.5 s -> 0.07 s).
            topic = consumer.topics[0] if consumer.topics else None
            for _ in range(2):
                self._producer.list_topics(topic, timeout=self._timeout_s)
            self._retrying(self._producer.init_transactions, self._timeout_s)
        except KafkaException as error:
            self._broken = "it never started"
            self.close()
            raise BrokerUnavailableError(
                f"Kafka did not start a transactional producer ({_kafka_error(error)}); check "
                "that the brokers run and that transaction.state.log.replication.factor is at "
                "most the number of brokers"
            ) from None

    def _retrying(self, call: Callable[..., object], *args: Any) -> None:
        """Run a transactional call again while it fails with a retriable error (librdkafka's
        advice, e.g. a coordinator moving), until the transaction timeout."""
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                call(*args)
                return
            except KafkaException as exception:
                error = _kafka_error(exception)
                if (
                    not isinstance(error, KafkaError)
                    or not error.retriable()
                    or error.txn_requires_abort()
                    or time.monotonic() > deadline
                ):
                    raise
                time.sleep(0.05)

    def _check_usable(self) -> None:
        self._check_open()
        if self._broken is not None:
            raise ClosedError(
                f"the transactional producer failed ({self._broken}) and cannot be used any "
                "more; close it and create a new one with log.transactional_producer(consumer)"
            )

    def _current(self, action: str) -> _Transaction:
        self._check_usable()
        if self._transaction is None:
            raise TransactionStateError(
                f"cannot {action} outside a transaction; call begin_transaction() first"
            )
        return self._transaction

    def begin_transaction(self) -> None:
        self._check_usable()
        if self._transaction is not None:
            raise TransactionStateError(
                "a transaction is already open; commit_transaction() or abort_transaction() it"
            )
        self._producer.begin_transaction()  # local: it fails only in a state ruled out above
        self._transaction = _Transaction()

    def send(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Mapping[str, bytes] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> SendFuture:
        self._current("send")
        return super().send(topic, value, key, headers, partition, timestamp_ms)

    def _future(self) -> _DeliveryFuture:
        transaction = self._transaction
        assert transaction is not None  # send checked it
        return _TransactionFuture(self, transaction)

    def send_many(
        self,
        topic: str,
        items: Iterable[tuple[bytes | None, bytes | None]],
        partition: int | None = None,
        headers: Mapping[str, bytes] | None = None,
        timestamps: Sequence[int] | None = None,
    ) -> int:
        self._current("send")
        return super().send_many(topic, items, partition, headers, timestamps)

    def send_batch(self, topic: str, records: Iterable[KeyValueHeaders]) -> list[SendFuture]:
        self._current("send")
        return super().send_batch(topic, records)

    def _on_bulk_delivery(self, error: Any, message: Any) -> None:
        # Records purged by an abort are no delivery error: abort_transaction reported it.
        if error is None or error.code() not in _PURGED:
            super()._on_bulk_delivery(error, message)

    def commit_transaction(self, offsets: Mapping[TopicPartition, int]) -> None:
        transaction = self._current("commit")
        try:
            if offsets:
                metadata = self._consumer.transaction_metadata(offsets)
                positions = [KafkaTopicPartition(t, p, o) for (t, p), o in offsets.items()]
                self._retrying(
                    self._producer.send_offsets_to_transaction,
                    positions,
                    metadata,
                    self._timeout_s,
                )
            # Flushes the transaction's records first; one failed record fails the commit.
            self._retrying(self._producer.commit_transaction, self._timeout_s)
        except CommitFailedError as fenced:  # found before asking the broker
            self._abort(transaction, str(fenced))
            raise
        except KafkaException as exception:
            raise self._failed(transaction, _kafka_error(exception)) from None
        except BaseException as interrupted:  # KeyboardInterrupt mid-commit: nothing half-done
            self._abort(transaction, repr(interrupted))
            raise
        self._transaction = None
        self._producer.poll(0)  # serve delivery reports the commit's flush left queued
        transaction.end(None)

    def _failed(self, transaction: _Transaction, error: Any) -> RiverbedError:
        """Abort the transaction after a failed commit; the error to raise."""
        if not isinstance(error, KafkaError):
            self._abort(transaction, str(error))
            return RiverbedError(f"the transaction was aborted: {error}")
        reason = error.str()
        if error.fatal():
            # librdkafka cannot abort any more; the broker aborts the transaction on its timeout.
            self._broken = reason
            self._transaction = None
            transaction.end(TransactionAbortedError(f"the transaction was aborted: {reason}"))
        else:  # txn_requires_abort(), or retriable errors past the transaction timeout
            self._abort(transaction, reason)
        if error.code() in _FENCED:
            return CommitFailedError(
                f"commit rejected: this member of group '{self._group}' was fenced by a "
                f"rebalance ({reason}); its transaction was aborted, so none of its records or "
                "offsets are visible, and the records polled since the last commit go to the "
                "partitions' new owner; poll again to rejoin"
            )
        if error.code() in _PRODUCER_FENCED:
            return CommitFailedError(
                f"commit rejected: the transactional producer was fenced ({reason}), most "
                f"likely because its transaction stayed open longer than "
                f"transaction.timeout.ms ({self._timeout_s * 1000:.0f} ms) and the broker "
                "aborted it; none of its records or offsets are visible; close this producer "
                "and create a new one with log.transactional_producer(consumer)"
            )
        if self._broken is not None:
            return RiverbedError(
                f"the transaction failed ({reason}) and was aborted; the transactional producer "
                "cannot be used any more: close it and create a new one with "
                "log.transactional_producer(consumer)"
            )
        return TransactionAbortedError(f"the transaction was aborted: {reason}")

    def abort_transaction(self) -> None:
        self._abort(self._current("abort"), "abort_transaction() was called")

    def _abort(self, transaction: _Transaction, reason: str) -> None:
        self._transaction = None
        try:
            # An abort racing the transaction's first produce request can fail fatally with
            # INVALID_TXN_STATE (librdkafka#4849): deliver what is in flight first. Those
            # records are written, then aborted, so they stay invisible all the same.
            self._producer.flush(self._timeout_s)
            self._retrying(self._producer.abort_transaction, self._timeout_s)
            self._producer.poll(0)  # the purged records' delivery reports
        except KafkaException as exception:
            self._broken = str(_kafka_error(exception))
            raise RiverbedError(
                f"could not abort the transaction ({self._broken}); the broker aborts it after "
                "transaction.timeout.ms; close this producer and create a new one"
            ) from None
        finally:
            self._errors = DeliveryErrors()  # send_many failures of the aborted records
            transaction.end(TransactionAbortedError(f"the transaction was aborted: {reason}"))

    def flush(self, timeout: float | None = None) -> None:
        # After a fatal error librdkafka has failed every record, and raises the error from
        # every flush; the next send or commit reports it.
        if self._broken is None:
            super().flush(timeout)

    def close(self) -> None:
        if self._closed:
            return
        if self._transaction is not None and self._broken is None:
            try:
                self._abort(self._transaction, "the producer was closed")
            except RiverbedError as error:
                logger.warning("%s", error)
        super().close()


class KafkaConsumer(Closing):
    """librdkafka's consumer: in a group (cooperative rebalancing) or assigned every partition.

    Rebalances use the cooperative-sticky assignor, so ``on_revoke`` gets only the partitions that
    move away and ``on_assign`` only the new ones, as on SQLite. librdkafka heartbeats in the
    background; a member that does not poll for ``MAX_POLL_INTERVAL_MS`` leaves the group, as on
    SQLite.
    """

    def __init__(
        self,
        log: KafkaLog,
        group: str | None,
        topics: list[str],
        from_beginning: bool,
        session_timeout_ms: int,
        on_assign: RebalanceCallback | None,
        on_revoke: RebalanceCallback | None,
    ) -> None:
        self._log = log
        self._group = group
        self._topics = consumer_topics(group, topics)
        counts = {topic: log.partition_count(topic) for topic in self._topics}
        self._from_beginning = from_beginning
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._assignment: set[TopicPartition] = set()
        # Next offset to read per partition, as far as this consumer knows it (polled or sought).
        self._positions: dict[TopicPartition, int] = {}
        # Seeks on partitions whose assignment has not arrived yet; applied when it does.
        self._pending_seeks: dict[TopicPartition, int] = {}
        self._deferred_error: RiverbedError | None = None
        self._closed = False
        self._consumer = confluent_kafka.Consumer(
            {
                **log.client_config,
                # librdkafka needs a group id even for manual assignment; that one never joins.
                "group.id": group or f"riverbed-unjoined-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": False,
                "auto.offset.reset": "earliest" if from_beginning else "latest",
                "partition.assignment.strategy": "cooperative-sticky",
                "session.timeout.ms": session_timeout_ms,
                # Members learn of a rebalance at their next heartbeat: beat often so that
                # rebalances take a fraction of the session timeout, not a third of it.
                "heartbeat.interval.ms": max(session_timeout_ms // 10, 100),
                "max.poll.interval.ms": max(MAX_POLL_INTERVAL_MS, session_timeout_ms),
                # Answer a fetch as soon as a record arrives (latency), but keep up to
                # queued.max.messages.kbytes prefetched per partition (throughput).
                "fetch.wait.max.ms": 10,
                "fetch.min.bytes": 1,
                "max.partition.fetch.bytes": 10 * 1024 * 1024,
                # A deep prefetch queue triples throughput (0.4 -> 1.2 M records/s read raw here);
                # queued.max.messages.kbytes (64 MiB) still bounds its memory.
                "queued.min.messages": 1_000_000,
                # Records of open and aborted transactions are never handed out (librdkafka's
                # default, stated here because exactly-once depends on it).
                "isolation.level": "read_committed",
            }
        )
        if group is None:
            partitions = [KafkaTopicPartition(t, p) for t, n in counts.items() for p in range(n)]
            self._start_at_positions(partitions)
            self._consumer.assign(partitions)
            self._assignment = {(t, p) for t, n in counts.items() for p in range(n)}
            if on_assign is not None:
                on_assign(set(self._assignment))
        else:
            self._consumer.subscribe(
                self._topics,
                on_assign=self._assigned,
                on_revoke=self._revoked,
                on_lost=self._lost,
            )

    @property
    def group(self) -> str | None:
        return self._group

    @property
    def topics(self) -> list[str]:
        """The topics this consumer reads."""
        return list(self._topics)

    # Rebalance callbacks, run by librdkafka inside consume()

    def _start_at_positions(self, partitions: list[Any]) -> None:
        """Set each new partition's start offset: a pending seek, the committed offset, or the
        reset point, resolved now rather than at the first fetch, so that ``position`` answers
        right away and a latest consumer gets every record sent after it was assigned."""
        unresolved = []
        for tp in partitions:
            seek = self._pending_seeks.get((tp.topic, tp.partition))
            if seek is None:
                unresolved.append(tp)
            else:
                tp.offset = seek
        self._pending_seeks.clear()
        if unresolved and self._group is not None:
            committed = self._consumer.committed(unresolved, timeout=REQUEST_TIMEOUT_S)
            for tp, done in zip(unresolved, committed, strict=True):
                tp.offset = done.offset
        for tp in partitions:
            if tp.offset < 0:
                low, high = self._offsets_of(tp)
                tp.offset = low if self._from_beginning else high
            self._positions[tp.topic, tp.partition] = tp.offset

    def _assigned(self, consumer: Any, partitions: list[Any]) -> None:
        if self._closed:
            # An assignment still pending when close() leaves the group: librdkafka wants it
            # acknowledged, but a closing consumer cannot fetch committed offsets any more (the
            # call would time out), and it reads nothing.
            consumer.incremental_assign(partitions)
            return
        added = {(tp.topic, tp.partition) for tp in partitions}
        self._start_at_positions(partitions)
        consumer.incremental_assign(partitions)
        self._assignment |= added
        if added and self._on_assign is not None:
            self._on_assign(added)

    def _revoked(self, consumer: Any, partitions: list[Any]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        # The user's callback runs while this member still owns the partitions, so it can commit.
        if revoked and self._on_revoke is not None:
            self._on_revoke(revoked)
        self._forget(revoked)
        consumer.incremental_unassign(partitions)

    def _lost(self, consumer: Any, partitions: list[Any]) -> None:
        # Fenced: the partitions already belong to someone else, so commits must fail from now.
        lost = {(tp.topic, tp.partition) for tp in partitions}
        self._forget(lost)
        consumer.incremental_unassign(partitions)
        if lost and self._on_revoke is not None:
            self._on_revoke(lost)

    def _forget(self, partitions: set[TopicPartition]) -> None:
        self._assignment -= partitions
        for tp in partitions:
            self._positions.pop(tp, None)

    # Reading

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the consumer is closed; create a new one with log.consumer()")

    def poll(self, max_records: int = 1000, timeout: float = 1.0) -> list[Record]:
        self._check_open()
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        if self._deferred_error is not None:
            failure, self._deferred_error = self._deferred_error, None
            raise failure
        # consume(n, timeout) waits until it has n messages or the timeout passed. Take what is
        # there; if nothing is, wait for the first record only, then take what came with it.
        messages: list[Any] = self._consumer.consume(max_records, 0)
        if not messages and timeout > 0:
            messages = self._consumer.consume(1, timeout)
            if messages and max_records > 1:
                messages += self._consumer.consume(max_records - 1, 0)
        # One comprehension per batch (the per-record hot path); error events are rare and are
        # looked at only when some message was left out.
        records = [
            Record(
                m.topic(),
                m.partition(),
                m.offset(),
                m.timestamp()[1],
                m.key(),
                m.value(),
                dict(headers) if (headers := m.headers()) else {},
            )
            for m in messages
            if m.error() is None
        ]
        # Offsets rise within a partition, so the last record of each gives its position.
        self._positions.update({(r.topic, r.partition): r.offset + 1 for r in records})
        if len(records) != len(messages):
            for message in messages:
                error = message.error()
                if error is None:
                    continue
                try:
                    self._raise_unless_transient(error, message.topic())
                except RiverbedError as failure:
                    if not records:
                        raise
                    # Hand out what was read first: librdkafka's position is already past it.
                    self._deferred_error = failure
                    break
        return records

    def _raise_unless_transient(self, error: Any, topic: str | None) -> None:
        code = error.code()
        if code in _TRANSIENT or (error.retriable() and not error.fatal()):
            logger.debug("transient consumer error: %s", error)
            return
        if code in _MISSING_TOPIC and topic:
            raise UnknownTopicError(topic)
        raise RiverbedError(f"Kafka consumer error: {error.str()}")

    # Offsets

    def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        self._check_open()
        if self._group is None:
            raise RiverbedError(
                "this consumer has no group, so it has no offsets to commit; "
                "create it with log.consumer(group='name', ...)"
            )
        to_commit = dict(offsets) if offsets is not None else dict(self._positions)
        for offset in to_commit.values():
            check_offset(offset)
        if not to_commit:
            return
        self._check_owned(to_commit)
        try:
            answer = self._consumer.commit(
                offsets=[KafkaTopicPartition(t, p, o) for (t, p), o in to_commit.items()],
                asynchronous=False,
            )
        except KafkaException as error:
            self._raise_commit_failed(_kafka_error(error))
            if _code(error) in _TRANSIENT:  # timed out: the broker, or a rebalance, held it up
                raise BrokerUnavailableError(
                    f"group '{self._group}' could not commit: {_kafka_error(error)}; the offsets "
                    "may not be stored, so commit again (or poll: a rebalance may be under way)"
                ) from None
            raise RiverbedError(
                f"group '{self._group}' could not commit: {_kafka_error(error)}"
            ) from None
        for tp in answer or []:
            if tp.error is not None:
                self._raise_commit_failed(tp.error)
                raise RiverbedError(f"commit of {tp.topic}[{tp.partition}] failed: {tp.error}")

    def _check_owned(self, offsets: Iterable[TopicPartition]) -> None:
        moved = sorted(set(offsets) - self._assignment)
        if moved:
            topic, partition = moved[0]
            raise CommitFailedError(
                f"commit rejected: partition {topic}[{partition}] of group '{self._group}' is not "
                "assigned to this consumer (a rebalance moved it); its records since the last "
                "commit go to the new owner, poll again to get the new assignment"
            )

    def transaction_metadata(self, offsets: Iterable[TopicPartition]) -> Any:
        """The group metadata a transaction commits ``offsets`` with: the broker rejects them if
        this member is unknown or its generation stale (KIP-447). A partition that a poll already
        saw move fails here first."""
        self._check_open()
        self._check_owned(offsets)
        return self._consumer.consumer_group_metadata()

    def _raise_commit_failed(self, error: Any) -> None:
        if isinstance(error, KafkaError) and error.code() in _FENCED:
            raise CommitFailedError(
                f"commit rejected: this member of group '{self._group}' was fenced by a "
                f"rebalance ({error.str()}); the records polled since the last commit go to the "
                "partitions' new owner, poll again to rejoin"
            )

    def committed(self) -> dict[TopicPartition, int | None]:
        self._check_open()
        assigned = sorted(self._assignment)
        if self._group is None or not assigned:
            return dict.fromkeys(assigned)
        answer = self._consumer.committed(
            [KafkaTopicPartition(t, p) for t, p in assigned], timeout=REQUEST_TIMEOUT_S
        )
        return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None) for tp in answer}

    def position(self, topic: str, partition: int) -> int:
        self._check_open()
        tp = (topic, partition)
        if tp in self._pending_seeks:
            return self._pending_seeks[tp]
        self._assigned_or_raise(tp)
        # librdkafka's position steps over transaction markers after the last record returned;
        # committing it (not last offset + 1) lets a group reading transactional topics reach
        # lag 0.
        (stepped,) = self._consumer.position([KafkaTopicPartition(topic, partition)])
        return max(self._positions[tp], stepped.offset)

    def _assigned_or_raise(self, tp: TopicPartition) -> None:
        if tp not in self._assignment:
            raise RiverbedError(
                f"partition {tp[0]}[{tp[1]}] is not assigned to this consumer; "
                f"its assignment is {sorted(self._assignment)}"
            )

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self._check_open()
        check_offset(offset)
        tp = (topic, partition)
        if tp not in self._assignment:
            if self._group is None or topic not in self._topics:
                self._assigned_or_raise(tp)
            # The group's assignment has not arrived yet: apply the seek when it does.
            self._pending_seeks[tp] = offset
            return
        self._consumer.seek(KafkaTopicPartition(topic, partition, offset))
        self._positions[tp] = offset

    def _watermarks(
        self, partitions: Iterable[TopicPartition] | None
    ) -> list[tuple[str, int, int, int]]:
        chosen = sorted(self._assignment if partitions is None else set(partitions))
        marks = []
        for topic, partition in chosen:
            low, high = self._offsets_of(KafkaTopicPartition(topic, partition))
            marks.append((topic, partition, low, high))
        return marks

    def _offsets_of(self, tp: Any) -> tuple[int, int]:
        """A partition's first and next offsets. A partition whose leader is still being
        elected (of a topic made a moment ago) is waited for, up to the request timeout."""
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while True:
            try:
                low, high = self._consumer.get_watermark_offsets(
                    tp, timeout=REQUEST_TIMEOUT_S, cached=False
                )
                return int(low), int(high)
            except KafkaException as error:
                code = _code(error)
                if code in _LEADER_MOVING and time.monotonic() < deadline:
                    time.sleep(LEADER_WAIT_S)
                    continue
                if code in _MISSING_TOPIC:
                    raise UnknownTopicError(tp.topic) from None
                raise BrokerUnavailableError(
                    f"Kafka did not tell the offsets of {tp.topic}[{tp.partition}]: "
                    f"{_kafka_error(error)}"
                ) from None

    def seek_to_beginning(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        for topic, partition, low, _ in self._watermarks(partitions):
            self.seek(topic, partition, low)

    def seek_to_end(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        for topic, partition, _, high in self._watermarks(partitions):
            self.seek(topic, partition, high)

    def assignment(self) -> set[TopicPartition]:
        return set(self._assignment)

    # Lifecycle

    def close(self) -> None:
        """Leave the group (without calling ``on_revoke``, as on SQLite) and stop fetching."""
        if self._closed:
            return
        self._closed = True
        self._on_revoke = None
        self._consumer.close()
