"""Pipeline state on Kafka (riverbed/streams/state/kafka.py): the local files and their
checkpoints against the changelog, with a real broker."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from riverbed.log.kafka import KafkaLog
from riverbed.streams.state.backend import CHANGELOG_SUFFIX
from riverbed.streams.state.kafka import KafkaState

pytestmark = pytest.mark.kafka


def test_a_fenced_worker_releasing_late_leaves_the_new_owners_writes_to_replay(
    kafka_log: KafkaLog, tmp_path: Path
) -> None:
    """Worker A is paused past its session; B takes the partition over, writes and dies; A
    resumes and releases the partition (which B's workers share the state directory of). The
    next owner must see B's write, not A's older one."""
    store = f"counts-{time.time_ns()}"
    kafka_log.create_topic(store + CHANGELOG_SUFFIX, compact=True)
    group = f"g-{time.time_ns()}"
    with (
        kafka_log.producer() as producer,
        kafka_log.consumer(group=group, topics=[store + CHANGELOG_SUFFIX]) as consumer,
    ):
        a = KafkaState(kafka_log, "app", tmp_path)
        assert a.load(store, 0) == {}
        a.commit(producer, consumer, {}, {(store, 0): {b"k": b"1"}}, exactly_once=False)

        b = KafkaState(kafka_log, "app", tmp_path)  # the partition's new owner
        assert b.load(store, 0) == {b"k": b"1"}
        b.commit(producer, consumer, {}, {(store, 0): {b"k": b"2"}}, exactly_once=False)
        # B dies without releasing; A, resumed, releases the partition it lost.
        a.release({0})

        assert KafkaState(kafka_log, "app", tmp_path).load(store, 0) == {b"k": b"2"}
