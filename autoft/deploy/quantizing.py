"""Lower-precision copies of an exported model: fp16 for GPUs, and int8 tuned until validation
accuracy holds (calibration methods tried in turn, then the most sensitive layers kept in fp32)."""

from __future__ import annotations

import contextlib
import io
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from autoft.data import ImageTensors
from autoft.errors import AutoftError
from autoft.deploy.inference import INPUT_NAME, OUTPUT_NAME, create_session

CALIBRATION_IMAGES = 256
CALIBRATION_BATCH = 16


@contextlib.contextmanager
def quiet_onnx():
    """The exporters print progress and deprecation chatter; a user sees our summary instead."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def to_fp16(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    import onnx_ir

    with quiet_onnx():
        model = onnx_ir.from_proto(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True))
    model.graph.sort()  # the converter appends its input casts after the nodes that read them
    onnx.save(onnx_ir.to_proto(model), str(target))


class _CalibrationImages:
    """Feeds training images to onnxruntime's calibrator, a batch at a time."""

    def __init__(self, images: ImageTensors):
        self.images = images
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch[0].float().div(255).numpy()}

    def rewind(self) -> None:
        self.batches = self.images.iter_batches(None, CALIBRATION_BATCH)


CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile")  # onnxruntime's, cheapest and today's default first
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
SENSITIVITY_IMAGES = 64  # training images on which each node's effect on the logits is measured
MAX_FP32_SHARE = 0.25  # at most this share of the quantisable nodes is kept in fp32


@dataclass
class Int8Attempt:
    method: str
    fp32_nodes: list[str]
    accuracy: float
    path: Path


class Int8Tuner:
    """Static int8 (QDQ, per channel) tuned until validation accuracy holds.

    Plain MinMax calibration first (what most exports need); when it loses more than
    ``max_drop``, Entropy and Percentile calibration; then, from the best of those, the nodes
    whose quantisation moves the logits most (measured one node at a time on training images)
    are kept in fp32, one more at a time, up to :data:`MAX_FP32_SHARE` of them. onnxruntime
    calibrates once per method (its calibration cache); each try only re-quantises.
    """

    def __init__(self, fp32_model: Path, work: Path, calibration: ImageTensors | None, images: ImageTensors, max_drop: float):
        from onnxruntime.quantization.shape_inference import quant_pre_process

        if calibration is None or len(calibration) == 0:
            raise AutoftError("int8 needs training images to calibrate on")
        order = torch.randperm(len(calibration), generator=torch.Generator().manual_seed(0))
        self.calibration = calibration.subset(order[:CALIBRATION_IMAGES])
        self.work, self.images, self.max_drop = work, images, max_drop
        self.prepared = work / "model-preprocessed.onnx"
        with quiet_onnx():
            quant_pre_process(str(fp32_model), str(self.prepared))
        self.fp32_model = fp32_model
        self.fp32_accuracy = onnx_accuracy(fp32_model, images)
        self.attempts: list[Int8Attempt] = []

    def quantize(self, method: str, fp32_nodes: Sequence[str], target: Path) -> Path:
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

        ranges = self.work / f"ranges-{method}.json"
        reader = None if ranges.is_file() else type("Reader", (_CalibrationImages, CalibrationDataReader), {})(self.calibration)
        with quiet_onnx():
            quantize_static(
                str(self.prepared), str(target), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=list(fp32_nodes),
                calibrate_method=getattr(CalibrationMethod, method), calibration_cache_path=str(ranges),
            )  # fmt: skip
        return target

    def attempt(self, method: str, fp32_nodes: Sequence[str]) -> Int8Attempt:
        path = self.quantize(method, fp32_nodes, self.work / f"model-int8-{method}-{len(fp32_nodes)}.onnx")
        tried = Int8Attempt(method, list(fp32_nodes), onnx_accuracy(path, self.images), path)
        self.attempts.append(tried)
        return tried

    def within_limit(self, tried: Int8Attempt) -> bool:
        return self.fp32_accuracy - tried.accuracy <= self.max_drop

    def run(self) -> Int8Attempt:
        for method in CALIBRATION_METHODS:
            if self.within_limit(tried := self.attempt(method, [])):
                return tried
        best = max(self.attempts, key=lambda a: a.accuracy)
        ranked = self.sensitive_nodes(best.method)
        for count in range(1, max(1, int(len(ranked) * MAX_FP32_SHARE)) + 1):
            if self.within_limit(tried := self.attempt(best.method, ranked[:count])):
                return tried
        best = max(self.attempts, key=lambda a: a.accuracy)
        raise AutoftError(
            f"int8 lost {100 * (self.fp32_accuracy - best.accuracy):.1f} points of validation accuracy at best "
            f"({self.fp32_accuracy:.3f} -> {best.accuracy:.3f}, {best.method} calibration, {len(best.fp32_nodes)} node(s) in fp32; "
            f"allowed {100 * self.max_drop:.1f}) after {len(self.attempts)} tries: calibration by {', '.join(CALIBRATION_METHODS)}, "
            f"then up to {len(ranked[: max(1, int(len(ranked) * MAX_FP32_SHARE))])} of the most sensitive nodes in fp32; "
            "keep fp32 or allow a larger drop"
        )

    def sensitive_nodes(self, method: str) -> list[str]:
        """Quantisable nodes, most sensitive first: by how close the logits get to fp32's when that node alone stays fp32."""
        import onnx

        graph = onnx.load(str(self.prepared), load_external_data=False).graph
        candidates = [n.name for n in graph.node if n.op_type in QUANTIZED_OPS and n.name]
        sample = self.calibration.subset(range(min(SENSITIVITY_IMAGES, len(self.calibration))))
        reference = onnx_logits(self.fp32_model, sample)
        error = {}
        for node in candidates:
            probe = self.quantize(method, [node], self.work / "model-int8-probe.onnx")
            error[node] = float(np.mean((onnx_logits(probe, sample) - reference) ** 2))
        return sorted(candidates, key=lambda node: error[node])


def tune_int8(fp32_model: Path, target: Path, calibration: ImageTensors | None, images: ImageTensors, max_drop: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Quantise ``fp32_model`` to ``target`` within ``max_drop`` of its validation accuracy; returns
    the quantisation settings and the accuracy figures for ``export.json``. An error when no mix holds."""
    tuner = Int8Tuner(fp32_model, target.parent, calibration, images, max_drop)
    chosen = tuner.run()
    shutil.copyfile(chosen.path, target)
    quantization = {
        "format": "QDQ", "per_channel": True, "activations": "uint8", "weights": "int8",
        "calibration_images": len(tuner.calibration), "calibration_method": chosen.method, "nodes_in_fp32": chosen.fp32_nodes,
        "tries": [{"method": a.method, "nodes_in_fp32": len(a.fp32_nodes), "val_accuracy": a.accuracy} for a in tuner.attempts],
    }  # fmt: skip
    accuracy = {
        "val_images": len(images), "val_accuracy_fp32": tuner.fp32_accuracy, "val_accuracy_int8": chosen.accuracy,
        "change_points": round(100 * (chosen.accuracy - tuner.fp32_accuracy), 2),
    }  # fmt: skip
    return quantization, accuracy


def onnx_logits(path: Path, images: ImageTensors, batch_size: int = 64) -> np.ndarray:
    session = create_session(path, device="cpu")
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x.float().div(255).numpy()})[0] for x, _ in images.iter_batches(None, batch_size)])


def onnx_accuracy(path: Path, images: ImageTensors, batch_size: int = 64) -> float:
    predicted = onnx_logits(path, images, batch_size).argmax(1)
    return float((predicted == images.labels.numpy()).mean())


