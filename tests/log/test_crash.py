"""Crash tests with real processes, on every backend.

SIGKILL a producer or a group member mid-stream; SIGSTOP a member until the group fences it.
"""

from __future__ import annotations

import signal
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

import riverbed
from tests.support import Worker, consume, take_over, wait_until

TopicName = Callable[[str], str]

pytestmark = pytest.mark.slow


def worker(*args: str) -> Worker:
    return Worker("tests.log.crash_worker", *args)


def test_killed_producer_leaves_whole_batches_and_keeps_acks(
    log: riverbed.Log, log_url: str, topic_name: TopicName, workers: list[Worker]
) -> None:
    name = topic_name()
    log.create_topic(name, partitions=3)
    producer = worker("produce", log_url, name, "1000000")
    workers.append(producer)
    producer.wait_for(lambda lines: sum(line.startswith("ack") for line in lines) >= 20_000)
    producer.signal(signal.SIGKILL)
    producer.stop()
    acked = {}
    for line in producer.lines:
        if line.startswith("ack"):
            _, seq, partition, offset = line.split()
            acked[int(partition), int(offset)] = int(seq)
    assert "done" not in producer.lines, "the producer finished before it was killed"

    stored = sum(log.end_offsets(name).values())
    with log.consumer(topics=[name], from_beginning=True) as consumer:
        records = consume(consumer, stored)
    by_partition: dict[int, list[int]] = defaultdict(list)
    for record in records:
        assert record.value is not None
        by_partition[record.partition].append(int(record.value))
        if (record.partition, record.offset) in acked:
            assert acked.pop((record.partition, record.offset)) == int(record.value)
    assert acked == {}, f"{len(acked)} acknowledged records are missing"
    # No hole and no torn batch: each partition holds exactly a prefix of what was sent to it.
    for partition, seqs in by_partition.items():
        assert seqs == list(range(partition, partition + 3 * len(seqs), 3))


Offset = tuple[int, int]


def _journal(path: Path) -> tuple[list[Offset], list[Offset], set[Offset]]:
    """A consumer's journal as (records covered by a later successful commit, records after the
    last one, records that may be delivered again)."""
    committed: list[Offset] = []
    pending: list[Offset] = []
    at_risk: set[Offset] = set()
    if not path.exists():
        return committed, pending, at_risk
    for line in path.read_text().splitlines():
        if line.startswith("record "):
            _, partition, offset = line.split()
            pending.append((int(partition), int(offset)))
        elif line == "commit":
            committed += pending
            pending = []
        elif line == "commit-failed":
            # Partitions that moved go to their new owner from the last commit; the ones kept are
            # committed by this member's next successful commit.
            at_risk.update(pending)
    return committed, pending, at_risk | set(pending)


def test_killed_member_hands_over_without_losing_commits(
    log: riverbed.Log,
    log_url: str,
    topic_name: TopicName,
    workers: list[Worker],
    tmp_path: Path,
) -> None:
    name = topic_name()
    group = topic_name("group")
    log.create_topic(name, partitions=4)
    total = 4000
    with log.producer() as producer:
        producer.send_many(name, [(f"k{i}".encode(), b"v") for i in range(total)])
    victim_journal, survivor_journal = tmp_path / "victim.log", tmp_path / "survivor.log"
    victim = worker("consume", log_url, name, group, str(victim_journal), "0.05")
    workers.append(victim)
    victim.wait_for(lambda lines: "ready" in lines)
    survivor = worker("consume", log_url, name, group, str(survivor_journal), "0.05")
    workers.append(survivor)

    def victim_committed_some() -> bool:
        return len(_journal(victim_journal)[0]) >= 200 and bool(_journal(survivor_journal)[0])

    wait_until(victim_committed_some, 120, "both members to commit")
    victim.signal(signal.SIGKILL)
    victim.stop()
    victim_done, victim_pending, victim_at_risk = _journal(victim_journal)

    def all_processed() -> bool:
        seen = set(victim_done) | set(victim_pending) | set(_journal(survivor_journal)[0])
        return len(seen) == total

    wait_until(all_processed, 120, "the survivor to take over the victim's partitions")
    wait_until(lambda: sum(log.group_lag(group).values()) == 0, 60, "lag 0")
    survivor_done, _, survivor_at_risk = _journal(survivor_journal)
    everything = victim_done + victim_pending + survivor_done
    duplicates = {r for r in everything if everything.count(r) > 1}
    # Only records polled but not yet committed (the victim's last batch, batches whose commit a
    # rebalance rejected) may be processed twice.
    allowed = victim_at_risk | survivor_at_risk
    assert duplicates <= allowed, sorted(duplicates - allowed)[:10]
    assert len(duplicates) <= 4 * 50  # at most one uncommitted batch per partition move


def test_paused_member_is_fenced(
    log: riverbed.Log,
    log_url: str,
    topic_name: TopicName,
    workers: list[Worker],
    tmp_path: Path,
) -> None:
    name = topic_name()
    group = topic_name("group")
    log.create_topic(name, partitions=2)
    with log.producer() as producer:
        producer.send_many(name, [(f"k{i}".encode(), b"v") for i in range(100)])
    go = tmp_path / "go"
    zombie = worker("fenced", log_url, name, group, str(go))
    workers.append(zombie)
    zombie.wait_for(lambda lines: any(line.startswith("polled") for line in lines))
    zombie.signal(signal.SIGSTOP)
    try:
        with log.consumer(
            group=group, topics=[name], from_beginning=True, session_timeout_ms=3000
        ) as successor:
            take_over(successor, partitions=2, records=100)
            successor.commit()
            committed = successor.committed()
    finally:
        go.touch()
        zombie.signal(signal.SIGCONT)
    zombie.wait_for(
        lambda lines: any(line.startswith(("commit-failed", "committed")) for line in lines)
    )
    verdict = next(line for line in zombie.lines if line.startswith(("commit-failed", "committed")))
    assert verdict.startswith("commit-failed"), verdict
    assert committed == {(name, 0): log.end_offsets(name)[0], (name, 1): log.end_offsets(name)[1]}
    assert log.group_lag(group) == {(name, 0): 0, (name, 1): 0}
