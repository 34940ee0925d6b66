"""Subprocess roles for the crash tests: run with ``python -m tests.log.crash_worker ROLE ...``.

Every role reports what it did on stdout, one flushed line per event, so that the parent knows
exactly what was acknowledged or committed at the moment it sends SIGKILL or SIGSTOP.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import riverbed

_print_lock = threading.Lock()


def report(*fields: object) -> None:
    with _print_lock:
        sys.stdout.write(" ".join(str(f) for f in fields) + "\n")
        sys.stdout.flush()


def produce(url: str, topic: str, count: int) -> None:
    """Send records 0..count-1 round robin over the partitions; report each acknowledgement."""
    with riverbed.connect(url) as log:
        partitions = log.topic(topic).partitions
        producer = log.producer(linger_ms=2)
        report("ready")
        for seq in range(count):
            future = producer.send(topic, str(seq).encode(), partition=seq % partitions)
            future.add_done_callback(
                lambda f, seq=seq: report("ack", seq, f.result().partition, f.result().offset)
            )
            if seq % 100 == 0:
                time.sleep(0.001)  # keep the stream going long enough to be killed mid-way
        producer.close()
        report("done")


def consume(url: str, topic: str, group: str, out: str, pause_s: float) -> None:
    """Consume in ``group``, logging each record and each successful commit to ``out``."""
    with riverbed.connect(url) as log, open(out, "a", buffering=1) as journal:
        consumer = log.consumer(
            group=group, topics=[topic], from_beginning=True, session_timeout_ms=3000
        )
        report("ready")
        while True:
            records = consumer.poll(max_records=50, timeout=0.5)
            for record in records:
                journal.write(f"record {record.partition} {record.offset}\n")
            if records:
                time.sleep(pause_s)  # "processing": a kill lands mid-batch
                try:
                    consumer.commit()
                except riverbed.CommitFailedError:
                    journal.write("commit-failed\n")
                    continue
                journal.write("commit\n")


def fenced(url: str, topic: str, group: str, go_file: str) -> None:
    """Poll one batch, wait for ``go_file`` (the parent pauses us meanwhile), then try to commit."""
    with riverbed.connect(url) as log:
        consumer = log.consumer(
            group=group, topics=[topic], from_beginning=True, session_timeout_ms=3000
        )
        records: list[riverbed.Record] = []
        while not records:
            records = consumer.poll(max_records=10, timeout=0.5)
        report("polled", len(records))
        while not Path(go_file).exists():
            time.sleep(0.05)
        try:
            consumer.commit()
        except riverbed.CommitFailedError as error:
            report("commit-failed", str(error).replace("\n", " "))
        else:
            report("committed")
        consumer.close()


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    if role == "produce":
        produce(args[0], args[1], int(args[2]))
    elif role == "consume":
        consume(args[0], args[1], args[2], args[3], float(args[4]))
    elif role == "fenced":
        fenced(args[0], args[1], args[2], args[3])
    else:
        raise SystemExit(f"unknown role {role!r}")
