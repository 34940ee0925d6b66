"""Property tests: the batch encoding round trip, the partitioner and the group assignor."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import riverbed
from riverbed.log.partitioner import StickyPartitioner, murmur2, partition_for_key
from riverbed.log.sqlite.groups import Member, assign
from riverbed.log.sqlite.store import decode_batch, encode_batch

optional_bytes = st.none() | st.binary(max_size=300)
records = st.builds(
    riverbed.Record,
    topic=st.from_regex(r"[A-Za-z0-9._-]{1,40}", fullmatch=True),
    partition=st.integers(0, 10_000),
    offset=st.integers(0, 2**62),
    timestamp_ms=st.integers(0, 2**50),
    key=optional_bytes,
    value=optional_bytes,
    headers=st.dictionaries(st.text(max_size=20), st.binary(max_size=50), max_size=4),
)


@given(st.lists(records, min_size=1, max_size=50))
def test_batch_round_trip(batch: list[riverbed.Record]) -> None:
    payload, crc = encode_batch(batch)
    assert decode_batch(payload, crc, "test") == batch


@given(st.lists(records, min_size=1, max_size=20), st.data())
def test_any_flipped_byte_is_detected(batch: list[riverbed.Record], data: st.DataObject) -> None:
    payload, crc = encode_batch(batch)
    index = data.draw(st.integers(0, len(payload) - 1))
    flip = data.draw(st.integers(1, 255))
    damaged = payload[:index] + bytes([payload[index] ^ flip]) + payload[index + 1 :]
    with pytest.raises(riverbed.CorruptLogError, match="CRC"):
        decode_batch(damaged, crc, "test")


# Kafka's own test vectors (clients/src/test/java/.../UtilsTest.java and kafka-python).
@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (b"abc", 479470107),
    ],
)
def test_murmur2_matches_kafka(key: bytes, expected: int) -> None:
    assert murmur2(key) == expected & 0xFFFFFFFF


@given(st.binary(max_size=200), st.integers(1, 1000))
def test_partition_for_key_is_stable_and_in_range(key: bytes, partitions: int) -> None:
    partition = partition_for_key(key, partitions)
    assert 0 <= partition < partitions
    assert partition == (murmur2(key) & 0x7FFFFFFF) % partitions
    assert partition_for_key(bytes(key), partitions) == partition


@given(st.integers(1, 64), st.integers(1, 2000), st.integers(1, 500))
def test_sticky_partitioner_fills_partitions_evenly(
    partitions: int, records: int, size: int
) -> None:
    batch_size = 10_000
    sticky = StickyPartitioner(batch_size)
    counts = [0] * partitions
    runs = 0
    previous = None
    for _ in range(records):
        partition = sticky.next(size, partitions)
        counts[partition] += 1
        runs += partition != previous
        previous = partition
    # One partition at a time, a batch's worth each, in turn: counts differ by at most one run.
    per_run = max(batch_size // partitions // size, 1)
    assert max(counts) - min(counts) <= per_run + 1
    assert runs <= records // per_run + 1


topics = st.sampled_from(["a", "b", "c"])


@given(
    st.lists(
        st.tuples(st.uuids().map(str), st.frozensets(topics, min_size=1)),
        min_size=1,
        max_size=8,
        unique_by=lambda m: m[0],
    ),
    st.fixed_dictionaries(
        {"a": st.integers(0, 20), "b": st.integers(0, 20), "c": st.integers(0, 20)}
    ),
)
def test_range_assignor_covers_every_partition_once(
    members: list[tuple[str, frozenset[str]]], partitions: dict[str, int]
) -> None:
    group = [Member(member_id, tuple(sorted(t))) for member_id, t in members]
    assignment = assign(group, partitions)
    owned = [tp for tps in assignment.values() for tp in tps]
    subscribed = {t for _, ts in members for t in ts}
    assert sorted(owned) == sorted((t, p) for t in subscribed for p in range(partitions[t]))
    for member in group:
        assert all(t in member.topics for t, _ in assignment[member.member_id])
    for topic in subscribed:
        shares = [
            sum(1 for t, _ in assignment[m.member_id] if t == topic)
            for m in group
            if topic in m.topics
        ]
        assert max(shares) - min(shares) <= 1
    # Deterministic: every member computes the same answer from the same live members.
    assert assign(list(reversed(group)), partitions) == assignment
