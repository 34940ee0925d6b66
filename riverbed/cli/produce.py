"""``riverbed produce``: one record per input line, through ``Producer.send``.

The whole input is read and checked against the topic before the first record is sent, so a bad
line (not JSON with ``--key-field``, over the topic's record limit, keyless on a compacted topic)
sends nothing: the command is all or nothing for its input. This also gives the progress bar its
total. Empty lines are skipped; line numbers in errors count them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, BinaryIO

import typer
from rich.progress import Progress

from riverbed.cli.common import err, open_log, out
from riverbed.errors import RiverbedError
from riverbed.log.api import Log, RecordMetadata, SendFuture, TopicInfo, check_record
from riverbed.log.errors import RecordTooLargeError, UnknownPartitionError, UnknownTopicError

# Below this many records a progress bar would only flicker.
PROGRESS_MIN_RECORDS = 10_000
# Records between progress updates: per-record updates would cost more than the sends.
PROGRESS_STEP = 4096

# An input line's number, and the key and value of its record.
NumberedRecord = tuple[int, bytes | None, bytes]


class InvalidInputError(RiverbedError, ValueError):
    """An input line that cannot become a record."""


def key_of(line: bytes, number: int, field: str) -> bytes:
    """The key of a JSON-object line: its ``field``, a string as it is, anything else as JSON.

    JSON text rather than Python's ``str()`` for non-strings (``true``, not ``True``), so producers
    in any language derive the same key, hence the same partition, from the same document.
    """
    try:
        document = json.loads(line)
    except ValueError as error:
        detail = (
            f"{error.msg} at column {error.colno}"
            if isinstance(error, json.JSONDecodeError)
            else str(error)
        )
        raise InvalidInputError(f"line {number} is not JSON ({detail}); nothing was sent") from None
    if not isinstance(document, dict):
        raise InvalidInputError(
            f"line {number} is JSON but not an object, so it has no field '{field}'; "
            "nothing was sent"
        )
    if field not in document:
        raise InvalidInputError(f"line {number} has no field '{field}'; nothing was sent")
    value = document[field]
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text.encode()


def parse_lines(
    lines: Iterable[bytes], key: bytes | None, key_field: str | None
) -> list[NumberedRecord]:
    """``(line number, key, value)`` per non-empty line; the value is the line's bytes without
    its newline."""
    records: list[NumberedRecord] = []
    for number, raw in enumerate(lines, start=1):
        value = raw.rstrip(b"\n").rstrip(b"\r")
        if not value:
            continue
        records.append((number, key_of(value, number, key_field) if key_field else key, value))
    return records


def check_records(
    info: TopicInfo,
    records: Sequence[NumberedRecord],
    headers: dict[str, bytes],
    partition: int | None,
) -> None:
    """Raise for the first record the topic would refuse, before any is sent."""
    if partition is not None and partition >= info.partitions:
        raise UnknownPartitionError(info.name, partition, info.partitions)
    for number, key, value in records:
        try:
            check_record(info, key, value, headers)
        except RecordTooLargeError as error:
            raise InvalidInputError(
                f"line {number} makes a record of {error.size:,} bytes, over the "
                f"{error.limit:,}-byte limit of topic '{info.name}' (riverbed topics create "
                "--max-record-bytes); nothing was sent"
            ) from None
        except RiverbedError as error:
            raise InvalidInputError(f"line {number}: {error}; nothing was sent") from None


def parse_headers(pairs: Sequence[str]) -> dict[str, bytes]:
    headers: dict[str, bytes] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise typer.BadParameter(
                f"{pair!r} is not name=value, e.g. --header source=cli", param_hint="'--header'"
            )
        headers[name] = value.encode()
    return headers


def summarize(topic: str, written: Sequence[RecordMetadata]) -> str:
    """``produced 3 records to orders: partition 0 offsets 0-1, partition 2 offset 0``."""
    ranges: dict[int, tuple[int, int]] = {}
    for meta in written:
        low, high = ranges.get(meta.partition, (meta.offset, meta.offset))
        ranges[meta.partition] = (min(low, meta.offset), max(high, meta.offset))
    parts = [
        f"partition {p} offset {low}" if low == high else f"partition {p} offsets {low}-{high}"
        for p, (low, high) in sorted(ranges.items())
    ]
    noun = "record" if len(written) == 1 else "records"
    summary = f"produced {len(written)} {noun} to {topic}"
    return f"{summary}: {', '.join(parts)}" if parts else summary


def _read_input(file: Path | None) -> list[bytes]:
    if file is not None:
        with file.open("rb") as handle:
            return handle.readlines()
    stdin: BinaryIO = typer.get_binary_stream("stdin")
    return stdin.readlines()


def produce(
    ctx: typer.Context,
    topic: Annotated[str, typer.Argument(help="Topic to write to.")],
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Read lines from this file, not stdin.")
    ] = None,
    key: Annotated[str | None, typer.Option(help="The same key for every record.")] = None,
    key_field: Annotated[
        str | None,
        typer.Option(help="Lines are JSON objects; each record's key is this field's value."),
    ] = None,
    header: Annotated[
        list[str] | None,
        typer.Option("--header", "-H", help="name=value header on every record; repeatable."),
    ] = None,
    partition: Annotated[
        int | None, typer.Option(min=0, help="Write to this partition instead of by key.")
    ] = None,
) -> None:
    """Send one record per input line (Producer.send) and print the offsets written.

    The whole input is read and checked first: a line that --key-field cannot use, or that the
    topic would refuse (over its record limit), stops the command before anything is sent.
    Empty lines are skipped.
    """
    if key is not None and key_field is not None:
        raise typer.BadParameter("use --key or --key-field, not both", param_hint="'--key'")
    headers = parse_headers(header or [])
    records = parse_lines(_read_input(file), key.encode() if key is not None else None, key_field)
    with open_log(ctx) as log:
        info = {existing.name: existing for existing in log.list_topics()}.get(topic)
        if info is None:
            raise UnknownTopicError(topic)
        check_records(info, records, headers, partition)
        _send(log, topic, records, headers, partition)


def _send(
    log: Log,
    topic: str,
    records: Sequence[NumberedRecord],
    headers: dict[str, bytes],
    partition: int | None,
) -> None:
    with (
        log.producer() as producer,
        Progress(
            console=err,
            transient=True,
            # A transient bar off a terminal would leave blank lines behind.
            disable=len(records) < PROGRESS_MIN_RECORDS or not err.is_terminal,
        ) as bar,
    ):
        task = bar.add_task(f"producing to {topic}", total=len(records))
        futures: list[SendFuture] = []
        try:
            for index, (_, record_key, value) in enumerate(records, start=1):
                futures.append(
                    producer.send(
                        topic, value, key=record_key, headers=headers, partition=partition
                    )
                )
                if index % PROGRESS_STEP == 0:
                    bar.update(task, completed=index)
            producer.flush()
        except KeyboardInterrupt:
            bar.stop()
            # What was sent is written (the producer flushes as it closes): say how far it got.
            producer.flush()
            written = [future.result() for future in futures]
            rest = f"line {records[len(futures)][0]} on" if len(futures) < len(records) else "none"
            err.print(f"interrupted: {summarize(topic, written)}; not sent: {rest}")
            raise
        written = [future.result() for future in futures]
    out.print(summarize(topic, written))
