"""Random ids: version-4 UUIDs, unique across batches, threads and forked processes; and
time-ordered ones (version 7) for aggregates."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid

from riverbed.ids import BATCH, random_id, random_ids, time_ordered_id


def test_ids_are_version_4_uuids_in_hex() -> None:
    for text in random_ids(3 * BATCH + 7):
        parsed = uuid.UUID(hex=text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and parsed.hex == text
    assert random_ids(0) == []
    assert len(random_id()) == 32


def test_ids_do_not_repeat_across_batches_and_threads() -> None:
    taken: list[list[str]] = []

    def take() -> None:
        taken.append([random_id() for _ in range(2 * BATCH)] + random_ids(BATCH + 1))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [text for ids in taken for text in ids]
    assert len(set(every)) == len(every) == 4 * (3 * BATCH + 1)


def _ids_in_child(queue: multiprocessing.Queue[list[str]]) -> None:
    queue.put(random_ids(10))


def test_a_forked_child_does_not_hand_out_its_parents_spare_ids() -> None:
    random_id()  # the parent now holds spare ids
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[list[str]] = context.Queue()
    child = context.Process(target=_ids_in_child, args=(queue,))
    child.start()
    from_child = queue.get(timeout=30)
    child.join(30)
    assert not set(from_child) & set(random_ids(10))


def test_time_ordered_ids_are_version_7_uuids_that_sort_by_their_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    earlier = [time_ordered_id() for _ in range(BATCH)]
    time.sleep(0.002)
    later = [time_ordered_id() for _ in range(BATCH)]
    after = time.time_ns() // 1_000_000
    for text in earlier + later:
        parsed = uuid.UUID(hex=text)
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122 and parsed.hex == text
        assert before <= int(text[:12], 16) <= after
    assert max(earlier) < min(later)
    assert len(set(earlier + later)) == 2 * BATCH
