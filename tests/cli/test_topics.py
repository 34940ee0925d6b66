from __future__ import annotations

import riverbed
from tests.cli.conftest import Run


def test_create_list_describe_delete(run: Run, url: str) -> None:
    created = run("topics", "create", "orders", "--partitions", "3")
    assert created.exit_code == 0, created.output
    assert created.stdout == "created topic orders with 3 partition(s)\n"
    run(
        "topics",
        "create",
        "users",
        "--compact",
        "--retention-ms",
        "3600000",
        "--retention-bytes",
        "1000",
        "--max-record-bytes",
        "5000",
    )
    with riverbed.connect(url) as log:
        users = log.topic("users")
    assert (users.compact, users.retention_ms, users.retention_bytes) == (True, 3_600_000, 1000)
    assert users.max_record_bytes == 5000

    listed = run("topics", "list")
    assert listed.exit_code == 0
    rows = [line for line in listed.stdout.splitlines() if "orders" in line or "users" in line]
    assert "3" in rows[0] and "no" in rows[0] and "forever" in rows[0]
    assert "yes" in rows[1] and "1h or 1,000 bytes" in rows[1]

    run("produce", "orders", "--partition", "1", input="a\nbb\n")
    described = run("topics", "describe", "orders")
    assert described.exit_code == 0
    assert "topic orders: 3 partition(s), compact no, retention forever" in described.stdout
    partition_1 = next(line for line in described.stdout.splitlines() if line.startswith("│ 1"))
    cells = [cell.strip() for cell in partition_1.strip("│").split("│")]
    assert cells[:4] == ["1", "0", "2", "2"]
    assert int(cells[4]) > 0

    deleted = run("topics", "delete", "orders")
    assert deleted.exit_code == 0
    assert deleted.stdout == "deleted topic orders\n"
    assert "orders" not in run("topics", "list").stdout


def test_invalid_partitions_is_a_usage_error(run: Run) -> None:
    for partitions in ("0", "-1", "many"):
        result = run("topics", "create", "orders", "--partitions", partitions)
        assert result.exit_code == 2
        assert "--partitions" in result.stderr
    assert run("topics", "create", "orders", "--retention-ms", "-5").exit_code == 2
