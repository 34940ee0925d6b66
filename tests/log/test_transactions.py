"""Exactly-once read-process-write (``Log.transactional_producer``), on every backend.

The conformance cases run in-process; the crash cases SIGKILL or SIGSTOP worker processes, which
are this module run as ``python -m tests.log.test_transactions ROLE ...``.
"""

from __future__ import annotations

import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

import riverbed
from riverbed.errors import RiverbedError
from riverbed.log.errors import TransactionAbortedError, TransactionStateError
from tests.support import Worker, consume, take_over, wait_until

TopicName = Callable[[str], str]
Offsets = dict[tuple[str, int], int]
SENTINEL = b"--end--"


def _next_offsets(records: list[riverbed.Record]) -> Offsets:
    """The offsets that commit ``records``: per partition, the next one to read."""
    offsets: Offsets = {}
    for r in records:
        offsets[r.topic, r.partition] = max(offsets.get((r.topic, r.partition), 0), r.offset + 1)
    return offsets


def _committed_records(log: riverbed.Log, topic: str, timeout: float = 60) -> list[riverbed.Record]:
    """Every record a consumer sees in ``topic``, read up to a sentinel sent to each partition
    (on Kafka it shows up only once no transaction before it is open any more)."""
    partitions = log.topic(topic).partitions
    with log.producer() as producer:
        for partition in range(partitions):
            producer.send(topic, SENTINEL, partition=partition)
    records: list[riverbed.Record] = []
    ended: set[int] = set()
    deadline = time.monotonic() + timeout
    with log.consumer(topics=[topic], from_beginning=True) as consumer:
        while len(ended) < partitions:
            if time.monotonic() > deadline:
                pytest.fail(f"the sentinels of '{topic}' did not arrive within {timeout} s")
            for record in consumer.poll(timeout=0.5):
                if record.value == SENTINEL:
                    ended.add(record.partition)
                else:
                    records.append(record)
    return records


def _source(log: riverbed.Log, topic_name: TopicName, count: int, partitions: int = 2) -> str:
    name = topic_name("in")
    log.create_topic(name, partitions=partitions)
    with log.producer() as producer:
        producer.send_many(name, [(f"k{i}".encode(), str(i).encode()) for i in range(count)])
    return name


# The contract


def test_commit_publishes_records_and_offsets(log: riverbed.Log, topic_name: TopicName) -> None:
    source, sink, group = _source(log, topic_name, 20), topic_name("out"), topic_name("group")
    log.create_topic(sink, partitions=2)
    with log.consumer(group=group, topics=[source], from_beginning=True) as consumer:
        records = consume(consumer, 20)
        offsets = _next_offsets(records)
        with log.transactional_producer(consumer) as producer:
            producer.begin_transaction()
            futures = [producer.send(sink, r.value, key=r.key) for r in records[:10]]
            futures += producer.send_batch(sink, [(r.key, r.value, None) for r in records[10:15]])
            producer.send_many(sink, [(r.key, r.value) for r in records[15:]])
            called: list[riverbed.SendFuture] = []
            futures[0].add_done_callback(called.append)
            producer.commit_transaction(offsets)
            assert called == [futures[0]]
            assert all(f.result(10).topic == sink for f in futures)
        assert consumer.committed() == offsets
    assert log.group_lag(group) == {(source, 0): 0, (source, 1): 0}
    copied = _committed_records(log, sink)
    assert sorted(r.value for r in copied) == sorted(r.value for r in records)


def test_abort_publishes_nothing(log: riverbed.Log, topic_name: TopicName) -> None:
    source, sink, group = _source(log, topic_name, 10), topic_name("out"), topic_name("group")
    log.create_topic(sink, partitions=2)
    with log.consumer(group=group, topics=[source], from_beginning=True) as consumer:
        records = consume(consumer, 10)
        with log.transactional_producer(consumer) as producer:
            producer.begin_transaction()
            futures = [producer.send(sink, b"aborted", key=r.key) for r in records]
            producer.send_many(sink, [(None, b"aborted")] * 5)
            futures += producer.send_batch(sink, [(b"k", b"aborted", {"h": b"v"})] * 3)
            failed: list[BaseException | None] = []
            futures[0].add_done_callback(lambda f: failed.append(f.exception()))
            producer.abort_transaction()
            assert all(f.done() for f in futures)
            for future in futures:
                with pytest.raises(TransactionAbortedError, match="aborted"):
                    future.result()
            assert len(failed) == 1
            assert isinstance(failed[0], TransactionAbortedError)
            producer.flush()  # the aborted send_many records are no delivery error
            assert consumer.committed() == {(source, 0): None, (source, 1): None}
            # The producer goes on with a new transaction.
            producer.begin_transaction()
            producer.send(sink, b"committed", key=b"k")
            producer.commit_transaction(_next_offsets(records[:1]))
        first = records[0]
        assert consumer.committed() == {
            (source, p): (first.offset + 1 if p == first.partition else None) for p in (0, 1)
        }
    assert [r.value for r in _committed_records(log, sink)] == [b"committed"]


