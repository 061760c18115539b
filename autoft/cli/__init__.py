"""The ``autoft`` command: a thin Typer layer over the Python API.

Each command group lives in its own module and is attached in :func:`make_app`, so
importing this package has no side effects and tests can build a fresh app.
"""

from __future__ import annotations

import time
from importlib import import_module
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from autoft import __version__

STARTED = "autoft.started"  # in click's context meta: when the command started (time.monotonic())


def _version(value: bool) -> None:
    if value:
        typer.echo(f"autoft {__version__}")
        raise typer.Exit()


# Typer labels option values by Python type (<str>, <list[str]>, <int range>); help shows
# the plain names click users know instead. A flag takes no value, so it shows none.
PLAIN_METAVARS = {"int": "INTEGER", "float": "FLOAT", "str": "TEXT", "path": "PATH", "Path": "PATH", "bool": ""}


def plain_metavar(typer_label: str) -> str:
    """``<int range>`` -> ``INTEGER``; ``<list[str]>`` -> ``TEXT`` (the help says "repeatable")."""
    label = typer_label.strip("<>").removesuffix(" range")
    if label.startswith("list[") and label.endswith("]"):
        label = label[5:-1]
    return PLAIN_METAVARS.get(label, label.upper())


class PlainHelp:
    """Gives every parameter without a ``metavar=`` of its own a plain one, just before help is drawn."""

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        for param in self.get_params(ctx):
            if not hasattr(param, "display_type"):  # Typer before its own type labels: click's are plain
                continue
            plain = "" if getattr(param, "is_flag", False) else plain_metavar(param.display_type(ctx))
            if param.param_type_name == "argument":
                # Its metavar names it already (MODEL_OR_RUN); Typer draws the type apart, and only that needs plain words.
                param.display_type_rich = lambda ctx, _plain="" if param.metavar else plain: _plain
            elif param.metavar is None:
                param.metavar = plain
        super().format_help(ctx, formatter)


class PlainHelpGroup(PlainHelp, TyperGroup):
    pass


class PlainHelpCommand(PlainHelp, TyperCommand):
    pass


# Each module defines register(app); one line per command group.
COMMAND_MODULES = [
    "autoft.cli.plugins_cmd",
    "autoft.cli.train_cmd",
    "autoft.cli.pretrain_cmd",
    "autoft.cli.search_cmd",
    "autoft.cli.export_cmd",
    "autoft.cli.predict_cmd",
    "autoft.cli.serve_cmd",
    "autoft.cli.cache_cmd",
]


def make_app(started: float | None = None) -> typer.Typer:
    """The app; ``started`` (a ``time.monotonic()`` value) is when ``--timeout`` starts counting,
    by default when a command starts."""
    app = typer.Typer(
        name="autoft",
        help="Automatic fine-tuning of image classifiers: search, pretrain, export, serve.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        cls=PlainHelpGroup,
    )

    @app.callback()
    def root(
        ctx: typer.Context,
        version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = None,
        plugins_dir: Annotated[
            Optional[Path],
            typer.Option("--plugins-dir", envvar="AUTOFT_PLUGINS_DIR", help="Also load every *.py in DIR as a plugin."),
        ] = None,
    ) -> None:
        from autoft import plugins
        from autoft.cli.common import run_guarded

        ctx.meta[STARTED] = time.monotonic() if started is None else started  # the command's imports of torch and the rest are part of its time
        if plugins_dir is not None:
            run_guarded(lambda: plugins.set_default_plugin_manager(plugins.get_plugin_manager(plugins_dir)))

    for module in COMMAND_MODULES:
        import_module(module).register(app)
    for command in app.registered_commands:
        if command.cls in (None, TyperCommand):  # a command's own class is left alone
            command.cls = PlainHelpCommand
    return app


def main() -> None:
    """The ``autoft`` program: its ``--timeout`` counts from the process's start (the
    interpreter's and the imports' seconds, 1 to 4 on 2 cores, are the user's wait too)."""
    from autoft.core.runtime import process_started

    make_app(started=process_started())()
