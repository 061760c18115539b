"""``autoft pretrain``: self-supervised pretraining of a backbone on unlabelled images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from autoft.cli.common import console, guarded
from autoft.cli.progress import EpochProgress, decoding_progress


class PretrainProgress(EpochProgress):
    def epoch_done(self, record: dict) -> None:
        line = f"{self.label} {record['epoch']}/{self.epochs}: loss {record['loss']:.4f}"
        if record.get("knn_accuracy") is not None:
            line += f", k-NN accuracy {record['knn_accuracy']:.3f}"
        self.progress.console.print(line, highlight=False)
        if record["epoch"] < self.epochs:
            self.progress.update(self.task, description=f"{self.label} {record['epoch'] + 1}/{self.epochs}", completed=0)


def pretrain_command(
    backbone: Annotated[str, typer.Option(help="Backbone: a timm model name, or SOURCE:MODEL from another plugin.")],
    data: Annotated[str, typer.Option(help="Unlabelled images: a flat folder, a class folder (labels ignored), or a dataset source.")],
    out: Annotated[Path, typer.Option(help="Folder for backbone-epoch*.pt checkpoints and metrics.json.")],
    method: Annotated[str, typer.Option(help="Pretraining method (see `autoft plugins`): simclr, autoencoder, masked-autoencoder.")] = "simclr",
    epochs: Annotated[int, typer.Option(min=1, help="Pretraining epochs; checkpoints at 25%, 50% and 100% of them.")] = 50,
    batch_size: Annotated[int, typer.Option(min=2, help="Images per batch.")] = 128,
    image_size: Annotated[Optional[int], typer.Option(min=8, help="Image size. \\[default: the dataset's or backbone's]")] = None,
    weights: Annotated[Optional[str], typer.Option(metavar="PATH|TAG", help="Starting weights: a state-dict/.safetensors PATH or a pretrained tag. \\[default: random]")] = None,
    labelled: Annotated[
        Optional[str],
        typer.Option(help="A labelled dataset to score each checkpoint by k-NN accuracy. \\[default: --data's own labels if it is a class folder]"),
    ] = None,
    lr: Annotated[float, typer.Option(min=0.0, help="Learning rate (AdamW).")] = 1e-3,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Pretrain a backbone on unlabelled images; fine-tune from a checkpoint with --weights.
    Ctrl-C stops after the current batch and keeps the weights as the last checkpoint."""
    from autoft.training.pretraining import pretrain
    from autoft.core.runtime import graceful_interrupts

    stopping = lambda: console.print("[yellow]stopping after this batch; Ctrl-C again to abort[/yellow]")  # noqa: E731
    with PretrainProgress(epochs, label="pretrain epoch") as progress, graceful_interrupts(stopping), decoding_progress():
        result = pretrain(
            backbone,
            data,
            out,
            method=method,
            epochs=epochs,
            batch_size=batch_size,
            image_size=image_size,
            weights=weights,
            labelled=labelled,
            lr=lr,
            device=device,
            seed=seed,
            on_epoch=progress.epoch_done,
            on_batch=progress.batch_done,
        )
    m = result.metrics
    skipped = f", skipped {m['skipped_images']} unreadable" if m["skipped_images"] else ""
    stopped = f" (stopped early: {m['stopped']})" if m.get("stopped") else ""
    console.print(f"[green]done:[/green] {m['num_images']} images{skipped}{stopped}; loss {m['epochs'][0]['loss']:.4f} -> {m['epochs'][-1]['loss']:.4f}")
    for checkpoint in result.checkpoints:
        score = f" (k-NN accuracy {checkpoint.knn_accuracy:.3f})" if checkpoint.knn_accuracy is not None else ""
        console.print(f"  {checkpoint.path}{score}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("pretrain")(guarded(pretrain_command))
