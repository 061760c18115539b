"""Classify image files with an exported model, through onnxruntime."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from autoft.data import find_images, warn_left_out
from autoft.data.decoding import decode_all
from autoft.errors import AutoftError
from autoft.deploy.inference import OnnxClassifier, non_finite_reason, softmax, to_pixels


# A prediction is "near-uniform" when its top probability is within this share of the way
# from chance (1/classes) to certainty; a model whose predictions mostly are has not learned.
NEAR_UNIFORM_SHARE = 0.1
MOSTLY = 0.8
# "One class for every image" says little about a handful of images (they may all be cats).
MIN_IMAGES_FOR_ONE_CLASS = 16


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
    classifier = (model if isinstance(model, OnnxClassifier) else OnnxClassifier.load(model, device)).probe()
    files = expand_paths(paths)
    top: list[np.ndarray] = []  # each image's top probability and class: enough to tell a degenerate model
    predicted: list[np.ndarray] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images, kept, skipped = decode_all(chunk, classifier.image_size)
        for source, reason in skipped:
            warnings.warn(f"skipped {source}: {reason}", stacklevel=2)
        if not kept:
            continue
        logits = classifier.logits(to_pixels(list(images.numpy()), classifier.image_size))
        if not np.isfinite(logits).all():  # NaN is not JSON, and not a prediction
            bad = [str(chunk[index]) for index, row in zip(kept, logits) if not np.isfinite(row).all()]
            raise AutoftError(f"{non_finite_reason(logits)} for {len(bad)} image(s), first {bad[0]}; the model's weights are likely corrupt")
        probabilities = softmax(logits)
        top.append(probabilities.max(axis=1))
        predicted.append(probabilities.argmax(axis=1))
        for index, labels in zip(kept, classifier.top_k(probabilities, top_k)):
            yield Prediction(str(chunk[index]), labels)
    if top:
        problem = _degenerate(np.concatenate(top), np.concatenate(predicted), classifier.classes)
        if problem:
            warnings.warn(problem, stacklevel=2)


def predict(model, paths, *, top_k: int = 5, batch_size: int = 32, device: str = "auto") -> list[Prediction]:
    return list(predict_iter(model, paths, top_k=top_k, batch_size=batch_size, device=device))


def degenerate_predictions(probabilities: np.ndarray, classes: Sequence[str] | None = None) -> str | None:
    """A one-line warning when a model's predictions on a batch carry no information, else ``None``.

    ``probabilities`` is ``(images, classes)``. Two signs: most top probabilities are close to
    chance (1/classes), or one class is predicted for every image of a batch big enough for
    that to mean something.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or not len(probabilities):
        return None
    names = list(classes) if classes is not None else [str(i) for i in range(probabilities.shape[1])]
    return _degenerate(probabilities.max(axis=1), probabilities.argmax(axis=1), names)


def _degenerate(top: np.ndarray, predicted: np.ndarray, classes: Sequence[str]) -> str | None:
    n, chance = len(top), 1.0 / max(len(classes), 1)
    limit = chance + NEAR_UNIFORM_SHARE * (1.0 - chance)
    near_uniform = float(np.mean(top <= limit))
    if len(classes) > 1 and near_uniform >= MOSTLY:
        return (
            f"the model's predictions are near-uniform: for {near_uniform:.0%} of {n} image(s) the top probability is at most "
            f"{limit:.3f}, against {chance:.3f} for a guess among {len(classes)} classes; it has likely not learned (check its validation accuracy)"
        )
    if len(classes) > 1 and n >= MIN_IMAGES_FOR_ONE_CLASS and len(set(predicted.tolist())) == 1:
        return (
            f"the model predicted {classes[int(predicted[0])]!r} for all {n} images; unless they all are, "
            "it has collapsed to one class (check its validation accuracy and confusion matrix)"
        )
    return None
