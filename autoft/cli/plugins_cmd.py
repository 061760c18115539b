"""``autoft plugins``: what is installed, who provides it, and what is broken."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from autoft.cli.common import guarded

KIND_LABELS = {
    "backbones": "backbone source", "datasets": "dataset", "strategies": "strategy", "regularizers": "regularizer",
    "metrics": "metric", "pretrainers": "pretraining", "weights": "weights",
}  # fmt: skip


def describe() -> dict:
    from autoft import plugins

    reg = plugins.registry()
    rows = []
    for kind, label in KIND_LABELS.items():
        for name, registered in getattr(reg, kind).items():
            info = registered.plugin
            row = {"kind": label, "name": name, "description": registered.spec.description, "package": info.package, "version": info.version, "plugin": info.name}
            if kind == "weights":  # what a weights source has weights for
                row["provides"] = {"backbones": list(registered.spec.backbones), "tags": list(registered.spec.tags)}
            rows.append(row)
    conflicts = [
        {"kind": KIND_LABELS[kind], "name": name, "packages": [p.package for p in owners]}
        for kind, names in reg.conflicts.items()
        for name, owners in names.items()
    ]
    broken = [{"plugin": i.name, "package": i.package, "version": i.version, "error": i.error} for i in reg.plugins.values() if i.broken]
    return {"plugins": rows, "conflicts": conflicts, "broken": broken}


def plugins_command(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False) -> None:
    """List every backbone source, dataset format, strategy, pretraining method and weights source."""
    found = describe()
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    out = Console()
    table = Table("kind", "name", "package", "entry point", "description")
    for row in found["plugins"]:
        description = row["description"] + (f" (for {', '.join(row['provides']['backbones'])})" if "provides" in row else "")
        table.add_row(row["kind"], escape(row["name"]), escape(f"{row['package']} {row['version']}"), escape(row["plugin"]), escape(description))
    for row in found["conflicts"]:
        table.add_row(row["kind"], f"[red]{escape(row['name'])}[/red]", escape(" and ".join(row["packages"])), "", "[red]conflict: registered by more than one plugin, unusable[/red]")
    for row in found["broken"]:
        table.add_row("[red]broken[/red]", "", escape(f"{row['package']} {row['version']}"), escape(row["plugin"]), f"[red]{escape(row['error'])}[/red]")
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command("plugins")(guarded(plugins_command))
