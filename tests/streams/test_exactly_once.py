"""Exactly-once under crashes: two worker processes count per key and window while one of them
is SIGKILLed three times and restarted; the output holds every window exactly once, with the
exact count, on both backends."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import msgspec

import riverbed
from tests.streams.eos_app import WINDOW_S, build
from tests.support import wait_until

RECORDS = 100_000
KEYS = 50
FAR_FUTURE_MS = 10**12


def test_windowed_counts_survive_sigkill_exactly_once(
    log_url: str, topic_name: Callable[[str], str], tmp_path: Path
) -> None:
    name, source, target = topic_name("app"), topic_name("events"), topic_name("counts")
    state_dir = str(tmp_path / "state")
    # Event time is the value itself (ms): n falls into window n // 1000 of key n % 50. Then one
    # record per key far in the future closes every window of every partition.
    values = list(range(RECORDS)) + [FAR_FUTURE_MS + k for k in range(KEYS)]
    window_ms = WINDOW_S * 1000
    truth = Counter((f"k{n % KEYS}", n - n % window_ms) for n in range(RECORDS))

    with build(log_url, name, source, target, state_dir) as app:
        app.start()
        with app.log.producer() as producer:
            producer.send_many(source, [(None, str(v).encode()) for v in values])

    def worker() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.streams.eos_app",
                log_url,
                name,
                source,
                target,
                state_dir,
            ],
            cwd=Path(__file__).parents[2],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        )

    rng = random.Random(7)
    steady, victim = worker(), worker()
    try:
        for _ in range(3):
            time.sleep(rng.uniform(0.5, 2.5))
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            victim = worker()
        with (
            riverbed.connect(log_url) as log,
            log.consumer(topics=[target], from_beginning=True) as reader,
        ):
            decode = msgspec.json.Decoder(riverbed.Windowed[int]).decode
            seen: list[tuple[str, int, int]] = []

            def all_windows_arrived() -> bool:
                for record in reader.poll(max_records=10_000, timeout=0.5):
                    window = decode(record.value or b"")
                    seen.append(((record.key or b"").decode(), window.start_ms, window.value))
                return len(seen) >= len(truth)

            wait_until(all_windows_arrived, 240, f"{len(truth)} window results")
            time.sleep(1)  # anything more would be a duplicate
            all_windows_arrived()
    finally:
        for process in (steady, victim):
            process.send_signal(signal.SIGTERM)
        for process in (steady, victim):
            process.wait(30)
    results = Counter((key, start) for key, start, _ in seen)
    duplicates = [window for window, times in results.items() if times > 1]
    assert not duplicates, f"{len(duplicates)} windows emitted more than once: {duplicates[:5]}"
    assert {(key, start): n for key, start, n in seen} == dict(truth)
