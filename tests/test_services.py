"""The real servers the suites build on start here, or CI fails (RIVERBED_REQUIRE_SERVICES=1)."""

from __future__ import annotations

import redis

import riverbed


def test_redis_server_round_trip(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        entry = client.xadd("riverbed-smoke", {"value": b"hello"})
        ((stream, entries),) = client.xread({"riverbed-smoke": 0})
        assert stream == b"riverbed-smoke"
        assert entries == [(entry, {b"value": b"hello"})]
    finally:
        client.close()


def test_kafka_broker_round_trip(kafka_url: str) -> None:
    with riverbed.connect(kafka_url) as log:
        log.create_topic("riverbed-smoke", partitions=1)
        try:
            with log.producer() as producer:
                producer.send("riverbed-smoke", b"hello").result(timeout=30)
            with log.consumer(topics=["riverbed-smoke"], from_beginning=True) as consumer:
                records = consumer.poll(timeout=10)
            assert [r.value for r in records] == [b"hello"]
        finally:
            log.delete_topic("riverbed-smoke")
