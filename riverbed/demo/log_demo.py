"""The log demo: produce to a fresh 4-partition topic, consume it with a two-member group.

Shows the log's throughput on this machine and the group protocol at work: both members share the
partitions, commit as they go, and the group's lag ends at 0.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import msgspec
from rich.console import Console
from rich.progress import Progress

from riverbed.errors import RiverbedError
from riverbed.log import Consumer, Log, connect
from riverbed.log.errors import CommitFailedError

PARTITIONS = 4
MEMBERS = 2
CHUNK = 10_000
CUSTOMERS = 1000
POLL_MAX_RECORDS = 5000
# How often the main thread reads the group's lag to update progress and to see that it is done.
LAG_CHECK_S = 0.05
# No committed progress for this long means something is wrong: fail instead of hanging.
STALL_S = 30.0
ORDER = b'{"order_id":%d,"customer":"%s","amount_cents":%d,"currency":"EUR","status":"placed"}'


class DemoResult(msgspec.Struct, frozen=True):
    topic: str
    group: str
    records: int
    produce_seconds: float
    consume_seconds: float
    member_records: dict[str, int]
    final_lag: int

    @property
    def produce_rate(self) -> float:
        return self.records / self.produce_seconds

    @property
    def consume_rate(self) -> float:
        return self.records / self.consume_seconds


def order_chunks(count: int) -> Iterator[list[tuple[bytes | None, bytes | None]]]:
    """``(key, value)`` chunks of ~100-byte JSON orders, keyed by customer."""
    # Built with bytes formatting from ready keys: the generator is timed as part of producing.
    customers = [f"customer-{c:04d}".encode() for c in range(CUSTOMERS)]
    for start in range(0, count, CHUNK):
        chunk: list[tuple[bytes | None, bytes | None]] = []
        for order in range(start, min(start + CHUNK, count)):
            customer = customers[order % CUSTOMERS]
            value = ORDER % (order, customer, (order * 7919) % 100_000)
            chunk.append((customer, value))
        yield chunk


def _produce(log: Log, topic: str, records: int, progress: Progress) -> float:
    task = progress.add_task("producing", total=records)
    started = time.perf_counter()
    with log.producer() as producer:
        for chunk in order_chunks(records):
            producer.send_many(topic, chunk)
            progress.advance(task, len(chunk))
        producer.flush()
    return time.perf_counter() - started


class _Member(threading.Thread):
    """One group member: polls and commits until told to stop."""

    def __init__(self, consumer: Consumer, name: str, stop: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self.consumer = consumer
        self.stop = stop
        self.received = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                records = self.consumer.poll(max_records=POLL_MAX_RECORDS, timeout=0.1)
                if not records:
                    continue
                self.received += len(records)
                try:
                    self.consumer.commit()
                except CommitFailedError:
                    # The group rebalanced under us (the other member joined or left): the new
                    # owner reads those records again from the last commit. Expected; poll again.
                    continue
        except BaseException as error:
            self.error = error
            self.stop.set()


def _consume(
    log: Log, topic: str, group: str, records: int, progress: Progress
) -> tuple[float, dict[str, int]]:
    task = progress.add_task("consuming", total=records)
    stop = threading.Event()
    consumers = [
        log.consumer(group=group, topics=[topic], from_beginning=True) for _ in range(MEMBERS)
    ]
    members = [_Member(c, f"member-{i + 1}", stop) for i, c in enumerate(consumers)]
    started = time.perf_counter()
    try:
        for member in members:
            member.start()
        done, last_change = 0, time.monotonic()
        while not stop.wait(LAG_CHECK_S):
            # Partitions without a committed offset count whole, so this is 0 only when done.
            now_done = records - sum(log.group_lag(group).values())
            if now_done != done:
                done, last_change = now_done, time.monotonic()
                progress.update(task, completed=done)
            if done == records:
                break
            if time.monotonic() - last_change > STALL_S:
                raise RiverbedError(
                    f"demo stalled: group '{group}' committed nothing for {STALL_S:.0f} s"
                )
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        for member in members:
            member.join()
        for consumer in consumers:
            consumer.close()
    for member in members:
        if member.error is not None:
            raise member.error
    return elapsed, {member.name: member.received for member in members}


def _progress(console: Console) -> Progress:
    # Only on a terminal: elsewhere (a pipe, a CI log) a transient bar leaves blank lines behind.
    return Progress(console=console, transient=True, disable=not console.is_terminal)


def run_log_demo(url: str | None, records: int, console: Console) -> DemoResult:
    """Run the demo on the log at ``url`` (None: ``$RIVERBED_URL`` or the embedded default)."""
    if records < 1:
        raise ValueError(f"records must be >= 1, got {records}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # The suffix keeps two demos started in the same second apart.
    topic = f"demo-orders-{stamp}-{uuid.uuid4().hex[:6]}"
    group = f"{topic}-billing"
    with connect(url) as log:
        log.create_topic(topic, partitions=PARTITIONS)
        console.print(f"log {log.url}: topic {topic} with {PARTITIONS} partitions")
        with _progress(console) as progress:
            produce_seconds = _produce(log, topic, records, progress)
        console.print(
            f"produced {records:,} records in {produce_seconds:.2f} s: "
            f"{records / produce_seconds:,.0f} records/s"
        )
        with _progress(console) as progress:
            consume_seconds, member_records = _consume(log, topic, group, records, progress)
        final_lag = sum(log.group_lag(group).values())
    result = DemoResult(
        topic, group, records, produce_seconds, consume_seconds, member_records, final_lag
    )
    console.print(
        f"consumed {records:,} records with group {group} of {MEMBERS} members in "
        f"{consume_seconds:.2f} s: {result.consume_rate:,.0f} records/s"
    )
    for name, count in member_records.items():
        console.print(f"  {name} received {count:,} records")
    console.print(f"final lag of group {group}: {final_lag}")
    console.print(
        f"inspect with: riverbed groups describe {group}; "
        f"clean up with: riverbed topics delete {topic}"
    )
    return result
