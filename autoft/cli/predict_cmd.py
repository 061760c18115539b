"""``autoft predict``: labels and probabilities for image files, through onnxruntime."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from autoft.cli.common import guarded
from autoft.errors import AutoftError

FORMATS = ("table", "json", "csv")


def predict_command(
    model: Annotated[str, typer.Argument(metavar="MODEL_OR_RUN", help="model.onnx, an export folder, a run folder or a search folder.")],
    paths: Annotated[list[Path], typer.Argument(metavar="PATH...", help="Images, or folders searched for images.")],
    top_k: Annotated[int, typer.Option(min=1, help="Labels per image, most likely first.")] = 5,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per onnxruntime call.")] = 32,
    format: Annotated[str, typer.Option("--format", help="table, json or csv, on stdout.")] = "table",
    device: Annotated[str, typer.Option(help="auto (CUDA when a GPU is usable), cpu or cuda.")] = "auto",
) -> None:
    """Classify images with an exported model."""
    from autoft.deploy.predict import predict

    if format not in FORMATS:
        raise AutoftError(f"unknown format {format!r}; use {', '.join(FORMATS)}")
    predictions = predict(model, paths, top_k=top_k, batch_size=batch_size, device=device)
    if format == "json":
        rows = [{"path": p.path, "predictions": [{"label": label, "probability": prob} for label, prob in p.labels]} for p in predictions]
        typer.echo(json.dumps(rows, indent=2, allow_nan=False))  # predict refuses non-finite outputs; NaN is not JSON
    elif format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["path", "rank", "label", "probability"])
        for p in predictions:
            for rank, (label, prob) in enumerate(p.labels, start=1):
                writer.writerow([p.path, rank, label, f"{prob:.6f}"])
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table("path", "label", "probability", *(["also"] if top_k > 1 else []))
        for p in predictions:
            (label, prob), rest = p.labels[0], p.labels[1:]
            table.add_row(p.path, label, f"{prob:.3f}", *([", ".join(f"{l} {q:.3f}" for l, q in rest)] if top_k > 1 else []))
        Console(soft_wrap=True).print(table)


def register(app: typer.Typer) -> None:
    app.command("predict")(guarded(predict_command))
