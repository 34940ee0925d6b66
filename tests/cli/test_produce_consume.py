from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import riverbed
from riverbed.log.partitioner import partition_for_key
from riverbed.log.sqlite.producer import SqliteProducer
from tests.cli.conftest import Run
from tests.support import wait_until


def consume_json(run: Run, *args: str) -> list[dict[str, object]]:
    result = run(
        "consume", "orders", "--from-beginning", "--timeout", "0.2", "--format", "json", *args
    )
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_round_trip_with_key_field_and_headers(run: Run) -> None:
    run("topics", "create", "orders", "--partitions", "4")
    lines = ['{"id": "a", "n": 1}', '{"id": 7, "n": 2}', "", '{"id": "a", "n": 3}']
    produced = run(
        "produce",
        "orders",
        "--key-field",
        "id",
        "--header",
        "source=cli",
        "-H",
        "v=2",
        input="\n".join(lines) + "\n",
    )
    assert produced.exit_code == 0, produced.output
    pa, p7 = partition_for_key(b"a", 4), partition_for_key(b"7", 4)
    assert pa != p7
    ranges = sorted([(pa, f"partition {pa} offsets 0-1"), (p7, f"partition {p7} offset 0")])
    expected = "produced 3 records to orders: " + ", ".join(text for _, text in ranges)
    assert produced.stdout == expected + "\n"

    records = consume_json(run)
    assert sorted((r["key"], r["value"]) for r in records) == [
        ("7", '{"id": 7, "n": 2}'),
        ("a", '{"id": "a", "n": 1}'),
        ("a", '{"id": "a", "n": 3}'),
    ]
    for record in records:
        assert set(record) == {
            "topic",
            "partition",
            "offset",
            "timestamp_ms",
            "key",
            "value",
            "headers",
        }
        assert record["topic"] == "orders"
        assert record["partition"] == (pa if record["key"] == "a" else p7)
        assert record["headers"] == {"source": "cli", "v": "2"}
        assert isinstance(record["timestamp_ms"], int)


def test_same_key_partition_and_value_format(run: Run, tmp_path: Path) -> None:
    run("topics", "create", "orders", "--partitions", "3")
    source = tmp_path / "lines.txt"
    source.write_bytes(b"first\r\nsecond\nthird")
    produced = run("produce", "orders", "--file", str(source), "--key", "k", "--partition", "2")
    assert produced.stdout == "produced 3 records to orders: partition 2 offsets 0-2\n"
    consumed = run("consume", "orders", "--from-beginning", "--timeout", "0.2")
    assert consumed.stdout == "first\nsecond\nthird\n"
    assert {r["key"] for r in consume_json(run)} == {"k"}


def test_bytes_that_are_not_utf8_are_base64(run: Run, tmp_path: Path) -> None:
    run("topics", "create", "orders")
    source = tmp_path / "raw.bin"
    source.write_bytes(b"ok\n\xff\xfe\n")
    run("produce", "orders", "--file", str(source))
    records = consume_json(run)
    assert [r["value"] for r in records] == [
        "ok",
        {"base64": base64.b64encode(b"\xff\xfe").decode()},
    ]
    assert records[0]["key"] is None
    value_format = run("consume", "orders", "--from-beginning", "--timeout", "0.2")
    assert value_format.stdout == "ok\n\ufffd\ufffd\n"


def test_bad_key_field_line_sends_nothing(run: Run, url: str) -> None:
    run("topics", "create", "orders", "--partitions", "2")
    for lines, fragment in (
        ('{"id": 1}\nnot json\n{"id": 2}\n', "line 2 is not JSON"),
        ('{"id": 1}\n\n{"other": 2}\n', "line 3 has no field 'id'"),
        ('{"id": 1}\n[1, 2]\n', "line 2 is JSON but not an object"),
    ):
        result = run("produce", "orders", "--key-field", "id", input=lines)
        assert result.exit_code == 1
        assert result.stderr.count("\n") == 1
        assert result.stderr.startswith(f"error: {fragment}")
        assert "nothing was sent" in result.stderr
    with riverbed.connect(url) as log:
        assert log.end_offsets("orders") == {0: 0, 1: 0}


def test_a_line_the_topic_refuses_sends_nothing(run: Run, url: str) -> None:
    run("topics", "create", "small", "--max-record-bytes", "100")
    result = run("produce", "small", input=f"first\nsecond\n{'x' * 200}\nfourth\n")
    assert result.exit_code == 1
    assert result.stderr == (
        "error: line 3 makes a record of 200 bytes, over the 100-byte limit of topic 'small' "
        "(riverbed topics create --max-record-bytes); nothing was sent\n"
    )
    run("topics", "create", "latest", "--compact")
    result = run("produce", "latest", input="first\n")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: line 1: topic 'latest' is compacted")
    result = run("produce", "small", "--partition", "3", input="first\n")
    assert result.stderr.startswith("error: topic 'small' has no partition 3")
    result = run("produce", "missing", input="")  # even with nothing to send
    assert result.exit_code == 1 and "topic 'missing' does not exist" in result.stderr
    with riverbed.connect(url) as log:
        assert log.end_offsets("small") == {0: 0}
        assert log.end_offsets("latest") == {0: 0}


