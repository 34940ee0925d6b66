"""Kafka's default partitioner: murmur2 of the key, so a key lands in the same partition number on
every backend (and in the partition a Java or librdkafka producer would pick for it)."""

from __future__ import annotations

import random
import struct

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
# Keys repeat (customers, cards, aggregates), so memoizing the hash pays; bounded by clearing.
_CACHE_LIMIT = 1 << 16
_cache: dict[bytes, int] = {}


def murmur2(data: bytes) -> int:
    """Kafka's ``Utils.murmur2`` as an unsigned 32-bit integer."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    blocks = length >> 2
    for block in struct.unpack_from(f"<{blocks}I", data):
        k = (block * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = length & 3
    if tail:
        base = length & ~3
        if tail == 3:
            h ^= data[base + 2] << 16
        if tail >= 2:
            h ^= data[base + 1] << 8
        h ^= data[base]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def partition_for_key(key: bytes, partitions: int) -> int:
    """``toPositive(murmur2(key)) % partitions``, as Kafka's ``BuiltInPartitioner`` computes it."""
    hashed = _cache.get(key)
    if hashed is None:
        if len(_cache) >= _CACHE_LIMIT:
            _cache.clear()
        hashed = _cache[key] = murmur2(key) & 0x7FFFFFFF
    return hashed % partitions


class StickyPartitioner:
    """Kafka's sticky partitioning of records without a key (KIP-480): they all go to one partition
    until a batch's worth of bytes (``batch_size / partitions``) went there, then to the next, so
    batches fill up and the partitions even out over time."""

    __slots__ = ("batch_size", "filled", "partition")

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.partition = random.randrange(1 << 16)  # producers start apart
        self.filled = 0

    def next(self, size: int, partitions: int) -> int:
        """The partition for a keyless record of ``size`` bytes (counting its overhead)."""
        self.filled += size
        if self.filled >= self.batch_size // partitions:
            self.filled = 0
            self.partition += 1
        return self.partition % partitions
