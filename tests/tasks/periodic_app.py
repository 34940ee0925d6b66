"""The app of the leader-lease test: a task every second, each run journaled with its tick."""

from __future__ import annotations

import os

import riverbed

app = riverbed.App("periodic")


@app.periodic(every=1.0)
def beat() -> None:
    context = riverbed.current_task()
    assert context is not None
    path = os.path.join(os.environ["TASKS_JOURNAL_DIR"], f"{os.getpid()}.log")
    with open(path, "a") as journal:
        journal.write(f"{context.scheduled_ms}\n")