def test_open_transaction_is_invisible(log: riverbed.Log, topic_name: TopicName) -> None:
    source, sink, group = _source(log, topic_name, 5), topic_name("out"), topic_name("group")
    log.create_topic(sink, partitions=1)
    with (
        log.consumer(group=group, topics=[source], from_beginning=True) as consumer,
        log.consumer(topics=[sink], from_beginning=True) as reader,
    ):
        records = consume(consumer, 5)
        with log.transactional_producer(consumer) as producer:
            producer.begin_transaction()
            pending = producer.send(sink, records[0].value)
            producer.send_many(sink, [(r.key, r.value) for r in records[1:]])
            producer.flush()  # on Kafka, the records are in the log, but uncommitted
            with pytest.raises(TransactionStateError, match="transaction is still open"):
                pending.result(timeout=1)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                assert reader.poll(timeout=0.2) == []
            assert sum(log.group_lag(group).values()) == 5
            producer.commit_transaction(_next_offsets(records))
        assert sorted(r.value for r in consume(reader, 5)) == sorted(r.value for r in records)
    assert sum(log.group_lag(group).values()) == 0


def test_fenced_member_cannot_commit(log: riverbed.Log, topic_name: TopicName) -> None:
    source, sink, group = _source(log, topic_name, 20), topic_name("out"), topic_name("group")
    log.create_topic(sink, partitions=1)
    first = log.consumer(group=group, topics=[source], from_beginning=True)
    second: riverbed.Consumer | None = None
    try:
        records = consume(first, 20)
        producer = log.transactional_producer(first)
        producer.begin_transaction()
        futures = [producer.send(sink, r.value) for r in records]
        second = log.consumer(group=group, topics=[source], from_beginning=True)
        taken: list[riverbed.Record] = []

        def moved() -> bool:
            assert second is not None
            first.poll(timeout=0.1)
            taken.extend(second.poll(timeout=0.1))
            return bool(second.assignment()) and not (first.assignment() & second.assignment())

        wait_until(moved, 60, "a partition to move to the second member")
        with pytest.raises(riverbed.CommitFailedError, match="commit rejected"):
            producer.commit_transaction(_next_offsets(records))
        for future in futures:
            assert isinstance(future.exception(), TransactionAbortedError)
        producer.close()
        # Nothing was committed, so the new owner reads its partitions from the beginning.
        owned = second.assignment()
        expected = [r for r in records if (r.topic, r.partition) in owned]
        taken += consume(second, len(expected) - len(taken))
        assert sorted(r.offset for r in taken) == sorted(r.offset for r in expected)
        assert set(second.committed().values()) == {None}
    finally:
        first.close()
        if second is not None:
            second.close()
    assert _committed_records(log, sink) == []


def test_calls_out_of_order(log: riverbed.Log, topic_name: TopicName) -> None:
    source, group = _source(log, topic_name, 1), topic_name("group")
    with (
        log.consumer(group=group, topics=[source], from_beginning=True) as consumer,
        log.transactional_producer(consumer) as producer,
    ):
        for call in (
            lambda: producer.send(source, b"v"),
            lambda: producer.send_many(source, [(None, b"v")]),
            lambda: producer.send_batch(source, [(None, b"v", {"h": b"v"})]),
            lambda: producer.commit_transaction({}),
            producer.abort_transaction,
        ):
            with pytest.raises(TransactionStateError, match="begin_transaction"):
                call()
        producer.begin_transaction()
        with pytest.raises(TransactionStateError, match="already open"):
            producer.begin_transaction()
        producer.abort_transaction()
        with pytest.raises(TransactionStateError):
            producer.commit_transaction({})
        producer.begin_transaction()  # a state error changed nothing
        producer.commit_transaction({})


def test_consumer_without_group_is_refused(log: riverbed.Log, topic_name: TopicName) -> None:
    source = _source(log, topic_name, 1)
    with (
        log.consumer(topics=[source]) as consumer,
        pytest.raises(RiverbedError, match=r"no group; create it with log.consumer\(group="),
    ):
        log.transactional_producer(consumer)


def test_close_aborts_the_open_transaction(log: riverbed.Log, topic_name: TopicName) -> None:
    source, sink, group = _source(log, topic_name, 3), topic_name("out"), topic_name("group")
    log.create_topic(sink)
    with log.consumer(group=group, topics=[source], from_beginning=True) as consumer:
        producer = log.transactional_producer(consumer)
        producer.begin_transaction()
        future = producer.send(sink, b"v")
        producer.close()
        assert isinstance(future.exception(), TransactionAbortedError)
    assert _committed_records(log, sink) == []


# Crash tests


def worker(*args: str) -> Worker:
    return Worker("tests.log.test_transactions", *args)


def _committed(lines: list[str]) -> int:
    return sum(int(line.split()[1]) for line in lines if line.startswith("committed "))


