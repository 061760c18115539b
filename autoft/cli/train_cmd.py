"""``autoft train``: one fine-tuning run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from autoft.cli.common import console, guarded
from autoft.cli.progress import EpochProgress
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


def train_command(
    backbone: Annotated[str, typer.Option(help="Backbone: a timm model name, or SOURCE:MODEL from another plugin.")],
    data: Annotated[str, typer.Option(help="DIR/<class>/*, DIR/{train,val,test}/<class>/*, a CSV manifest, or sample:digits.")],
    out: Annotated[Path, typer.Option(help="Folder for model.pt, metrics.json and labels.json.")],
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 10,
    batch_size: Annotated[int, typer.Option(min=2, help="Images per batch.")] = 64,
    lr: Annotated[Optional[float], typer.Option(min=0.0, help="Learning rate (AdamW). \\[default: 1e-3]")] = None,
    freeze_depth: Annotated[Optional[int], typer.Option(min=0, help="Freeze the first K parameter groups (stem first).")] = None,
    dropout: Annotated[Optional[float], typer.Option(min=0.0, max=0.95, help="Dropout before the classifier. \\[default: 0.1]")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(min=0.0, help="AdamW weight decay. \\[default: 0.01]")] = None,
    strategy: Annotated[str, typer.Option(help="Fine-tuning strategy (see `autoft plugins`).")] = "freeze",
    param: Annotated[list[str], typer.Option(metavar="KEY=VALUE", help="A strategy parameter, KEY=VALUE (e.g. l2sp_alpha=0.01). Repeatable.")] = [],
    weights: Annotated[Optional[str], typer.Option(metavar="PATH|TAG", help="Starting weights: a state-dict/.safetensors PATH, or a pretrained tag the source can fetch. \\[default: random]")] = None,
    image_size: Annotated[Optional[int], typer.Option(min=8, help="Training image size. \\[default: the dataset's or backbone's]")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed; a CPU run with the same seed repeats exactly.")] = 0,
) -> None:
    """Fine-tune one backbone on one dataset."""
    from autoft.training import train

    with EpochProgress(epochs) as progress:
        result = train(
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
            extra_params=parse_params(param),
            on_epoch=progress.epoch_done,
            on_batch=progress.batch_done,
        )
    m = result.metrics
    summary = f"val accuracy {m['val_accuracy']:.3f} (epoch {m['best_epoch']})"
    if "test_accuracy" in m:
        summary += f", test accuracy {m['test_accuracy']:.3f}"
    console.print(f"[green]done:[/green] {summary}; wrote {result.checkpoint}")


def register(app: typer.Typer) -> None:
    app.command("train")(guarded(train_command))
