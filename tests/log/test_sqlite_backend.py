"""What only the embedded backend has: its URLs, its file, and several processes sharing it."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import riverbed
from riverbed.log.api import TopicPartition
from riverbed.log.sqlite import SqliteLog
from tests.support import consume

ROOT = Path(__file__).resolve().parents[2]


def test_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with riverbed.connect() as log:
        assert isinstance(log, SqliteLog)
        assert log.path == Path(".riverbed/log.db")
    assert (tmp_path / ".riverbed" / "log.db").exists()
    with riverbed.connect("sqlite:///relative/x.db?fsync=always") as log:
        assert isinstance(log, SqliteLog) and log.path == Path("relative/x.db")
    with riverbed.connect(f"sqlite:///{tmp_path}/abs.db") as log:
        assert isinstance(log, SqliteLog) and log.path == tmp_path / "abs.db"
    monkeypatch.setenv("RIVERBED_URL", "sqlite:///from-env.db")
    with riverbed.connect() as log:
        assert isinstance(log, SqliteLog) and log.path == Path("from-env.db")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://localhost/db", "unsupported URL scheme 'mysql'"),
        ("just-a-path.db", "expected sqlite:// or kafka://"),
        ("sqlite://host/x.db", "a sqlite URL has no host"),
        ("sqlite:///x.db?fsync=sometimes", "invalid fsync='sometimes'"),
        ("sqlite:///x.db?journal=off", "unknown option 'journal'"),
        ("sqlite:///x.db?fsync=always&fsync=normal", "option 'fsync' is given twice"),
        ("postgres+psycopg://u:s3cret@db/x", r"'postgres\+psycopg://u:\*\*\*@db/x'"),
        ("sqlite:///", "names no database file"),
        ("kafka://", "names no host"),
        ("kafka://localhost:notaport", "'localhost:notaport' is not host:port"),
        ("kafka://h1:9092,h2:99999", "'h2:99999' is not host:port"),
        ("kafka://h1:9092,", "'' is not host:port"),
    ],
)
def test_bad_urls(url: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(riverbed.InvalidUrlError, match=message):
        riverbed.connect(url)


def test_durable_mode_round_trip(tmp_path: Path) -> None:
    with riverbed.connect(f"sqlite:///{tmp_path}/x.db?fsync=always") as log:
        log.create_topic("t")
        with log.producer() as producer:
            producer.send_many("t", [(None, b"v")] * 10)
    with riverbed.connect(f"sqlite:///{tmp_path}/x.db") as log:
        assert log.end_offsets("t") == {0: 10}


def test_not_a_log_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are not the droids you are looking for" * 100)
    with pytest.raises(riverbed.CorruptLogError, match="damaged or not a riverbed log"):
        riverbed.connect(f"sqlite:///{path}")


def _filled_log(path: Path, records: int = 20_000) -> None:
    with riverbed.connect(f"sqlite:///{path}") as log:
        log.create_topic("t", partitions=2)
        with log.producer() as producer:
            producer.send_many(
                "t", [(None, f"MARKER-{i:08d}".encode() + b"x" * 400) for i in range(records)]
            )


def _read_everything(path: Path) -> list[riverbed.Record]:
    with riverbed.connect(f"sqlite:///{path}") as log:
        total = sum(log.end_offsets("t").values())
        with log.consumer(topics=["t"], from_beginning=True) as consumer:
            return consume(consumer, total, timeout=10)


def test_truncated_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    _filled_log(path)
    assert not (tmp_path / "log.db-wal").exists() or (tmp_path / "log.db-wal").stat().st_size == 0
    with path.open("r+b") as file:
        file.truncate(path.stat().st_size // 2)
    with pytest.raises(riverbed.CorruptLogError, match="damaged"):
        _read_everything(path)


def test_corrupted_payload_is_reported_not_returned(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    _filled_log(path)
    data = bytearray(path.read_bytes())
    where = data.index(b"MARKER-00012345")
    data[where + 8] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(riverbed.CorruptLogError, match="failed its CRC check"):
        _read_everything(path)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    riverbed.connect(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version=99")
    with pytest.raises(riverbed.CorruptLogError, match="schema version 99"):
        riverbed.connect(f"sqlite:///{path}")


PRODUCE_SCRIPT = """
import sys, riverbed
url, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with riverbed.connect(url) as log, log.producer(linger_ms=1) as producer:
    for i in range(count):
        producer.send("shared", f"{name}:{i}".encode(), key=name.encode())