@pytest.mark.slow
def test_killed_copier_copies_every_record_once(
    log: riverbed.Log, log_url: str, topic_name: TopicName, workers: list[Worker]
) -> None:
    total = 3000
    source, sink, group = _source(log, topic_name, total, 3), topic_name("out"), topic_name("group")
    log.create_topic(sink, partitions=3)
    victim = worker("copy", log_url, source, sink, group)
    workers.append(victim)
    victim.wait_for(lambda lines: _committed(lines) >= 300)
    victim.signal(signal.SIGKILL)
    victim.stop()
    assert _committed(victim.lines) < total, "the copier finished before it was killed"
    successor = worker("copy", log_url, source, sink, group)
    workers.append(successor)
    wait_until(lambda: sum(log.group_lag(group).values()) == 0, 120, "the successor to catch up")
    successor.stop()
    copied = Counter(r.value for r in _committed_records(log, sink))
    assert {value for value, n in copied.items() if n > 1} == set(), "duplicates"
    assert set(copied) == {str(i).encode() for i in range(total)}


@pytest.mark.slow
def test_paused_zombie_cannot_commit(
    log: riverbed.Log, log_url: str, topic_name: TopicName, workers: list[Worker], tmp_path: Path
) -> None:
    source, sink, group = _source(log, topic_name, 100), topic_name("out"), topic_name("group")
    log.create_topic(sink, partitions=2)
    go = tmp_path / "go"
    zombie = worker("zombie", log_url, source, sink, group, str(go))
    workers.append(zombie)
    zombie.wait_for(lambda lines: any(line.startswith("sent") for line in lines))
    zombie.signal(signal.SIGSTOP)
    try:
        with log.consumer(
            group=group, topics=[source], from_beginning=True, session_timeout_ms=3000
        ) as successor:
            records = take_over(successor, partitions=2, records=100)
            with log.transactional_producer(successor) as producer:
                producer.begin_transaction()
                producer.send_many(sink, [(r.key, r.value) for r in records])
                producer.commit_transaction(_next_offsets(records))
    finally:
        go.touch()
        zombie.signal(signal.SIGCONT)
    zombie.wait_for(lambda lines: any(line.startswith("verdict") for line in lines))
    verdict = next(line for line in zombie.lines if line.startswith("verdict"))
    assert verdict.startswith("verdict commit-failed"), verdict
    copied = Counter(r.value for r in _committed_records(log, sink))
    assert copied == Counter(str(i).encode() for i in range(100))
    assert sum(log.group_lag(group).values()) == 0


# Worker roles (run in subprocesses by the crash tests)


def _report(*fields: object) -> None:
    sys.stdout.write(" ".join(str(f) for f in fields) + "\n")
    sys.stdout.flush()


def copy(url: str, source: str, sink: str, group: str) -> None:
    """Copy ``source`` to ``sink`` forever, a transaction per poll; report each commit."""
    with riverbed.connect(url) as log:
        while True:  # a fenced member starts over from the group's committed offsets
            with (
                log.consumer(
                    group=group, topics=[source], from_beginning=True, session_timeout_ms=3000
                ) as consumer,
                log.transactional_producer(consumer) as producer,
            ):
                while True:
                    records = consumer.poll(max_records=50, timeout=0.5)
                    if not records:
                        continue
                    producer.begin_transaction()
                    producer.send_many(sink, [(r.key, r.value) for r in records])
                    producer.flush()  # the records are in the log, uncommitted, when
                    time.sleep(0.02)  # a kill lands here
                    try:
                        producer.commit_transaction(_next_offsets(records))
                    except riverbed.CommitFailedError:
                        _report("commit-failed")
                        break
                    _report("committed", len(records))


def zombie(url: str, source: str, sink: str, group: str, go_file: str) -> None:
    """Poll a batch and send it in a transaction; once ``go_file`` exists (the parent pauses us
    meanwhile), try to commit."""
    with riverbed.connect(url) as log:
        consumer = log.consumer(
            group=group, topics=[source], from_beginning=True, session_timeout_ms=3000
        )
        producer = log.transactional_producer(consumer)
        records: list[riverbed.Record] = []
        while not records:
            records = consumer.poll(max_records=10, timeout=0.5)
        producer.begin_transaction()
        producer.send_many(sink, [(r.key, r.value) for r in records])
        producer.flush()
        _report("sent", len(records))
        while not Path(go_file).exists():
            time.sleep(0.05)
        try:
            producer.commit_transaction(_next_offsets(records))
        except riverbed.CommitFailedError as error:
            _report("verdict commit-failed", str(error).replace("\n", " "))
        else:
            _report("verdict committed")
        producer.close()
        consumer.close()


if __name__ == "__main__":
    role, *arguments = sys.argv[1:]
    if role == "copy":
        copy(*arguments)
    elif role == "zombie":
        zombie(*arguments)
    else:
        raise SystemExit(f"unknown role {role!r}")
