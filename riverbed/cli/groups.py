"""``riverbed groups``: list consumer groups and describe their members, offsets and lag."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from riverbed.cli.common import open_log, out

app = typer.Typer(help="List and describe consumer groups.", no_args_is_help=True)


@app.command("list")
def list_groups(ctx: typer.Context) -> None:
    """List consumer groups, one per line (Log.list_groups)."""
    with open_log(ctx) as log:
        names = log.list_groups()
    for name in names:
        out.print(name)


@app.command("describe")
def describe_group(
    ctx: typer.Context, group: Annotated[str, typer.Argument(help="Consumer group name.")]
) -> None:
    """Show a group's committed offsets, lag, members and assignments (Log.describe_group)."""
    with open_log(ctx) as log:
        description = log.describe_group(group)
    total_lag = sum(o.lag for o in description.offsets)
    out.print(
        f"group {description.group}: {description.state}, generation {description.generation}, "
        f"{len(description.members)} member(s), total lag {total_lag}",
    )
    offsets = Table("topic", "partition", "committed offset", "end offset", "lag")
    for o in description.offsets:
        committed = "-" if o.committed is None else str(o.committed)
        offsets.add_row(o.topic, str(o.partition), committed, str(o.end_offset), str(o.lag))
    out.print(offsets)
    if description.members:
        members = Table("member", "assignment")
        for member in description.members:
            owned = ", ".join(f"{topic}[{partition}]" for topic, partition in member.assignment)
            members.add_row(member.member_id, owned or "-")
        out.print(members)
