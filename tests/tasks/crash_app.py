"""The app the task crash tests run in worker subprocesses (``riverbed tasks worker``).

Each task execution is journaled to ``$TASKS_JOURNAL_DIR/<pid>.log`` ("start i" / "end i"), so a
test can tell which process ran a task, and how many times."""

from __future__ import annotations

import functools
import os
import time
from typing import TextIO

import riverbed

app = riverbed.App("crash")


@functools.cache
def journal_file(pid: int) -> TextIO:
    directory = os.environ.get("TASKS_JOURNAL_DIR", ".")
    return open(os.path.join(directory, f"{pid}.log"), "a", buffering=1)


def journal(line: str) -> None:
    journal_file(os.getpid()).write(line + "\n")


@app.task
def work(i: int) -> int:
    journal(f"start {i}")
    time.sleep(0.002)
    journal(f"end {i}")
    return i * 2


@app.task
def slow(seconds: float) -> str:
    journal("start slow")
    time.sleep(seconds)
    journal("end slow")
    return "done"
