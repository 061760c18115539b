"""The ``autoft`` command: a thin Typer layer over the Python API.

Each command group lives in its own module and is attached in :func:`make_app`, so
importing this package has no side effects and tests can build a fresh app.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Annotated, Optional

import typer

from autoft import __version__


def _version(value: bool) -> None:
    if value:
        typer.echo(f"autoft {__version__}")
        raise typer.Exit()


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


def make_app() -> typer.Typer:
    app = typer.Typer(
        name="autoft",
        help="Automatic fine-tuning of image classifiers: search, pretrain, export, serve.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )

    @app.callback()
    def root(
        version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = None,
        plugins_dir: Annotated[
            Optional[Path],
            typer.Option("--plugins-dir", envvar="AUTOFT_PLUGINS_DIR", help="Also load every *.py in DIR as a plugin."),
        ] = None,
    ) -> None:
        from autoft import plugins
        from autoft.cli.common import run_guarded

        if plugins_dir is not None:
            run_guarded(lambda: plugins.set_default_plugin_manager(plugins.get_plugin_manager(plugins_dir)))

    for module in COMMAND_MODULES:
        import_module(module).register(app)
    return app


def main() -> None:
    make_app()()
