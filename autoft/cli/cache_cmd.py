"""``autoft cache list|clear``: autoft's cache on disk (decoded images, pretraining stages), with sizes."""

from __future__ import annotations

import json
import time
from typing import Annotated, Optional

import typer
from rich.table import Table

from autoft.cli.common import console, guarded
from autoft.errors import AutoftError

cache_app = typer.Typer(help="Show or free autoft's cache: decoded images and pretraining stages.", no_args_is_help=True)


def _kinds(only: Optional[str]) -> tuple[str, ...]:
    from autoft.data import cache

    if only is None:
        return cache.KINDS
    if only not in cache.KINDS:
        raise AutoftError(f"--only takes {' or '.join(cache.KINDS)}, got {only!r}")
    return (only,)


@cache_app.command("list")
@guarded
def list_command(
    only: Annotated[Optional[str], typer.Option(help="Only this kind: images or pretrain.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List cached entries, largest first, with their sizes and the cache's total."""
    from autoft.data import cache

    entries = cache.list_entries(_kinds(only))
    if as_json:
        rows = [{"kind": e.kind, "bytes": e.bytes, "modified": e.modified, "contents": e.description, "path": str(e.path)} for e in entries]
        typer.echo(json.dumps({"root": str(cache.cache_root()), "entries": rows}, indent=2))
        return
    if not entries:
        console.print(f"the cache in {cache.cache_root()} is empty", highlight=False)
        return
    table = Table(title=f"autoft cache: {cache.cache_root()}", title_justify="left")
    for column, justify in (("kind", "left"), ("size", "right"), ("modified", "left"), ("contents", "left"), ("key", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for entry in entries:
        modified = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.modified))
        table.add_row(entry.kind, cache.human_bytes(entry.bytes), modified, entry.description, entry.path.name[:12])
    total = sum(e.bytes for e in entries)
    table.caption = f"{len(entries)} entries, {cache.human_bytes(total)}"
    console.print(table, highlight=False)


@cache_app.command("clear")
@guarded
def clear_command(
    only: Annotated[Optional[str], typer.Option(help="Only this kind: images or pretrain.")] = None,
) -> None:
    """Delete cached entries (all by default); each command rebuilds what it needs."""
    from autoft.data import cache

    removed, freed = cache.clear(_kinds(only))
    console.print(f"removed {removed} entries, freed {cache.human_bytes(freed)} in {cache.cache_root()}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")
