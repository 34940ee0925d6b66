"""What only the Kafka backend has: its URL options, its connect errors, and agreement with
librdkafka's own partitioner, so that riverbed and non-riverbed producers put a key in the same
partition."""

from __future__ import annotations

import random
import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

import riverbed
from riverbed.errors import InvalidUrlError
from riverbed.log.errors import BrokerUnavailableError, InvalidRecordError, RecordTooLargeError
from riverbed.log.kafka import KafkaLog, describe_log_dirs
from riverbed.log.partitioner import partition_for_key
from tests.services import free_port
from tests.services.kafka import KafkaServer
from tests.support import consume, wait_until

pytestmark = pytest.mark.kafka


def test_keys_land_where_librdkafka_puts_them(kafka_log: KafkaLog, kafka_url: str) -> None:
    name = f"partitioner-{time.time_ns()}"
    partitions = 7
    kafka_log.create_topic(name, partitions=partitions)
    rng = random.Random(2024)
    keys = {rng.randbytes(rng.randrange(0, 40)) for _ in range(400)}
    bootstrap = kafka_url.removeprefix("kafka://")
    raw = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
    for key in keys:
        raw.produce(name, b"", key)  # no partition: librdkafka chooses
    assert raw.flush(30) == 0
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": name})
    consumer.assign([TopicPartition(name, p, 0) for p in range(partitions)])
    landed: dict[bytes, int] = {}
    deadline = time.monotonic() + 30
    while len(landed) < len(keys) and time.monotonic() < deadline:
        for message in consumer.consume(1000, 0.5):
            partition = message.partition()
            assert message.error() is None and partition is not None
            landed[message.key() or b""] = partition
    consumer.close()
    assert landed == {key: partition_for_key(key, partitions) for key in keys}


def test_unreachable_broker_fails_within_the_connect_timeout() -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match=address) as raised:
        riverbed.connect(f"kafka://{address}?connect_timeout=1")
    assert time.monotonic() - started < 5
    assert "connect_timeout" in str(raised.value)


@pytest.mark.parametrize(
    "query",
    ["colour=blue", "connect_timeout=soon", "connect_timeout=0", "replication_factor=0"],
)
def test_bad_url_options_are_rejected(query: str) -> None:
    with pytest.raises(InvalidUrlError):
        riverbed.connect(f"kafka://127.0.0.1:1?{query}")


def test_librdkafka_options_pass_through(kafka_url: str) -> None:
    with riverbed.connect(f"{kafka_url}?client.id=riverbed-test&connect_timeout=5") as log:
        assert isinstance(log, KafkaLog)
        assert log.client_config["client.id"] == "riverbed-test"


def test_topic_settings_map_to_kafka_configs(kafka_log: KafkaLog) -> None:
    name = f"settings-{time.time_ns()}"
    created = kafka_log.create_topic(
        name,
        partitions=2,
        compact=True,
        retention_ms=3_600_000,
        retention_bytes=10_000_000,
        max_record_bytes=2048,
        delete_retention_ms=1000,
    )
    assert kafka_log.topic(name) == created


def test_small_record_limit_holds_for_many_records(kafka_log: KafkaLog) -> None:
    # The topic's limit is below the producer's batch size, so records must not be batched
    # together into a batch the broker would refuse.
    name = f"small-{time.time_ns()}"
    kafka_log.create_topic(name, max_record_bytes=100)
    with kafka_log.producer() as producer:
        assert producer.send_many(name, [(None, b"x" * 100)] * 50) == 50
        with pytest.raises(RecordTooLargeError):
            producer.send(name, b"x" * 101)
    assert kafka_log.end_offsets(name) == {0: 50}


def test_a_backlog_larger_than_the_producers_queue_waits_for_room(kafka_url: str) -> None:
    name = f"backlog-{time.time_ns()}"
    with riverbed.connect(f"{kafka_url}?queue.buffering.max.kbytes=1024") as log:
        log.create_topic(name, partitions=1)
        with log.producer() as producer:  # 20 records of 200 kB: the 1 MiB queue fills
            sent = [producer.send(name, bytes(200_000)) for _ in range(10)]
            assert producer.send_many(name, [(None, bytes(200_000))] * 10) == 10
            producer.flush(30)
        assert all(future.result(5) is not None for future in sent)
        assert log.end_offsets(name) == {0: 20}


