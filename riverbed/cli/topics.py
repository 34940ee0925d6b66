"""``riverbed topics``: create, list, describe and delete topics (``Log.create_topic`` etc.)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from riverbed.cli.common import open_log, out
from riverbed.log.api import DEFAULT_DELETE_RETENTION_MS, DEFAULT_MAX_RECORD_BYTES, TopicInfo

app = typer.Typer(help="Create, list, describe and delete topics.", no_args_is_help=True)

_UNITS_MS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000))


def format_ms(ms: int) -> str:
    """The largest whole unit: ``7d``, ``90m``, ``1500ms``."""
    for unit, size in _UNITS_MS:
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def format_retention(info: TopicInfo) -> str:
    limits = []
    if info.retention_ms is not None:
        limits.append(format_ms(info.retention_ms))
    if info.retention_bytes is not None:
        limits.append(f"{info.retention_bytes:,} bytes")
    return " or ".join(limits) if limits else "forever"


@app.command("create")
def create_topic(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Topic name: letters, digits, '.', '_', '-'.")],
    partitions: Annotated[int, typer.Option(min=1, help="Number of partitions.")] = 1,
    compact: Annotated[
        bool, typer.Option("--compact", help="Keep only the last record of each key.")
    ] = False,
    retention_ms: Annotated[
        int | None, typer.Option(min=0, help="Delete records older than this.")
    ] = None,
    retention_bytes: Annotated[
        int | None, typer.Option(min=0, help="Delete the oldest records beyond this size.")
    ] = None,
    max_record_bytes: Annotated[
        int, typer.Option(min=0, help="Largest record accepted (key + value + headers).")
    ] = DEFAULT_MAX_RECORD_BYTES,
    delete_retention_ms: Annotated[
        int, typer.Option(min=0, help="How long compaction keeps tombstones.")
    ] = DEFAULT_DELETE_RETENTION_MS,
) -> None:
    """Create a topic (Log.create_topic)."""
    with open_log(ctx, create=True) as log:
        info = log.create_topic(
            name,
            partitions=partitions,
            compact=compact,
            retention_ms=retention_ms,
            retention_bytes=retention_bytes,
            max_record_bytes=max_record_bytes,
            delete_retention_ms=delete_retention_ms,
        )
    out.print(f"created topic {info.name} with {info.partitions} partition(s)")


@app.command("list")
def list_topics(ctx: typer.Context) -> None:
    """List topics (Log.list_topics)."""
    with open_log(ctx) as log:
        topics = log.list_topics()
    table = Table("name", "partitions", "compact", "retention")
    for info in topics:
        table.add_row(
            info.name, str(info.partitions), "yes" if info.compact else "no", format_retention(info)
        )
    out.print(table)


@app.command("describe")
def describe_topic(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="Topic name.")]
) -> None:
    """Show a topic's settings and, per partition, its offsets and size (Log.describe_topic)."""
    with open_log(ctx) as log:
        description = log.describe_topic(name)
    info = description.info
    out.print(
        f"topic {info.name}: {info.partitions} partition(s), "
        f"compact {'yes' if info.compact else 'no'}, retention {format_retention(info)}, "
        f"max record {info.max_record_bytes:,} bytes",
    )
    # "records" is end - beginning: what a reader from the beginning can reach. On a compacted
    # topic fewer records remain, as offsets never change.
    table = Table("partition", "beginning offset", "end offset", "records", "size bytes")
    for p in description.partitions:
        table.add_row(
            str(p.partition),
            str(p.beginning_offset),
            str(p.end_offset),
            str(p.end_offset - p.beginning_offset),
            f"{p.size_bytes:,}",
        )
    out.print(table)


@app.command("delete")
def delete_topic(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="Topic name.")]
) -> None:
    """Delete a topic, its records and the groups' offsets for it (Log.delete_topic)."""
    with open_log(ctx) as log:
        log.delete_topic(name)
    out.print(f"deleted topic {name}")
