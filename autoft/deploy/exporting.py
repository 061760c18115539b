"""Export a checkpoint to ONNX, verified against PyTorch before anything is written.

The graph holds the normalisation, so a client sends float32 NCHW pixels in [0, 1] at the
trained size, with any batch size. Every export is checked with ``onnx.checker`` and then
run through onnxruntime next to PyTorch on real validation images, at batch 1 and at a
larger batch. When the dynamo exporter's graph fails that check the TorchScript exporter
is tried; when both fail, :class:`~autoft.errors.AutoftError` is raised and no model is
written. The figures go to ``export.json``.

``precision="int8"`` quantises statically (QDQ, per channel) with onnxruntime, calibrated
on training images, and records validation accuracy before and after. When plain MinMax
calibration loses more than ``max_accuracy_drop``, :class:`Int8Tuner` tries the other
calibration methods and then keeps the most sensitive nodes in fp32; ``export.json`` records
the method and those nodes. ``"fp16"`` halves the weights for GPUs and keeps float32 inputs
and outputs.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoft.data import ImageTensors
from autoft.data.decoding import load_data
from autoft.errors import AutoftError
from autoft.deploy.inference import LABELS_FILE, MODEL_FILE, PREPROCESS_FILE, create_session, model_name
from autoft.core.io import atomic_path, read_json, write_json, write_text
from autoft.model.checkpoints import LoadedModel, find_checkpoint, load_checkpoint
from autoft.deploy.inference import INPUT_NAME, OUTPUT_NAME
from autoft.deploy.quantizing import quiet_onnx, to_fp16, tune_int8

PRECISIONS = ("fp32", "fp16", "int8")
REPORT_FILE = "export.json"
TRITON_FOLDER = "triton"

SINGLE_IMAGE_CHECKS = 8  # images run one at a time
PARITY_BATCH = 32  # images run as one batch, proving the batch dimension is dynamic
# Largest |onnxruntime - PyTorch| allowed, relative to the largest |logit| (at least 1).
TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}
# fp16 may flip a near tie; int8 is judged by accuracy instead.
MIN_AGREEMENT = {"fp32": 1.0, "fp16": 0.95}
MAX_ACCURACY_DROP = 0.01


@dataclass
class ExportResult:
    out: Path
    model: Path
    report: dict[str, Any]
    triton: Path | None = None


def export(
    model: str | Path | LoadedModel,
    out: str | Path | None = None,
    *,
    precision: str = "fp32",
    opset: int | None = None,
    triton: bool = False,
    images: ImageTensors | None = None,
    calibration: ImageTensors | None = None,
    name: str | None = None,
    max_accuracy_drop: float = MAX_ACCURACY_DROP,
    triton_max_batch: int = 32,
    registry=None,
) -> ExportResult:
    """Export ``model`` (a checkpoint, run folder, search folder or :class:`LoadedModel`) to ``out``.

    ``out`` defaults to the checkpoint's folder for fp32 and to its ``fp16/`` or ``int8/``
    subfolder otherwise. ``images`` are real validation images for the checks and
    ``calibration`` training images for int8; when not given they are reloaded from the
    data, seed and size the checkpoint records, which gives the same split as training.
    """
    _check_options(precision, opset, triton_max_batch)
    loaded, folder, out = _resolve(model, out, precision, registry)
    name = model_name(name or run_name(folder if folder is not None else out))
    images, calibration = _verification_images(loaded, images, calibration, need_calibration=precision == "int8", registry=registry)
    if len(images) == 0:
        raise AutoftError("no validation images to verify the export on")

    net = loaded.network().cpu().eval()
    size = int(loaded.meta["image_size"])
    with tempfile.TemporaryDirectory(prefix="autoft-export-") as work:
        work = Path(work)
        fp32_model, report = export_verified(net, images, size, work, opset)
        final = _to_precision(precision, fp32_model, net, images, calibration, max_accuracy_drop, report)
        report["precision"] = precision
        model_path = out / MODEL_FILE
        with atomic_path(model_path) as tmp:
            shutil.copyfile(final, tmp)

    preprocess = preprocess_config(loaded, name)
    write_json(out / PREPROCESS_FILE, preprocess)
    write_json(out / LABELS_FILE, loaded.classes)
    report = {"model": MODEL_FILE, "name": name, "backbone": loaded.meta["backbone"], **report}
    triton_root = None
    if triton:
        triton_root = write_triton_repository(out / TRITON_FOLDER, model_path, preprocess, loaded.classes, max_batch=triton_max_batch)
        report["triton"] = str(Path(TRITON_FOLDER) / name)
    write_json(out / REPORT_FILE, report)
    return ExportResult(out=out, model=model_path, report=report, triton=triton_root)


def _check_options(precision: str, opset: int | None, triton_max_batch: int) -> None:
    if precision not in PRECISIONS:
        raise AutoftError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if opset is not None and opset < 7:
        raise AutoftError(f"--opset {opset} is too old; onnxruntime needs 7 or later")
    if triton_max_batch < 1:
        raise AutoftError("the Triton max batch size must be at least 1")


def _resolve(model: str | Path | LoadedModel, out: str | Path | None, precision: str, registry) -> tuple[LoadedModel, Path | None, Path]:
    """(the model, the folder its checkpoint is in, the output folder)."""
    if isinstance(model, LoadedModel):
        loaded, folder = model, None
    else:
        checkpoint = find_checkpoint(model)
        loaded, folder = load_checkpoint(checkpoint, registry=registry), checkpoint.parent
    if out is None:
        if folder is None:
            raise AutoftError("pass out= when exporting a model loaded in memory")
        out = folder if precision == "fp32" else folder / precision
    return loaded, folder, Path(out).expanduser()


def run_name(folder: Path) -> str:
    """The name a model is served under unless given one: the study a search recorded in
    ``metrics.json``, else the run folder's name (the search folder's, for its ``best/``)."""
    try:
        study = read_json(folder / "metrics.json").get("study")
    except (OSError, ValueError, AttributeError):  # no metrics, unreadable, or not an object
        study = None
    if isinstance(study, str) and study.strip():
        return study
    folder = folder.expanduser().resolve()
    return folder.parent.name if folder.name == "best" else folder.name


def _to_precision(precision: str, fp32_model: Path, net: torch.nn.Module, images: ImageTensors, calibration: ImageTensors | None, max_drop: float, report: dict[str, Any]) -> Path:
    """The verified fp32 graph converted to ``precision``, its checks added to ``report``."""
    if precision == "fp32":
        return fp32_model
    if precision == "fp16":
        final = fp32_model.with_name("model-fp16.onnx")
        to_fp16(fp32_model, final)
        report["checks"]["fp16"] = _checked(final, net, images, "fp16")
        return final
    final = fp32_model.with_name("model-int8.onnx")
    report["quantization"], report["accuracy"] = tune_int8(fp32_model, final, calibration, images, max_drop)
    report["checks"]["int8"] = _parity(final, net, images)
    return final


def preprocess_config(loaded: LoadedModel, name: str) -> dict[str, Any]:
    size = int(loaded.meta["image_size"])
    return {
        "name": name,
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "layout": "NCHW",
        "dtype": "float32",
        "shape": ["batch", 3, size, size],
        "image_size": size,
        "color": "RGB",
        "input_range": [0.0, 1.0],
        "resize": "shorter side to image_size (bicubic), then centre crop",
        "normalization": "inside the graph",
        "mean": list(loaded.meta["mean"]),
        "std": list(loaded.meta["std"]),
        "num_classes": len(loaded.classes),
        "output_kind": "logits",
    }


def _verification_images(loaded: LoadedModel, images, calibration, *, need_calibration: bool, registry) -> tuple[ImageTensors, ImageTensors | None]:
    if images is not None and (calibration is not None or not need_calibration):
        return images, calibration
    source = loaded.meta.get("data")
    if not source:
        raise AutoftError(
            "this checkpoint does not record its data; pass validation images"
            + (" and calibration images" if need_calibration else "")
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped images were reported when the model was trained
        splits = load_data(source, image_size=int(loaded.meta["image_size"]), seed=int(loaded.meta.get("seed", 0)), registry=registry)
    if splits.classes != loaded.classes:
        raise AutoftError(f"the data at {source} no longer has the classes this model was trained on")
    return images if images is not None else splits.val, calibration if calibration is not None else splits.train


# ---------------------------------------------------------------------------
# Exporting and checking


class ExportFailed(AutoftError):
    """No exporter produced a graph that passes verification against PyTorch."""


def export_verified(net: torch.nn.Module, images: ImageTensors, size: int, work: Path, opset: int | None) -> tuple[Path, dict[str, Any]]:
    """Export with the dynamo exporter, else TorchScript; return the first graph that passes."""
    failures = []
    for exporter, run in (("dynamo", _export_dynamo), ("torchscript", _export_torchscript)):
        path = work / f"model-{exporter}.onnx"
        started = time.perf_counter()
        try:
            run(net, size, path, opset)
            checks = _checked(path, net, images, "fp32")
        except Exception as exc:  # an exporter that fails in any way hands over to the next
            failures.append(f"{exporter}: {_first_line(exc)}")
            continue
        import onnx

        report = {
            "exporter": exporter,
            "opset": _opset_of(onnx.load(str(path), load_external_data=False)),
            "seconds": round(time.perf_counter() - started, 2),
            "checks": {"fp32": checks},
        }
        if failures:
            report["fallback_reasons"] = failures
            warnings.warn(f"the dynamo exporter failed ({failures[0]}); used the TorchScript exporter", stacklevel=3)
        return path, report
    raise ExportFailed("export failed verification with every exporter: " + "; ".join(failures))


def _export_dynamo(net: torch.nn.Module, size: int, path: Path, opset: int | None) -> None:
    batch = torch.export.Dim("batch", min=1)
    # torch.export treats a size-1 dimension as a constant, so trace at batch 2.
    example = torch.rand(2, 3, size, size)
    with quiet_onnx():
        torch.onnx.export(
            net,
            (example,),
            str(path),
            dynamo=True,
            external_data=_needs_external_data(net),
            verbose=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            opset_version=opset,
        )


def _export_torchscript(net: torch.nn.Module, size: int, path: Path, opset: int | None) -> None:
    with quiet_onnx():
        torch.onnx.export(
            net,
            (torch.rand(2, 3, size, size),),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset or 17,
        )


def _needs_external_data(net: torch.nn.Module) -> bool:
    # A single protobuf file cannot exceed 2 GiB; below that one file is simpler to ship.
    return sum(p.numel() * p.element_size() for p in net.state_dict().values()) > 1.8 * 2**30


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _opset_of(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _checked(path: Path, net: torch.nn.Module, images: ImageTensors, precision: str) -> dict[str, Any]:
    """``onnx.checker`` then parity with PyTorch; raise when outside the tolerance."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    checks = _parity(path, net, images)
    tolerance = TOLERANCE[precision]
    for run, figures in checks.items():
        allowed = tolerance * max(1.0, figures["max_abs_logit"])
        if figures["max_abs_diff"] > allowed:
            raise AutoftError(f"{run}: onnxruntime differs from PyTorch by {figures['max_abs_diff']:.3g} (allowed {allowed:.3g})")
        if figures["top1_agreement"] < MIN_AGREEMENT[precision]:
            raise AutoftError(f"{run}: onnxruntime agrees with PyTorch on {figures['top1_agreement']:.1%} of top-1 labels")
    return checks