"""


def _open_at_once(url: str, barrier: Any, outcomes: Any) -> None:
    barrier.wait()
    try:
        riverbed.connect(url).close()
        outcomes.put("opened")
    except Exception as error:
        outcomes.put(f"{type(error).__name__}: {error}")


def test_processes_creating_one_log_file_at_once_all_open_it(tmp_path: Path) -> None:
    # As `riverbed worker --processes N` does on a new log: whichever switches the file to WAL,
    # the others wait for it instead of failing on its lock.
    context = multiprocessing.get_context("fork")
    for attempt in range(12):
        url, processes = f"sqlite:///{tmp_path}/log-{attempt}.db", 6
        barrier, outcomes = context.Barrier(processes), context.Queue()
        children = [
            context.Process(target=_open_at_once, args=(url, barrier, outcomes))
            for _ in range(processes)
        ]
        for child in children:
            child.start()
        results = [outcomes.get(timeout=60) for _ in children]
        for child in children:
            child.join(60)
        assert results == ["opened"] * processes


def test_several_producer_processes_share_one_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/log.db"
    with riverbed.connect(url) as log:
        log.create_topic("shared", partitions=4)
        with log.consumer(topics=["shared"], from_beginning=True) as consumer:
            names = [f"p{i}" for i in range(3)]
            processes = [
                subprocess.Popen(
                    [sys.executable, "-c", PRODUCE_SCRIPT, url, name, "5000"],
                    cwd=ROOT,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                )
                for name in names
            ]
            # Read while they write: the consumer is woken by other processes' commits.
            records = consume(consumer, 15_000, timeout=120)
            assert all(process.wait(60) == 0 for process in processes)
    per_producer: dict[str, list[int]] = {name: [] for name in names}
    for record in records:
        assert record.value is not None
        name, seq = record.value.decode().split(":")
        per_producer[name].append(int(seq))
    assert all(seqs == list(range(5000)) for seqs in per_producer.values())


def test_a_batch_committed_while_a_consumer_reads_is_not_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/log.db"
    log = riverbed.connect(url)
    log.create_topic("t", partitions=1)
    other = riverbed.connect(url)  # another process's producer
    consumer = log.consumer(group="g", topics=["t"], from_beginning=True)
    assert consumer.poll(timeout=0.1) == []
    bounds = consumer._partition_bounds  # type: ignore[attr-defined]

    def committing_first(tp: tuple[str, int]) -> tuple[int, int]:
        # The producer commits between the consumer's read of the batches and of the bounds.
        if not sent:
            with other.producer() as producer:
                producer.send("t", b"raced")
            sent.append(True)
        return bounds(tp)  # type: ignore[no-any-return]

    sent: list[bool] = []

    monkeypatch.setattr(consumer, "_partition_bounds", committing_first)
    records = consumer.poll(timeout=0.1)
    monkeypatch.undo()
    records += consumer.poll(timeout=0.1)
    assert [r.value for r in records] == [b"raced"]  # it jumped past it to the end
    assert consumer.position("t", 0) == 1
    consumer.close()
    other.close()
    log.close()


def test_a_consumer_whose_topic_was_deleted_is_told_so(tmp_path: Path) -> None:
    with riverbed.connect(f"sqlite:///{tmp_path}/x.db") as log:
        log.create_topic("t")
        with log.producer() as producer:
            producer.send("t", b"a")
        for group in (None, "g"):
            with log.consumer(group=group, topics=["t"], from_beginning=True) as consumer:
                assert [record.value for record in consumer.poll(timeout=5)] == [b"a"]
                log.delete_topic("t")
                with pytest.raises(riverbed.UnknownTopicError, match="topic 't' does not exist"):
                    consumer.poll(timeout=0.5)
            log.create_topic("t")
            with log.producer() as producer:
                producer.send("t", b"a")


def test_a_member_whose_session_expired_loses_its_partitions_even_when_given_them_back(
    tmp_path: Path,
) -> None:
    """As librdkafka's lost partitions: another member may have owned them in between, so what
    the fenced member holds for them (a pipeline's state) must go, and be taken afresh."""
    from riverbed.log.sqlite import groups

    events: list[tuple[str, list[TopicPartition]]] = []
    log = riverbed.connect(f"sqlite:///{tmp_path}/x.db")
    assert isinstance(log, SqliteLog)
    log.create_topic("t", partitions=2)
    with (
        log,
        log.consumer(
            group="g",
            topics=["t"],
            session_timeout_ms=1000,
            on_assign=lambda tps: events.append(("assigned", sorted(tps))),
            on_revoke=lambda tps: events.append(("lost", sorted(tps))),
        ) as consumer,
    ):
        consumer.poll(timeout=0.5)
        evictor = log.db.connect()
        groups.leave(evictor, "g", consumer.member_id)  # as a paused member's expiry does
        evictor.close()
        time.sleep(0.5)  # its next heartbeat finds it gone
        consumer.poll(timeout=0.5)  # it rejoins, alone: the same partitions come back
    both = [("t", 0), ("t", 1)]
    assert events[:3] == [("assigned", both), ("lost", both), ("assigned", both)]


def test_a_member_that_fails_while_joining_leaves_its_group_at_once(tmp_path: Path) -> None:
    """Ctrl-C, SIGTERM or a failing on_assign after the join but before the consumer reaches its
    caller: nobody can close it, so it must leave, not hold the group for a session timeout."""

    def interrupted(partitions: set[TopicPartition]) -> None:
        raise KeyboardInterrupt

    with riverbed.connect(f"sqlite:///{tmp_path}/x.db") as log:
        log.create_topic("t")
        with pytest.raises(KeyboardInterrupt):
            log.consumer(group="g", topics=["t"], session_timeout_ms=60_000, on_assign=interrupted)
        with pytest.raises(riverbed.UnknownGroupError):  # no members, no offsets: no group
            log.describe_group("g")


def test_connect_without_create_refuses_a_missing_file_and_makes_none(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/typo.db"
    with pytest.raises(riverbed.NoLogError, match=r"no log at '.*typo.db': the file does not"):
        riverbed.connect(url, create=False)
    assert list(tmp_path.iterdir()) == []
    riverbed.connect(url).close()  # makes it
    with riverbed.connect(url, create=False) as log:
        assert log.list_topics() == []