def test_a_record_kafka_refuses_by_its_timestamp_is_refused_not_waited_out(
    kafka_log: KafkaLog,
) -> None:
    name = f"future-{time.time_ns()}"
    kafka_log.create_topic(name)
    two_hours_ahead = (time.time_ns() // 1_000_000) + 2 * 3600 * 1000
    with kafka_log.producer() as producer:
        future = producer.send(name, b"x", timestamp_ms=two_hours_ahead)
        with pytest.raises(InvalidRecordError, match="Invalid timestamp"):
            future.result(30)


def test_a_record_to_a_topic_sent_one_at_a_time_waits_a_bounded_time_for_a_hung_broker(
    kafka_log: KafkaLog, kafka_server: KafkaServer
) -> None:
    name = f"small-{time.time_ns()}"
    kafka_log.create_topic(name, max_record_bytes=100)  # below the batch size: one at a time
    with kafka_log.producer() as producer:
        producer.send(name, b"x").result(30)
        with kafka_server.frozen():
            sent = producer.send(name, b"y")  # queued: the one before it was delivered
            with pytest.raises(TimeoutError, match=r"not acknowledged within .* not sent"):
                producer.send(name, b"z")  # not queued: a retry of it sends it once
        sent.result(60)
    assert kafka_log.end_offsets(name) == {0: 2}  # "y" delivered once the broker went on


def test_partition_sizes_come_from_the_broker(kafka_log: KafkaLog, kafka_url: str) -> None:
    name = f"sizes-{time.time_ns()}"
    kafka_log.create_topic(name, partitions=2)
    with kafka_log.producer() as producer:
        producer.send_many(name, [(None, b"x" * 1000)] * 20, partition=1)
    host, port = kafka_url.removeprefix("kafka://").split(":")
    # A busy broker reports a partition's log once it has made it.
    wait_until(
        lambda: set(describe_log_dirs(host, int(port), name, [0, 1])) == {0, 1}, 30, "both logs"
    )
    sizes = describe_log_dirs(host, int(port), name, [0, 1])
    assert sizes[0] == 0
    assert sizes[1] > 20 * 1000
    described = kafka_log.describe_topic(name)
    assert [p.size_bytes for p in described.partitions] == [sizes[0], sizes[1]]


def test_group_members_show_their_assignment(kafka_log: KafkaLog) -> None:
    name = f"members-{time.time_ns()}"
    kafka_log.create_topic(name, partitions=2)
    with kafka_log.producer() as producer:
        producer.send_many(name, [(None, b"v")] * 4)
    with kafka_log.consumer(group=name, topics=[name], from_beginning=True) as consumer:
        consume(consumer, 4)
        consumer.commit()
        described = kafka_log.describe_group(name)
        assert described.state == "Stable"
        (member,) = described.members
        assert member.assignment == [(name, 0), (name, 1)]
    assert kafka_log.group_lag(name) == {(name, 0): 0, (name, 1): 0}


def test_a_consumer_of_a_topic_made_a_moment_ago_waits_for_its_leaders(
    kafka_log: KafkaLog,
) -> None:
    # Each partition's leader is elected after create_topic returns: the offsets wait for it.
    for attempt in range(5):
        topic = f"fresh-{uuid.uuid4().hex[:8]}-{attempt}"
        kafka_log.create_topic(topic, partitions=5)
        with kafka_log.consumer(topics=[topic]) as consumer:
            assert consumer.poll(timeout=0.1) == []
            assert len(consumer.assignment()) == 5


def test_a_commit_librdkafka_gives_up_on_is_a_riverbed_error(
    kafka_log: KafkaLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"commit-{time.time_ns()}"
    kafka_log.create_topic(name)
    with kafka_log.producer() as producer:
        producer.send(name, b"v").result(30)
    with kafka_log.consumer(group=f"g-{uuid.uuid4().hex}", topics=[name], from_beginning=True) as c:
        consume(c, 1)
        # What librdkafka raises after waiting out a hung broker or a rebalance that never ends.
        timed_out = KafkaException(KafkaError(KafkaError._TIMED_OUT, "Commit failed: Timed out"))

        class TimingOut:
            def __init__(self, inner: Consumer) -> None:
                self.inner = inner

            def commit(self, **_: object) -> None:
                raise timed_out

            def __getattr__(self, name: str) -> object:
                return getattr(self.inner, name)

        monkeypatch.setattr(c, "_consumer", TimingOut(c._consumer))  # type: ignore[attr-defined]
        with pytest.raises(BrokerUnavailableError, match=r"could not commit: .*commit again"):
            c.commit()
