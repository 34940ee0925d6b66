"""Kafka's default partitioner: murmur2 of the key, so a key lands in the same partition number on
every backend (and in the partition a Java or librdkafka producer would pick for it)."""

from __future__ import annotations

import itertools
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


class KeylessSpreader:
    """Spreads records without a key over all partitions, round robin per producer."""

    __slots__ = ("_counter",)

    def __init__(self) -> None:
        self._counter = itertools.count()

    def next_partition(self, partitions: int) -> int:
        return next(self._counter) % partitions
