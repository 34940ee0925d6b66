"""``riverbed consume``: print records (``Consumer.poll``); in a group, commit each printed batch.

``--format json`` prints one object per line with topic, partition, offset, timestamp_ms, key, value
and headers. A key, value or header value that is valid UTF-8 is a JSON string; other bytes are an
object ``{"base64": "..."}``, so a string always means text and raw bytes are never mangled. A
missing key and a tombstone's value are ``null``.
"""

from __future__ import annotations

import base64
import contextlib
import signal
import sys
from collections.abc import Iterator
from enum import StrEnum
from typing import Annotated

import msgspec
import typer

from riverbed.cli.common import open_log
from riverbed.log.api import Record
from riverbed.log.errors import CommitFailedError
from riverbed.signals import handling

POLL_MAX_RECORDS = 1000

BytesJson = str | dict[str, str] | None


class Format(StrEnum):
    value = "value"
    json = "json"


def bytes_to_json(data: bytes | None) -> BytesJson:
    if data is None:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def record_to_json(record: Record) -> bytes:
    return msgspec.json.encode(
        {
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "timestamp_ms": record.timestamp_ms,
            "key": bytes_to_json(record.key),
            "value": bytes_to_json(record.value),
            "headers": {name: bytes_to_json(value) for name, value in record.headers.items()},
        }
    )


def format_records(records: list[Record], fmt: Format) -> str:
    if fmt is Format.json:
        lines = [record_to_json(r).decode() for r in records]
    else:
        # A tombstone prints as an empty line; --format json tells it from an empty value.
        lines = [(r.value or b"").decode(errors="replace") for r in records]
    return "".join(f"{line}\n" for line in lines)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM stops the command as Ctrl-C does: the consumer closes, leaving its group at once
    (its partitions go to the other members now, not after the session timeout)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    with handling((signal.SIGTERM,), interrupt):
        yield


def consume(
    ctx: typer.Context,
    topic: Annotated[str, typer.Argument(help="Topic to read.")],
    group: Annotated[
        str | None,
        typer.Option(help="Read as a member of this consumer group, committing as it prints."),
    ] = None,
    from_beginning: Annotated[
        bool,
        typer.Option(
            "--from-beginning",
            help="Start at the oldest record when there is no committed offset (else at the end).",
        ),
    ] = False,
    max_records: Annotated[
        int | None, typer.Option("--max", min=1, help="Stop after this many records.")
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=0, help="Stop when no record arrives for this many seconds.")
    ] = 5.0,
    fmt: Annotated[
        Format, typer.Option("--format", help="value: the value as text; json: the whole record.")
    ] = Format.value,
) -> None:
    """Print records of a topic (Consumer.poll) until --max records or --timeout seconds idle.

    --format json prints one object per line; a key, value or header that is not UTF-8 text is
    shown as {"base64": "..."}. With --group, each printed batch is committed.
    """
    printed = 0
    with (
        _sigterm_interrupts(),
        open_log(ctx) as log,
        log.consumer(group=group, topics=[topic], from_beginning=from_beginning) as consumer,
    ):
        while max_records is None or printed < max_records:
            # Never poll more than will be printed: a commit covers everything polled.
            wanted = POLL_MAX_RECORDS if max_records is None else max_records - printed
            records = consumer.poll(max_records=min(wanted, POLL_MAX_RECORDS), timeout=timeout)
            if not records:
                break
            sys.stdout.write(format_records(records, fmt))
            sys.stdout.flush()
            printed += len(records)
            if group is not None:
                # A failed commit means another member joined or left and took some of these
                # partitions: their records go to the new owner too (at least once), and the next
                # poll picks up the new assignment.
                with contextlib.suppress(CommitFailedError):
                    consumer.commit()