def test_max_and_timeout(run: Run) -> None:
    run("topics", "create", "orders")
    run("produce", "orders", input="".join(f"{i}\n" for i in range(10)))
    assert run("consume", "orders", "--from-beginning", "--max", "3").stdout == "0\n1\n2\n"
    # Without --from-beginning and without a group, reading starts at the end: nothing new.
    assert run("consume", "orders", "--timeout", "0.1").stdout == ""


def test_group_commits_what_it_printed(run: Run, url: str) -> None:
    run("topics", "create", "orders", "--partitions", "2")
    run("produce", "orders", "--partition", "0", input="a\nb\nc\n")
    run("produce", "orders", "--partition", "1", input="d\n")

    first = run("consume", "orders", "--group", "billing", "--from-beginning", "--max", "2")
    assert first.stdout.splitlines() == ["a", "b"]
    with riverbed.connect(url) as log:
        assert sum(log.group_lag("billing").values()) == 2

    rest = run("consume", "orders", "--group", "billing", "--timeout", "0.2")
    assert sorted(rest.stdout.splitlines()) == ["c", "d"]
    again = run("consume", "orders", "--group", "billing", "--from-beginning", "--timeout", "0.2")
    assert again.stdout == ""

    assert run("groups", "list").stdout == "billing\n"
    described = run("groups", "describe", "billing")
    assert described.exit_code == 0
    assert "group billing: Empty" in described.stdout
    assert "total lag 0" in described.stdout
    rows = [line for line in described.stdout.splitlines() if line.startswith("│ orders")]
    assert [[c.strip() for c in row.strip("│").split("│")] for row in rows] == [
        ["orders", "0", "3", "3", "0"],
        ["orders", "1", "1", "1", "0"],
    ]


def test_groups_describe_shows_live_members(run: Run, url: str) -> None:
    run("topics", "create", "orders", "--partitions", "2")
    with (
        riverbed.connect(url) as log,
        log.consumer(group="live", topics=["orders"]) as consumer,
    ):
        consumer.poll(timeout=0)
        described = run("groups", "describe", "live")
        listed = run("groups", "list")
    assert "1 member(s)" in described.stdout
    assert "orders[0], orders[1]" in described.stdout
    assert listed.stdout == "live\n"


def test_sigterm_stops_consume_as_ctrl_c_does_leaving_its_group(url: str) -> None:
    with riverbed.connect(url) as log:
        log.create_topic("orders")
    riverbed_command = str(Path(sys.executable).with_name("riverbed"))
    consumer = subprocess.Popen(
        [riverbed_command, "--url", url, "consume", "orders", "--group", "g", "--timeout", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with riverbed.connect(url) as log:
            wait_until(lambda: _members(log, "g") == 1, 30, "the consumer to join its group")
            consumer.send_signal(signal.SIGTERM)
            _, stderr = consumer.communicate(timeout=30)
            assert _members(log, "g") == 0  # left at once, not at the session timeout
    finally:
        if consumer.poll() is None:
            consumer.kill()
    assert consumer.returncode == 130
    assert "Traceback" not in stderr


def _members(log: riverbed.Log, group: str) -> int:
    try:
        return len(log.describe_group(group).members)
    except riverbed.UnknownGroupError:  # not created yet
        return 0


def test_an_interrupted_produce_says_what_it_wrote_and_where_it_stopped(
    run: Run, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with riverbed.connect(url) as log:
        log.create_topic("orders", partitions=1)
    send = SqliteProducer.send
    sent = 0

    def interrupted_at_the_fourth(self: SqliteProducer, *args: Any, **kwargs: Any) -> Any:
        nonlocal sent
        sent += 1
        if sent == 4:
            raise KeyboardInterrupt
        return send(self, *args, **kwargs)

    monkeypatch.setattr(SqliteProducer, "send", interrupted_at_the_fourth)
    result = run("produce", "orders", input="a\nb\n\nc\nd\ne\n")
    assert result.exit_code == 130
    assert (
        "interrupted: produced 3 records to orders: partition 0 offsets 0-2; not sent: line 5 on"
        in " ".join(result.stderr.split())
    )
    with riverbed.connect(url) as log:
        assert log.end_offsets("orders") == {0: 3}
