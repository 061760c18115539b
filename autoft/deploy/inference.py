"""Exported models at run time: an onnxruntime session, its preprocessing, and its labels.

``autoft predict`` and ``autoft serve`` both go through :class:`OnnxClassifier`, so an
image is decoded and resized exactly as it was for training (:func:`autoft.data.decoding.decode_image`)
whichever way it arrives.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from autoft.errors import AutoftError
from autoft.core.io import read_json
from autoft.specs import ImageSource

INPUT_NAME = "input"  # the exported graph's input: float32 NCHW pixels in [0, 1]
OUTPUT_NAME = "logits"

MODEL_FILE = "model.onnx"
PREPROCESS_FILE = "preprocess.json"
LABELS_FILE = "labels.json"

# onnxruntime logs provider failures at warning level; errors still surface as exceptions.
_LOG_ERRORS_ONLY = 3
PROBE_SEED = 0


def cuda_usable() -> bool:
    """Whether a CUDA GPU can actually run: onnxruntime-gpu lists its providers even with no GPU."""
    try:
        import torch
    except ImportError:  # torch is a dependency, but a serving image may leave it out
        return False
    return torch.cuda.is_available()


def providers_for(device: str = "auto") -> list[str]:
    import onnxruntime as ort

    if device not in ("auto", "cpu", "cuda"):
        raise AutoftError(f"unknown device {device!r}; use auto, cpu or cuda")
    available = ort.get_available_providers()
    gpu = device != "cpu" and "CUDAExecutionProvider" in available and cuda_usable()
    if device == "cuda" and not gpu:
        raise AutoftError("--device cuda was asked for, but no CUDA GPU is usable by onnxruntime here; use --device cpu")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else ["CPUExecutionProvider"]


def create_session(model: str | os.PathLike, device: str = "auto", threads: int | None = None):
    """An onnxruntime session on the GPU when one is usable, else the CPU, without provider noise."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = _LOG_ERRORS_ONLY
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    ort.set_default_logger_severity(_LOG_ERRORS_ONLY)
    try:
        return ort.InferenceSession(str(model), sess_options=options, providers=providers_for(device))
    except AutoftError:
        raise
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise AutoftError(f"onnxruntime cannot load {model}: {exc}") from None


def model_name(text: str) -> str:
    """A name Triton and URL paths accept: letters, digits, ``_``, ``-`` and ``.``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.") or "model"


def find_model(path: str | os.PathLike) -> Path:
    """Accept ``model.onnx``, an export folder, a train run folder or a search folder (its ``best/``)."""
    path = Path(path).expanduser()
    for candidate in (path, path / MODEL_FILE, path / "best" / MODEL_FILE):
        if candidate.is_file() and candidate.suffix == ".onnx":
            return candidate
    if path.exists():
        raise AutoftError(f"no {MODEL_FILE} in {path}; run `autoft export {path}` first")
    raise AutoftError(f"not found: {path}")


@dataclass
class OnnxClassifier:
    """An exported classifier: float32 NCHW pixels in [0, 1] at ``image_size`` -> class probabilities."""

    session: object
    path: Path
    name: str
    classes: list[str]
    image_size: int
    input_name: str
    output_name: str

    @classmethod
    def load(cls, model: str | os.PathLike, device: str = "auto", threads: int | None = None) -> "OnnxClassifier":
        path = find_model(model)
        preprocess_file = path.parent / PREPROCESS_FILE
        if not preprocess_file.is_file():
            raise AutoftError(f"{preprocess_file} is missing; export the model with `autoft export`")
        preprocess = read_json(preprocess_file)
        labels_file = path.parent / LABELS_FILE
        classes = read_json(labels_file) if labels_file.is_file() else [str(i) for i in range(preprocess["num_classes"])]
        return cls(
            session=create_session(path, device, threads),
            path=path,
            name=preprocess["name"],
            classes=list(classes),
            image_size=int(preprocess["image_size"]),
            input_name=preprocess["input"],
            output_name=preprocess["output"],
        )

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(pixels, dtype=np.float32)})[0]

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        return softmax(self.logits(pixels))

    def probe(self) -> "OnnxClassifier":
        """Run the model once on a probe batch; refuse it (:class:`AutoftError`) if its outputs
        cannot be served: not finite, or not one score per class.

        A model with a NaN weight loads and runs without complaint and answers NaN for every
        image, so predict and serve check it before the first real image rather than print
        NaN (which is not JSON) or report a broken server as ready. The probe images go the
        way a request's do, decoding included: a server's first request then waits for no
        import (decoding's, of torch, took 1.3 s and held the event loop while 64 slow clients
        were connected).
        """
        logits = self.logits(self.pixels(probe_images(self.image_size)))
        if logits.ndim != 2 or logits.shape[1] != len(self.classes):
            raise AutoftError(f"{self.path}: the model gives outputs of shape {list(logits.shape)}, but {len(self.classes)} classes are labelled; re-export it")
        if not np.isfinite(logits).all():
            raise AutoftError(f"{self.path}: {non_finite_reason(logits)} on a probe batch of black, grey, white and noise images; its weights are likely corrupt (NaN): retrain or re-export it")
        return self

    def pixels(self, sources: Sequence[ImageSource]) -> np.ndarray:
        """Decode and resize images to the model's input; raises whatever PIL raises on a bad one."""
        return to_pixels([decode(source, self.image_size) for source in sources], self.image_size)

    def top_k(self, probabilities: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        k = max(1, min(k, len(self.classes)))
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return [[(self.classes[i], float(row[i])) for i in best] for row, best in zip(probabilities, order)]


def decode(source: ImageSource, size: int) -> np.ndarray:
    from autoft.data.decoding import decode_image

    return decode_image(source, size).numpy()


def to_pixels(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """uint8 CHW images -> one float32 NCHW batch in [0, 1]."""
    if not images:
        return np.empty((0, 3, size, size), dtype=np.float32)
    return np.stack(images).astype(np.float32) / np.float32(255)


def probe_images(size: int) -> list[np.ndarray]:
    """Four uint8 RGB images a working model must score finitely: black, mid-grey, white and uniform noise."""
    plain = [np.full((size, size, 3), value, dtype=np.uint8) for value in (0, 128, 255)]
    return [*plain, np.random.default_rng(PROBE_SEED).integers(0, 256, (size, size, 3), dtype=np.uint8)]


def non_finite_reason(logits: np.ndarray) -> str:
    """How many of a batch's outputs are NaN or infinite, in words."""
    nan, inf = int(np.isnan(logits).sum()), int(np.isinf(logits).sum())
    return f"the model's outputs are not finite ({nan} NaN and {inf} infinite of {logits.size})"


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)
