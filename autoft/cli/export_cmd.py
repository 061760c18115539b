"""``autoft export``: a verified ONNX model, optionally quantised, optionally as a Triton repository."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from autoft.cli.common import console, guarded


def export_command(
    model: Annotated[str, typer.Argument(metavar="RUN_OR_CHECKPOINT", help="model.pt, a train output folder, or a search folder.")],
    out: Annotated[Optional[Path], typer.Option(help="Output folder. \\[default: the run folder for fp32, RUN/fp16 or RUN/int8 otherwise]")] = None,
    precision: Annotated[str, typer.Option(help="fp32; int8 (static QDQ, calibrated on training images, for CPUs); fp16 (for GPUs).")] = "fp32",
    opset: Annotated[Optional[int], typer.Option(min=7, help="ONNX opset. \\[default: torch.onnx's for the dynamo exporter, 17 for the TorchScript fallback; export.json records it]")] = None,
    triton: Annotated[bool, typer.Option("--triton", help="Also write a Triton model repository to OUT/triton.")] = False,
    name: Annotated[Optional[str], typer.Option(help="Model name for serving and Triton. \\[default: the search's study name, else the run folder's name]")] = None,
    max_accuracy_drop: Annotated[float, typer.Option(min=0.0, max=1.0, help="int8: the most validation accuracy it may lose (0.01 = 1 point).")] = 0.01,
    max_batch: Annotated[int, typer.Option(min=1, help="Triton max_batch_size.")] = 32,
) -> None:
    """Export a trained model to ONNX, checked against PyTorch on real images."""
    from autoft.deploy.exporting import export

    with console.status(f"exporting {precision} ONNX and checking it against PyTorch"):
        result = export(
            model, out, precision=precision, opset=opset, triton=triton, name=name, max_accuracy_drop=max_accuracy_drop, triton_max_batch=max_batch
        )
    report = result.report
    checks = ", ".join(
        f"batch {c['batch_size']}: max |diff| {c['max_abs_diff']:.2g}, top-1 agreement {c['top1_agreement']:.1%}"
        for c in report["checks"][precision].values()
    )
    console.print(f"exporter {report['exporter']}, opset {report['opset']}; {checks}", highlight=False)
    if "accuracy" in report:
        a = report["accuracy"]
        console.print(f"int8 validation accuracy {a['val_accuracy_fp32']:.3f} -> {a['val_accuracy_int8']:.3f} ({a['change_points']:+.2f} points)", highlight=False)
    console.print(f"[green]done:[/green] wrote {result.model}" + (f" and the Triton repository {result.triton}" if result.triton else ""))


def register(app: typer.Typer) -> None:
    app.command("export")(guarded(export_command))
