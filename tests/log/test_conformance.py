"""The log contract, run against every backend (``sqlite`` and a real Kafka broker).

A behaviour tested here holds on both; anything backend-specific lives in its own test module.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import pytest

import riverbed
from riverbed.errors import RiverbedError
from riverbed.log.errors import InvalidRecordError
from riverbed.log.partitioner import partition_for_key
from tests.support import consume, wait_until

TopicName = Callable[[str], str]


# Topics


T0 = 1_700_000_000_000  # epoch milliseconds of November 2023


def test_create_list_describe_delete(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name("orders")
    info = log.create_topic(name, partitions=3, retention_ms=3_600_000)
    assert info.name == name
    assert info.partitions == 3
    assert info.retention_ms == 3_600_000
    assert not info.compact
    assert name in [t.name for t in log.list_topics()]
    assert log.topic(name) == info
    description = log.describe_topic(name)
    assert [p.partition for p in description.partitions] == [0, 1, 2]
    assert all(p.beginning_offset == p.end_offset == 0 for p in description.partitions)
    log.delete_topic(name)
    wait_until(lambda: name not in [t.name for t in log.list_topics()], 30, "topic deletion")
    with pytest.raises(riverbed.UnknownTopicError, match=name):
        log.topic(name)


def test_duplicate_topic_is_rejected(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name("dup")
    log.create_topic(name, partitions=1)
    with pytest.raises(riverbed.TopicExistsError, match=f"topic '{name}' already exists"):
        log.create_topic(name, partitions=2)
    assert log.topic(name).partitions == 1


@pytest.mark.parametrize("bad", ["", "has space", "a/b", "x" * 250, "..", "ünïcode"])
def test_invalid_topic_names(log: riverbed.Log, bad: str) -> None:
    with pytest.raises(riverbed.InvalidTopicError, match="invalid topic name"):
        log.create_topic(bad)


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("partitions", 0, "takes 1 to 100,000 partitions, got 0"),
        ("partitions", 10**20, "takes 1 to 100,000 partitions"),
        ("partitions", 2.5, "got 2.5"),
        ("retention_ms", -1, "retention_ms is a whole number from 0"),
        ("retention_ms", 10**20, "retention_ms is a whole number from 0"),  # SQLite's overflow
        ("max_record_bytes", 2**32, "max_record_bytes is a whole number from 0 to"),
        ("delete_retention_ms", 1.5, "delete_retention_ms is a whole number"),
    ],
)
def test_invalid_topic_settings(
    log: riverbed.Log, topic_name: TopicName, setting: str, value: object, message: str
) -> None:
    name = topic_name()
    with pytest.raises(riverbed.InvalidTopicError, match=message):
        log.create_topic(name, **{setting: value})  # type: ignore[arg-type]
    assert name not in {topic.name for topic in log.list_topics()}


def test_unknown_topic_everywhere(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name("missing")
    for call in (
        lambda: log.topic(name),
        lambda: log.describe_topic(name),
        lambda: log.delete_topic(name),
        lambda: log.end_offsets(name),
        lambda: log.beginning_offsets(name),
        lambda: log.consumer(group="g", topics=[name]),
    ):
        with pytest.raises(riverbed.UnknownTopicError, match=f"riverbed topics create {name}"):
            call()
    with log.producer() as producer, pytest.raises(riverbed.UnknownTopicError):
        producer.send(name, b"v")


# Producing and reading


def test_round_trip_keeps_every_field(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    log.create_topic(name, partitions=2)
    with log.producer() as producer:
        sent = producer.send(
            name, b"value", key=b"key", headers={"trace": b"abc", "n": b""}, timestamp_ms=1234
        ).result(timeout=30)
        tombstone = producer.send(name, None, key=b"key").result(timeout=30)
    assert sent.topic == name
    assert sent.partition == partition_for_key(b"key", 2)
    assert sent.offset == 0
    assert sent.timestamp_ms == 1234
    assert (tombstone.partition, tombstone.offset) == (sent.partition, 1)
    with log.consumer(topics=[name], from_beginning=True) as consumer:
        first, second = consume(consumer, 2)
    assert first == riverbed.Record(
        name, sent.partition, 0, 1234, b"key", b"value", {"trace": b"abc", "n": b""}
    )
    assert second.value is None
    assert second.key == b"key"
    assert abs(second.timestamp_ms - time.time() * 1000) < 60_000


def test_offsets_are_contiguous_and_ordered_per_partition(
    log: riverbed.Log, topic_name: TopicName
) -> None:
    name = topic_name()
    log.create_topic(name, partitions=4)
    with log.producer() as producer:
        producer.send_many(name, [(f"k{i % 50}".encode(), str(i).encode()) for i in range(5000)])
    assert sum(log.end_offsets(name).values()) == 5000
    with log.consumer(topics=[name], from_beginning=True) as consumer:
        records = consume(consumer, 5000)
        assert consumer.poll(timeout=0.5) == []
    by_partition: dict[int, list[riverbed.Record]] = defaultdict(list)
    for record in records:
        by_partition[record.partition].append(record)
    for partition, items in by_partition.items():
        assert [r.offset for r in items] == list(range(len(items)))
        for record in items:
            assert record.key is not None
            assert partition == partition_for_key(record.key, 4)
    # Within a key, values arrive in the order they were sent.
    per_key: dict[bytes, list[int]] = defaultdict(list)
    for record in records:
        assert record.key is not None and record.value is not None
        per_key[record.key].append(int(record.value))
    assert all(values == sorted(values) for values in per_key.values())


def test_keyless_records_spread_over_partitions(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    log.create_topic(name, partitions=4)
    # Sticky partitioning: a batch's worth (batch_size / partitions) per partition, in turn.
    with log.producer(batch_size=4_000) as producer:
        futures = [producer.send(name, b"x" * 100) for _ in range(400)]
        partitions = Counter(f.result(timeout=30).partition for f in futures)
    assert set(partitions) == {0, 1, 2, 3}
    assert min(partitions.values()) >= 80


def test_send_many_spreads_keyless_records(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    log.create_topic(name, partitions=4)
    with log.producer(batch_size=10_000) as producer:
        assert producer.send_many(name, [(None, b"x" * 100)] * 20_000) == 20_000
    ends = log.end_offsets(name)
    assert sum(ends.values()) == 20_000
    assert min(ends.values()) >= 2_000


def test_send_batch_keeps_each_records_headers_key_and_order(
    log: riverbed.Log, topic_name: TopicName
) -> None:
    name = topic_name()
    log.create_topic(name, partitions=3)
    records = [
        (f"k{i % 7}".encode(), str(i).encode(), {"n": str(i).encode(), "same": b"x"})
        for i in range(300)
    ]
    records += [(None, b"keyless", {}), (b"k1", None, None)]
    with log.producer() as producer:
        producer.send(name, b"before", key=b"k1")
        futures = producer.send_batch(name, records)
        assert len(futures) == len(records)
        sent = [future.result(timeout=30) for future in futures]
        assert all(future.done() and future.exception(0) is None for future in futures)
    with log.consumer(topics=[name], from_beginning=True) as consumer:
        read = {(r.partition, r.offset): r for r in consume(consumer, len(records) + 1)}
    for (key, value, headers), metadata in zip(records, sent, strict=True):
        record = read[metadata.partition, metadata.offset]
        assert (record.key, record.value, record.headers) == (key, value, headers or {})
        if key is not None:
            assert metadata.partition == partition_for_key(key, 3)
    # Within a partition, the batch's records follow one another in the order given.
    for partition in range(3):
        offsets = [m.offset for m in sent if m.partition == partition]
        assert offsets == sorted(offsets)
    assert sent[1].offset == 1 + sum(1 for m in sent[:1] if m.partition == sent[1].partition)


def test_send_batch_queues_none_when_the_log_refuses_one(
    log: riverbed.Log, topic_name: TopicName
) -> None:
    name, compacted = topic_name(), topic_name("compacted")
    log.create_topic(name, partitions=2, max_record_bytes=1_000)
    log.create_topic(compacted, compact=True)
    with log.producer() as producer:
        # The headers count: 900 bytes of value fit, and with 200 bytes of headers they do not.
        fits = (b"k", b"x" * 900, {"h": b""})
        too_large = (b"k", b"x" * 900, {"h": b"y" * 200})
        with pytest.raises(riverbed.RecordTooLargeError, match=r"1102 bytes.*1000-byte limit"):
            producer.send_batch(name, [fits, too_large, fits])
        with pytest.raises(InvalidRecordError, match="needs a key"):
            producer.send_batch(compacted, [(b"k", b"v", None), (None, b"v", None)])
        # The first record refused names the error, whatever is wrong with a later one.
        with pytest.raises(riverbed.RecordTooLargeError, match="1102 bytes"):
            producer.send_batch(name, [fits, too_large, (b"k", "a str", None)])
        with pytest.raises(InvalidRecordError, match="value is bytes or None, not str"):
            producer.send_batch(name, [fits, (b"k", "a str", None), too_large])
        assert producer.send_batch(name, []) == []
        # Over the limit together, each within it: all go.
        assert len(producer.send_batch(name, [fits, fits, fits])) == 3
        producer.send_batch(name, [fits])[0].result(timeout=30)
        (future,) = producer.send_batch(name, (record for record in [fits]))  # any iterable
        future.result(timeout=30)
    assert sum(log.end_offsets(name).values()) == 5
    assert sum(log.end_offsets(compacted).values()) == 0
    producer = log.producer()
    producer.close()
    with pytest.raises(riverbed.ClosedError):
        producer.send_batch(name, [fits])


def test_explicit_partition(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    log.create_topic(name, partitions=3)
    with log.producer() as producer:
        metadata = producer.send(name, b"v", key=b"any", partition=2).result(timeout=30)
        assert metadata.partition == 2
        with pytest.raises(riverbed.UnknownPartitionError, match="has no partition 3"):
            producer.send(name, b"v", partition=3)
        producer.send_many(name, [(None, b"a"), (b"k", b"b")], partition=1)
    assert log.end_offsets(name) == {0: 0, 1: 2, 2: 1}


def test_record_size_limit(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    log.create_topic(name, partitions=1, max_record_bytes=10_000)
    with log.producer() as producer:
        producer.send(name, b"x" * 9_000, key=b"k").result(timeout=30)
        with pytest.raises(riverbed.RecordTooLargeError, match=r"10001 bytes.*10000-byte limit"):
            producer.send(name, b"x" * 10_000, key=b"k")
        with pytest.raises(riverbed.RecordTooLargeError):
            producer.send_many(name, [(None, b"ok"), (None, b"x" * 20_000)])
    default = topic_name("default")
    log.create_topic(default)
    with log.producer() as producer, pytest.raises(riverbed.RecordTooLargeError, match="1048576"):
        producer.send(default, b"x" * (1024 * 1024 + 1))


class Blob(bytes):
    """A bytes subclass."""


def test_keys_values_and_header_values_are_bytes(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    log.create_topic(name, partitions=2)
    bad_records: list[tuple[Any, Any, Any, str]] = [
        (b"k", "a str", None, r"a record's value is bytes or None, not str: convert it"),
        ("k", b"v", None, r"a record's key is bytes or None, not str"),
        (b"k", 42, None, r"a record's value is bytes or None, not int"),
        (b"k", b"v", {"h": "a str"}, r"header 'h' is str: str; a header's name is a str and"),
        (b"k", b"v", {b"h": b"v"}, r"header b'h' is bytes: bytes"),
        # Kafka clients take a list of pairs; a dict has one value per name: converted by hand.
        (b"k", b"v", [("h", b"v")], r"headers are a dict .* not a list: .* pass dict\(pairs\)"),
    ]
    with log.producer() as producer:
        for key, value, headers, message in bad_records:
            with pytest.raises(InvalidRecordError, match=message):
                producer.send(name, value, key=key, headers=headers)
            with pytest.raises(InvalidRecordError, match=message):
                producer.send_batch(name, [(b"k", b"fine", None), (key, value, headers)])
            if headers is None:
                with pytest.raises(InvalidRecordError, match=message):
                    producer.send_many(name, [(key, value)])
            else:
                with pytest.raises(InvalidRecordError, match=message):
                    producer.send_many(name, [(b"k", b"v")], headers=headers)
        with pytest.raises(InvalidRecordError, match="value is bytes or None, not bytearray"):
            producer.send(name, bytearray(b"v"))
        # A subclass too (numpy.bytes_, say): msgspec would refuse it when the batch is written.
        with pytest.raises(InvalidRecordError, match="key is bytes or None, not Blob"):
            producer.send(name, b"v", key=Blob(b"k"))
        with pytest.raises(InvalidRecordError, match="header 'h' is str: Blob"):
            producer.send_batch(name, [(b"k", b"v", {"h": Blob(b"v")})])
        with pytest.raises(InvalidRecordError, match="header 'h' is str: bytearray"):
            producer.send_many(name, [(b"k", b"v")], headers={"h": bytearray(b"v")})
        producer.send(name, b"fine", key=b"k").result(timeout=30)
        # Any mapping will do.
        producer.send_batch(name, [(b"k", b"mapped", MappingProxyType({"h": b"v"}))])
    with log.consumer(topics=[name], from_beginning=True) as consumer:
        record, mapped = consume(consumer, 2)
        assert consumer.poll(timeout=0.5) == []  # none of the refused ones was queued
    assert (record.key, record.value) == (b"k", b"fine")
    assert (mapped.value, mapped.headers) == (b"mapped", {"h": b"v"})


def test_timestamps_must_be_positive(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    log.create_topic(name)
    with log.producer() as producer:
        # A float (time.time() * 1000) made the batch it was written in unreadable on SQLite.
        for bad in (0, -5, time.time() * 1000, True):
            with pytest.raises(riverbed.InvalidRecordError, match="positive epoch milliseconds"):
                producer.send(name, b"v", timestamp_ms=bad)
        assert producer.send(name, b"v", timestamp_ms=1).result(timeout=30).timestamp_ms == 1


def test_partitions_and_offsets_are_ints(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    log.create_topic(name, partitions=2)
    with log.producer() as producer:
        for bad in (1.0, True):
            with pytest.raises(riverbed.InvalidRecordError, match="partition must be an int"):
                producer.send(name, b"v", partition=bad)  # type: ignore[arg-type]
            with pytest.raises(riverbed.InvalidRecordError, match="partition must be an int"):
                producer.send_many(name, [(None, b"v")], partition=bad)  # type: ignore[arg-type]
        producer.send(name, b"kept", partition=1).result(timeout=30)
    with log.consumer(group=topic_name("group"), topics=[name], from_beginning=True) as consumer:
        (record,) = consume(consumer, 1)
        assert record.value == b"kept"
        for bad in (3.5, -1, True):
            with pytest.raises(ValueError, match="an offset is an int >= 0"):
                consumer.seek(name, 1, bad)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="an offset is an int >= 0"):
                consumer.commit({(name, 1): bad})  # type: ignore[dict-item]
    with pytest.raises(RiverbedError, match=r"topics is a list of names: pass topics=\['orders'\]"):
        log.consumer(topics="orders")


def test_send_batch_names_a_record_that_is_not_a_triple(
    log: riverbed.Log, topic_name: TopicName
) -> None:
    name = topic_name()
    log.create_topic(name)
    with log.producer() as producer:
        for records, message in [
            ([(b"k", b"v", None), (b"k", b"v")], r"record 1 of the batch is \(b'k', b'v'\)"),
            ([(b"k", b"v", None, 1)], "record 0 of the batch"),
            ([b"kvh"], "record 0 of the batch is b'kvh'"),
            (b"abc", "an iterable of \\(key, value, headers\\) records, not bytes"),
        ]:
            with pytest.raises(InvalidRecordError, match=message):
                producer.send_batch(name, records)  # type: ignore[arg-type]
    assert sum(log.end_offsets(name).values()) == 0


def test_send_many_queues_the_records_before_one_it_refuses(
    log: riverbed.Log, topic_name: TopicName
) -> None:
    name = topic_name()
    log.create_topic(name)
    with log.producer() as producer:
        for good in (10, 5_000):
            items: list[Any] = [(b"k", b"good")] * good + [(b"k", "a str"), (b"k", b"after")]
            with pytest.raises(InvalidRecordError, match="not str"):
                producer.send_many(name, items)
        producer.flush(30)
    assert sum(log.end_offsets(name).values()) == 5_010  # each one's good records, no more


def test_send_many_stamps_each_record_with_its_timestamp(
    log: riverbed.Log, topic_name: TopicName
) -> None:
    name = topic_name()
    log.create_topic(name, partitions=2)
    items: list[tuple[bytes | None, bytes | None]] = [(b"a", b"1"), (b"b", b"2"), (None, b"3")]
    stamps = [T0 + 5, T0 + 1, T0 + 9]
    with log.producer() as producer:
        for bad, message in [
            ([T0], "got 1 timestamps for 3 records"),
            ([T0, T0 + 1.5, T0], "positive epoch milliseconds as an int, got"),
            ([T0, 0, T0], "positive epoch milliseconds"),
        ]:
            with pytest.raises(InvalidRecordError, match=message):
                producer.send_many(name, items, timestamps=bad)  # type: ignore[arg-type]
        assert producer.send_many(name, iter(items), timestamps=stamps) == 3
        assert producer.send_many(name, [(b"a", b"4")], headers={"h": b"v"}, timestamps=[T0]) == 1
    with log.consumer(topics=[name], from_beginning=True) as consumer:
        got = {record.value: record.timestamp_ms for record in consume(consumer, 4)}
    assert got == {b"1": T0 + 5, b"2": T0 + 1, b"3": T0 + 9, b"4": T0}


def test_header_names_count_in_utf8_bytes(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    log.create_topic(name, max_record_bytes=1_000)
    with log.producer() as producer:
        wide = {"é" * 300: b""}  # 300 characters, 600 bytes
        with pytest.raises(riverbed.RecordTooLargeError, match="1000-byte limit"):
            producer.send(name, b"x" * 500, headers=wide)
        with pytest.raises(riverbed.RecordTooLargeError, match="1000-byte limit"):
            producer.send_batch(name, [(None, b"x" * 500, wide)])
        producer.send(name, b"x" * 400, headers=wide).result(timeout=30)


def test_a_seek_past_the_end_resets_as_a_deleted_position_does(
    log: riverbed.Log, topic_name: TopicName
) -> None:
    name = topic_name()
    log.create_topic(name)
    with log.producer() as producer:
        producer.send_many(name, [(None, b"old%d" % i) for i in range(5)])
    with log.consumer(topics=[name], from_beginning=True) as consumer:
        consume(consumer, 5)
        consumer.seek(name, 0, 100)
        with log.producer() as producer:
            producer.send_many(name, [(None, b"new%d" % i) for i in range(3)])
        # Kafka's OffsetOutOfRange reset, to the beginning here (SQLite waited at offset 100).
        values = [record.value for record in consume(consumer, 8)]
    assert values == [b"old0", b"old1", b"old2", b"old3", b"old4", b"new0", b"new1", b"new2"]


def test_compacted_topic_needs_keys(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    log.create_topic(name, compact=True)
    with log.producer() as producer, pytest.raises(InvalidRecordError, match="needs a key"):
        producer.send(name, b"v")


def test_send_after_close_fails(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    log.create_topic(name)
    producer = log.producer()
    producer.close()
    with pytest.raises(riverbed.ClosedError):
        producer.send(name, b"v")


def test_future_callbacks_and_flush(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    log.create_topic(name)
    seen: list[int] = []
    with log.producer(linger_ms=60_000) as producer:
        future = producer.send(name, b"v")
        future.add_done_callback(lambda f: seen.append(f.result().offset))
        producer.flush()
        assert future.done()
    assert seen == [0]


# Offsets


def test_beginning_end_and_time_offsets(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    log.create_topic(name, partitions=2)
    with log.producer() as producer:
        for i, ts in enumerate([1_000, 2_000, 3_000]):
            producer.send(name, str(i).encode(), partition=0, timestamp_ms=ts)
    assert log.beginning_offsets(name) == {0: 0, 1: 0}
    assert log.end_offsets(name) == {0: 3, 1: 0}
    assert log.offsets_for_times(name, 1_500) == {0: 1, 1: None}
    assert log.offsets_for_times(name, 0) == {0: 0, 1: None}
    assert log.offsets_for_times(name, 3_001) == {0: None, 1: None}
    for bad in (-1, -2, 1.5):  # Kafka reads -1 and -2 as the latest and earliest offsets
        with pytest.raises(ValueError, match="an int >= 0"):
            log.offsets_for_times(name, bad)  # type: ignore[arg-type]


def test_seek_position_and_manual_assignment(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    log.create_topic(name, partitions=2)
    with log.producer() as producer:
        producer.send_many(name, [(None, str(i).encode()) for i in range(10)], partition=1)
    with log.consumer(topics=[name], from_beginning=True) as consumer:
        assert consumer.assignment() == {(name, 0), (name, 1)}
        assert consumer.group is None
        consumer.seek(name, 1, 7)
        assert consumer.position(name, 1) == 7
        assert [r.offset for r in consume(consumer, 3)] == [7, 8, 9]
        assert consumer.position(name, 1) == 10
        consumer.seek_to_beginning([(name, 1)])
        assert [r.offset for r in consume(consumer, 10)] == list(range(10))
        consumer.seek(name, 1, 5)
        consumer.seek_to_end()
        assert consumer.poll(timeout=0.5) == []
        with pytest.raises(RiverbedError, match="no group"):
            consumer.commit()


def test_latest_consumer_sees_only_new_records(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    log.create_topic(name, partitions=1)
    with log.producer() as producer:
        producer.send(name, b"old")
    with log.consumer(topics=[name], from_beginning=False) as consumer:
        wait_until(lambda: bool(consumer.poll(timeout=0.2)) or bool(consumer.assignment()), 30)
        assert consumer.position(name, 0) == 1
        with log.producer() as producer:
            producer.send(name, b"new")
        (record,) = consume(consumer, 1)
    assert record.value == b"new"


# Groups


def _drain(consumer: riverbed.Consumer, seconds: float) -> list[riverbed.Record]:
    records: list[riverbed.Record] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        records.extend(consumer.poll(timeout=0.2))
    return records


def test_group_commit_and_resume(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    group = topic_name("group")
    log.create_topic(name, partitions=3)
    with log.producer() as producer:
        producer.send_many(name, [(f"k{i}".encode(), b"v") for i in range(300)])
    with log.consumer(group=group, topics=[name], from_beginning=True) as consumer:
        assert consumer.group == group
        first = consume(consumer, 300)
        consumer.commit()
        assert set(consumer.committed().values()) != {None}
    assert len({(r.partition, r.offset) for r in first}) == 300
    assert log.group_lag(group) == {(name, p): 0 for p in range(3)}
    assert group in log.list_groups()
    with log.producer() as producer:
        producer.send_many(name, [(f"k{i}".encode(), b"w") for i in range(30)])
    assert sum(log.group_lag(group).values()) == 30
    with log.consumer(group=group, topics=[name], from_beginning=True) as consumer:
        again = consume(consumer, 30)
        assert {r.value for r in again} == {b"w"}
        assert _drain(consumer, 1.0) == []
        consumer.commit()
    description = log.describe_group(group)
    assert description.group == group
    assert sorted((o.topic, o.partition, o.lag) for o in description.offsets) == [
        (name, p, 0) for p in range(3)
    ]


def test_commit_explicit_offsets(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    group = topic_name("group")
    log.create_topic(name, partitions=1)
    with log.producer() as producer:
        producer.send_many(name, [(None, str(i).encode()) for i in range(10)])
    with log.consumer(group=group, topics=[name], from_beginning=True) as consumer:
        consume(consumer, 10)
        consumer.commit({(name, 0): 4})
        assert consumer.committed() == {(name, 0): 4}
    assert log.group_lag(group) == {(name, 0): 6}
    with log.consumer(group=group, topics=[name], from_beginning=True) as consumer:
        assert [r.offset for r in consume(consumer, 6)] == [4, 5, 6, 7, 8, 9]


def test_group_members_share_partitions(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    group = topic_name("group")
    log.create_topic(name, partitions=4)
    with log.producer() as producer:
        producer.send_many(name, [(f"k{i}".encode(), b"v") for i in range(2000)])
    assigned: list[set[tuple[str, int]]] = []
    a = log.consumer(group=group, topics=[name], from_beginning=True, on_assign=assigned.append)
    b = log.consumer(group=group, topics=[name], from_beginning=True)
    try:
        seen: list[riverbed.Record] = []

        def balanced() -> bool:
            for consumer in (a, b):
                seen.extend(consumer.poll(max_records=100, timeout=0.1))
            return (
                len(a.assignment()) == 2
                and len(b.assignment()) == 2
                and not (a.assignment() & b.assignment())
            )

        wait_until(balanced, 60, "both members to get two partitions")
        assert assigned

        def everything_read() -> bool:
            for consumer in (a, b):
                seen.extend(consumer.poll(max_records=500, timeout=0.1))
            return len({(r.partition, r.offset) for r in seen}) == 2000

        wait_until(everything_read, 60, "the two members to read all 2000 records")
        description = log.describe_group(group)
        owned = sorted(tp for member in description.members for tp in member.assignment)
        assert owned == [(name, p) for p in range(4)]
        assert len(description.members) == 2
    finally:
        a.close()
    # The leaver's partitions move to the remaining member.
    wait_until(
        lambda: bool(b.poll(timeout=0.1) is not None and len(b.assignment()) == 4),
        60,
        "the survivor to take all partitions",
    )
    b.close()


def test_revoke_and_assign_callbacks(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    group = topic_name("group")
    log.create_topic(name, partitions=2)
    owned: set[tuple[str, int]] = set()
    a = log.consumer(
        group=group,
        topics=[name],
        on_assign=owned.update,
        on_revoke=owned.difference_update,
    )
    wait_until(
        lambda: (
            a.poll(timeout=0.1) is not None and owned == a.assignment() == {(name, 0), (name, 1)}
        ),
        60,
        "the first member's assignment",
    )
    b = log.consumer(group=group, topics=[name])
    try:
        wait_until(
            lambda: (
                a.poll(timeout=0.1) is not None
                and b.poll(timeout=0.1) is not None
                and len(a.assignment()) == 1
                and owned == a.assignment()
            ),
            60,
            "the rebalance to reach the callbacks",
        )
    finally:
        b.close()
        a.close()


# Retention and compaction (eventual: the embedded log's producers and Kafka's broker apply them
# in the background, so tests wait for them)


def _produce_in_batches(
    log: riverbed.Log, name: str, batches: int, per_batch: int, timestamp_ms: int | None = None
) -> None:
    for batch in range(batches):
        with log.producer() as producer:
            for i in range(per_batch):
                producer.send(
                    name,
                    b"x" * 100,
                    key=f"k{batch}-{i}".encode(),
                    partition=0,
                    timestamp_ms=timestamp_ms,
                )
        time.sleep(0.2)  # lets Kafka roll a segment between batches


def test_retention_by_time(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    log.create_topic(name, partitions=1, retention_ms=60_000)
    hour_ago = int(time.time() * 1000) - 3_600_000
    _produce_in_batches(log, name, batches=2, per_batch=50, timestamp_ms=hour_ago)
    with log.producer() as producer:
        producer.send(name, b"fresh", key=b"fresh", partition=0)
    wait_until(lambda: log.beginning_offsets(name)[0] == 100, 90, "expired records to go")
    assert log.end_offsets(name) == {0: 101}
    with log.consumer(topics=[name], from_beginning=True) as consumer:
        (record,) = consume(consumer, 1)
    assert (record.offset, record.value) == (100, b"fresh")


def test_retention_by_size(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    log.create_topic(name, partitions=1, retention_bytes=20_000)
    _produce_in_batches(log, name, batches=6, per_batch=100)
    wait_until(lambda: log.beginning_offsets(name)[0] > 0, 90, "old records to go")
    assert log.end_offsets(name) == {0: 600}
    with log.consumer(topics=[name], from_beginning=True) as consumer:
        records = _drain(consumer, 2.0)
    # Retention may advance again while we read: the consumer then resets to the new log start
    # (offsets jump forward, as Kafka's auto.offset.reset does), and reads on without gaps to
    # the end.
    offsets = [r.offset for r in records]
    assert offsets
    assert offsets[0] > 0
    assert offsets == sorted(set(offsets))
    jumps = [i for i in range(1, len(offsets)) if offsets[i] != offsets[i - 1] + 1]
    last_run = offsets[jumps[-1] :] if jumps else offsets
    assert last_run == list(range(last_run[0], 600))


def test_compaction_keeps_last_value_per_key(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    log.create_topic(name, partitions=1, compact=True, delete_retention_ms=0)
    last_offsets: dict[bytes, int] = {}
    offset = 0
    for version in range(5):
        with log.producer() as producer:
            for k in range(20):
                key = f"key-{k}".encode()
                value = None if (k == 0 and version == 4) else f"{k}-v{version}".encode()
                producer.send(name, value, key=key, partition=0)
                last_offsets[key] = offset
                offset += 1
        time.sleep(0.3)

    def compacted() -> list[riverbed.Record]:
        with log.consumer(topics=[name], from_beginning=True) as consumer:
            return _drain(consumer, 1.0)

    def only_last_values() -> bool:
        # Later writes let Kafka roll the active segment and start the pass that drops the
        # tombstone, as ongoing traffic would.
        with log.producer() as producer:
            producer.send(name, b"tail", key=b"tail", partition=0)
        records = [r for r in compacted() if r.key != b"tail"]
        keys = [r.key for r in records]
        return len(keys) == len(set(keys)) and b"key-0" not in keys

    wait_until(only_last_values, 120, "compaction and tombstone removal")
    records = [r for r in compacted() if r.key != b"tail"]
    assert {r.key: r.offset for r in records} == {
        k: o for k, o in last_offsets.items() if k != b"key-0"
    }
    assert all(r.value == f"{r.key.decode()[4:]}-v4".encode() for r in records if r.key)
    assert log.end_offsets(name)[0] > 100


def test_slow_processing_keeps_the_membership(log: riverbed.Log, topic_name: TopicName) -> None:
    """Heartbeats do not depend on poll(): a batch that takes longer than the session timeout to
    process costs neither the partitions nor the commit."""
    name = topic_name()
    group = topic_name("group")
    log.create_topic(name, partitions=2)
    with log.producer() as producer:
        producer.send_many(name, [(None, b"v")] * 10)
    with log.consumer(
        group=group, topics=[name], from_beginning=True, session_timeout_ms=2000
    ) as consumer:
        consume(consumer, 10)
        assignment = consumer.assignment()
        time.sleep(5)  # 2.5 session timeouts without a poll
        consumer.commit()
        assert consumer.assignment() == assignment == {(name, 0), (name, 1)}
    assert log.group_lag(group) == {(name, 0): 0, (name, 1): 0}


def test_headers_stay_with_their_record(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    log.create_topic(name)
    sent: list[dict[str, bytes]] = [{"a": b"1"}, {}, {}, {"b": b"2"}, {"b": b"2"}, {}]
    with log.producer() as producer:
        for headers in sent:  # one timestamp: records batched together keep their own headers
            producer.send(name, b"v", headers=headers, timestamp_ms=1_000)
    with log.consumer(topics=[name], from_beginning=True) as consumer:
        records = consume(consumer, len(sent))
    assert [r.headers for r in records] == sent


def test_send_many_with_shared_headers(log: riverbed.Log, topic_name: TopicName) -> None:
    name = topic_name()
    log.create_topic(name, partitions=2, max_record_bytes=1_000)
    with log.producer() as producer:
        producer.send_many(name, [(b"k", b"a"), (None, b"b")], headers={"v": b"1"})
        producer.send_many(name, [(None, b"c")])
        with pytest.raises(riverbed.RecordTooLargeError):  # the headers count towards the limit
            producer.send_many(name, [(None, b"x" * 900)], headers={"h": b"y" * 200})
    with log.consumer(topics=[name], from_beginning=True) as consumer:
        records = consume(consumer, 3)
    assert {r.value: r.headers for r in records} == {b"a": {"v": b"1"}, b"b": {"v": b"1"}, b"c": {}}
