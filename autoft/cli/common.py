"""What every command shares: one-line user errors, the console, progress bars."""

from __future__ import annotations

import functools
import re
import warnings
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from autoft.errors import AutoftError

console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

EXIT_USER_ERROR = 2


def fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(EXIT_USER_ERROR)


def run_guarded(call: Callable[[], Any]) -> Any:
    """Run ``call``; a user error becomes one red line on stderr and exit code 2."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return call()
    except AutoftError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(130) from None


def guarded(command: F) -> F:
    """Decorate a command so that user errors never show a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return run_guarded(lambda: command(*args, **kwargs))

    return wrapper  # type: ignore[return-value]


def warn(message: str) -> None:
    """One yellow line on stderr, as every warning the CLI shows."""
    console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False, soft_wrap=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, UserWarning) and not issubclass(category, DeprecationWarning):
        warn(message)


def bare_seconds_warning(value: str | None) -> str | None:
    """A ``--timeout`` callback: a number without a unit is accepted as seconds, and the user is told so."""
    if value is not None and re.fullmatch(r"\d+(\.\d+)?", value.strip()):
        warn(f"--timeout {value.strip()} is taken as {value.strip()} seconds; write 90s, 30m or 2h to say which unit")
    return value
