from __future__ import annotations

import io
import re

from rich.console import Console

import riverbed
from riverbed.demo import run_log_demo
from tests.cli.conftest import Run


def test_demo_command_reaches_lag_0_with_both_members(run: Run) -> None:
    result = run("demo", "--records", "20000")
    assert result.exit_code == 0, result.output
    assert re.search(r"produced 20,000 records in [\d.]+ s: [\d,]+ records/s", result.stdout)
    assert re.search(r"consumed 20,000 records with group \S+ of 2 members", result.stdout)
    received = re.findall(r"member-\d received ([\d,]+) records", result.stdout)
    assert len(received) == 2
    counts = [int(count.replace(",", "")) for count in received]
    assert all(count > 0 for count in counts)
    assert sum(counts) >= 20_000
    assert re.search(r"final lag of group \S+: 0\n", result.stdout)


def test_run_log_demo(url: str) -> None:
    output = io.StringIO()
    result = run_log_demo(url, 5000, Console(file=output))
    assert result.final_lag == 0
    assert len(result.member_records) == 2
    assert all(count > 0 for count in result.member_records.values())
    with riverbed.connect(url) as log:
        assert sum(log.end_offsets(result.topic).values()) == 5000
        assert log.topic(result.topic).partitions == 4
        assert sum(log.group_lag(result.group).values()) == 0
    assert f"final lag of group {result.group}: 0" in output.getvalue()