def _parity(path: Path, net: torch.nn.Module, images: ImageTensors) -> dict[str, dict[str, Any]]:
    session = create_session(path, device="cpu")
    pixels = images.take(range(min(PARITY_BATCH, len(images)))).float().div(255)
    with torch.inference_mode():
        expected = net(pixels).numpy()
        expected_single = np.concatenate([net(pixels[i : i + 1]).numpy() for i in range(min(SINGLE_IMAGE_CHECKS, len(pixels)))])
    run = lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]  # noqa: E731
    single = np.concatenate([run(pixels[i : i + 1]) for i in range(len(expected_single))])
    return {
        "batch_1": _compare(single, expected_single, batch=1),
        f"batch_{len(pixels)}": _compare(run(pixels), expected, batch=len(pixels)),
    }


def _compare(got: np.ndarray, expected: np.ndarray, batch: int) -> dict[str, Any]:
    if got.shape != expected.shape:
        raise AutoftError(f"onnxruntime returned shape {got.shape}, PyTorch {expected.shape}")
    return {
        "batch_size": batch,
        "images": int(len(expected)),
        "max_abs_diff": float(np.abs(got - expected).max()),
        "max_abs_logit": float(np.abs(expected).max()),
        "top1_agreement": float((got.argmax(1) == expected.argmax(1)).mean()),
    }


# ---------------------------------------------------------------------------
# Triton


def write_triton_repository(root: Path, model_path: Path, preprocess: dict[str, Any], classes: list[str], *, max_batch: int = 32) -> Path:
    """``root/<name>/config.pbtxt`` and ``root/<name>/1/model.onnx``, loadable by Triton as they are."""
    name = preprocess["name"]
    folder = root / name
    size = preprocess["image_size"]
    config = f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch}
input [
  {{
    name: "{preprocess['input']}"
    data_type: TYPE_FP32
    dims: [ 3, {size}, {size} ]
  }}
]
output [
  {{
    name: "{preprocess['output']}"
    data_type: TYPE_FP32
    dims: [ {len(classes)} ]
    label_filename: "labels.txt"
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: 2000
}}
"""
    write_text(folder / "config.pbtxt", config)
    write_text(folder / "labels.txt", "".join(f"{label}\n" for label in classes))
    with atomic_path(folder / "1" / MODEL_FILE) as tmp:
        shutil.copyfile(model_path, tmp)
    return root
