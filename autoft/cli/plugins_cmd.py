"""``autoft plugins``: what is installed, who provides it, what is broken or disabled, and
which plugins are written for a newer plugin API than this autoft offers."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from autoft.cli.common import guarded, warn
from autoft.cli.tables import WholeTable

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
    disabled = [{"plugin": i.name, "package": i.package, "version": i.version} for i in reg.plugins.values() if getattr(i, "disabled", False)]
    return {"plugins": rows, "conflicts": conflicts, "broken": broken, "disabled": disabled, "newer_api": newer_api(reg)}


def newer_api(reg) -> list[str]:
    """One line for each registered spec written for a newer API of its kind than this autoft offers."""
    from autoft import __version__
    from autoft.specs import API_VERSIONS

    found = []
    for kind, label in KIND_LABELS.items():
        offered = API_VERSIONS.get(kind, 1)
        for name, registered in getattr(reg, kind).items():
            wanted = getattr(registered.spec, "api_version", offered)
            if isinstance(wanted, int) and wanted > offered:
                info = registered.plugin
                found.append(
                    f"{label} {name!r} from {f'{info.package} {info.version}'.strip()} is written for {label} API {wanted}, but this autoft "
                    f"({__version__}) offers API {offered}: upgrade autoft, or install a release of {info.package} for API {offered}"
                )
    return found


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
    for row in found["disabled"]:
        table.add_row("[dim]disabled[/dim]", "", escape(f"{row['package']} {row['version']}"), escape(row["plugin"]), "[dim]not loaded: named in AUTOFT_DISABLE_PLUGINS[/dim]")
    for line in found["newer_api"]:
        warn(line)
    out.print(WholeTable(table), crop=False)  # on a terminal the table fits; elsewhere nothing is cut


def register(app: typer.Typer) -> None:
    app.command("plugins")(guarded(plugins_command))
