"""Classify image files with an exported model, through onnxruntime."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from autoft.data import decode_all, find_images, warn_left_out
from autoft.errors import AutoftError
from autoft.inference import OnnxClassifier, to_pixels


@dataclass
class Prediction:
    path: str
    labels: list[tuple[str, float]]  # (label, probability), most likely first


def expand_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given; folders searched recursively for images, by the rule of :func:`autoft.data.find_images`.

    A missing path is an error; what a folder scan leaves out is one warning.
    """
    files: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found, left_out = find_images(path)
            warn_left_out(path, left_out)
            if not found:
                warnings.warn(f"no images in {path}", stacklevel=2)
            files += found
        else:
            raise AutoftError(f"not found: {given}")
    if not files:
        raise AutoftError("no images to classify")
    return files


def predict_iter(
    model: str | os.PathLike | OnnxClassifier,
    paths: Sequence[str | os.PathLike],
    *,
    top_k: int = 5,
    batch_size: int = 32,
    device: str = "auto",
) -> Iterator[Prediction]:
    """Predictions in input order, a batch at a time; unreadable images are warned about and skipped."""
    if top_k < 1 or batch_size < 1:
        raise AutoftError("--top-k and --batch-size must be at least 1")
    classifier = model if isinstance(model, OnnxClassifier) else OnnxClassifier.load(model, device)
    files = expand_paths(paths)
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images, kept, skipped = decode_all(chunk, classifier.image_size)
        for source, reason in skipped:
            warnings.warn(f"skipped {source}: {reason}", stacklevel=2)
        if not kept:
            continue
        probabilities = classifier.probabilities(to_pixels(list(images.numpy()), classifier.image_size))
        for index, labels in zip(kept, classifier.top_k(probabilities, top_k)):
            yield Prediction(str(chunk[index]), labels)


def predict(model, paths, *, top_k: int = 5, batch_size: int = 32, device: str = "auto") -> list[Prediction]:
    return list(predict_iter(model, paths, top_k=top_k, batch_size=batch_size, device=device))
