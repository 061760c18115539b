"""``autoft train``: one fine-tuning run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from autoft.cli.common import console, guarded
from autoft.cli.progress import EpochProgress, decoding_progress
from autoft.errors import AutoftError


def parse_params(pairs: list[str]) -> dict:
    """``KEY=VALUE`` pairs; values are read as int, float, or kept as text."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AutoftError(f"--param expects KEY=VALUE, got {pair!r}")
        for cast in (int, float):
            try:
                params[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            params[key] = value
    return params


def _recipe_help(name: str) -> str:
    """Help text from the recipe's table: the one place a parameter is described."""
    from autoft.model.recipe import PARAM_DEFS

    definition = PARAM_DEFS[name]
    return f"{definition.help} \\[default: {definition.default}]"


def train_command(
    backbone: Annotated[str, typer.Option(help="Backbone: a timm model name, or SOURCE:MODEL from another plugin.")],
    data: Annotated[str, typer.Option(help="DIR/<class>/*, DIR/{train,val,test}/<class>/*, a CSV manifest, or sample:digits.")],
    out: Annotated[Path, typer.Option(help="Folder for model.pt, metrics.json and labels.json.")],
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 10,
    batch_size: Annotated[int, typer.Option(min=2, help="Images per batch.")] = 64,
    lr: Annotated[Optional[float], typer.Option(help=_recipe_help("lr"), show_default=False)] = None,
    freeze_depth: Annotated[Optional[int], typer.Option(min=0, help="Freeze the first K parameter groups (stem first).")] = None,
    dropout: Annotated[Optional[float], typer.Option(help=_recipe_help("dropout"), show_default=False)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help=_recipe_help("weight_decay"), show_default=False)] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(help=_recipe_help("label_smoothing"), show_default=False)] = None,
    augment: Annotated[Optional[str], typer.Option(help=_recipe_help("augment"), show_default=False)] = None,
    strategy: Annotated[str, typer.Option(help="Fine-tuning strategy (see `autoft plugins`).")] = "freeze",
    regularizer: Annotated[Optional[str], typer.Option(help=_recipe_help("regularizer"), show_default=False)] = None,
    param: Annotated[list[str], typer.Option(metavar="KEY=VALUE", help="A strategy or regulariser parameter, KEY=VALUE (e.g. l2sp_alpha=0.01). Repeatable.")] = [],
    metric: Annotated[str, typer.Option(help="Validation metric that picks the best epoch (see `autoft plugins`): accuracy, f1_macro, balanced_accuracy, top5_accuracy, log_loss.")] = "accuracy",
    weights: Annotated[Optional[str], typer.Option(metavar="PATH|TAG", help="Starting weights: a state-dict/.safetensors PATH, a pretrained tag the source can fetch, or plugin:NAME (a weights plugin's, see `autoft plugins`). \\[default: random]")] = None,
    image_size: Annotated[Optional[int], typer.Option(min=8, help="Training image size. \\[default: the dataset's or backbone's]")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed; a CPU run with the same seed repeats exactly.")] = 0,
) -> None:
    """Fine-tune one backbone on one dataset. Ctrl-C stops after the current batch and keeps the best epoch."""
    from autoft import training
    from autoft.core.runtime import graceful_interrupts

    recipe = {"label_smoothing": label_smoothing, "augment": augment, "regularizer": regularizer}
    extra = {**{k: v for k, v in recipe.items() if v is not None}, **parse_params(param)}
    with EpochProgress(epochs) as progress, graceful_interrupts(lambda: console.print("[yellow]stopping after this batch; Ctrl-C again to abort[/yellow]")), decoding_progress():
        result = training.train(
            backbone,
            data,
            out,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            freeze_depth=freeze_depth,
            dropout=dropout,
            weight_decay=weight_decay,
            strategy=strategy,
            weights=weights,
            image_size=image_size,
            device=device,
            seed=seed,
            metric=metric,
            extra_params=extra,
            on_epoch=progress.epoch_done,
            on_batch=progress.batch_done,
        )
    m = result.metrics
    chosen = m.get("metric", "accuracy")
    summary = f"val {chosen.replace('_', ' ')} {m[f'val_{chosen}']:.3f} (epoch {m['best_epoch']})"
    if f"test_{chosen}" in m:
        summary += f", test {chosen.replace('_', ' ')} {m[f'test_{chosen}']:.3f}"
    stopped = f" (stopped early: {result.stopped})" if getattr(result, "stopped", None) else ""
    console.print(f"[green]done:[/green] {summary}{stopped}; wrote {result.checkpoint}")


def register(app: typer.Typer) -> None:
    app.command("train")(guarded(train_command))
