"""The image size from pretrained weights, measured: a linear probe's accuracy at each size the plan affords.

Pretrained weights read images best near the size they were trained at, and worse when the
objects are much smaller than what they learned on; how much a larger input buys depends on
the images. Fine-tuning at each candidate size to find out would cost a search; a linear
probe (logistic regression on the starting weights' pooled features) on a few hundred of the
labelled images costs seconds, and is what the weights know before any fine-tuning. The
planner then takes the size the probe reads best, a larger one when it is within
:data:`~autoft.searching.calibration.TIE` (:meth:`SizeProbe.choose`). The candidates start at
the images' own size: the probe never picks a size below it.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from autoft.core.text import duration
from autoft.data.decoding import decode_all, stratified_split
from autoft.searching.calibration import SizeProbe, Throughput
from autoft.searching.planning import DECODE_PIXEL_SECONDS, DECODE_SECONDS, LOGISTIC_FIXED, LOGISTIC_SECONDS, PROBE_FEATURES, _scaled
from autoft.specs import LabelledImages
from autoft.training.baselines import fit_logistic

PROBE_IMAGES = 500  # labelled images the probe reads at each size: enough to rank sizes a few points apart
PROBE_SHARE = 0.05  # of the time left: the most the probe may cost, else the plan's stages choose the size
PROBE_FOLDS = 5  # every image is scored once, by k-fold cross-validation: on 80 images a 30% split scored 24 and read 0.92 at both sizes
PROBE_LEAST = 40  # fewer labelled images rank sizes by noise


def probe_seconds(images: int, sizes: Sequence[int], rates: dict[int, Throughput], classes: int, source_side: int | None) -> float:
    """What measuring costs: decoding ``images`` at each size, embedding them, one logistic regression a size."""
    decode = images * (DECODE_SECONDS + DECODE_PIXEL_SECONDS * (source_side or 64) ** 2)
    train = images * (1 - 1 / PROBE_FOLDS)
    logistic = PROBE_FOLDS * (LOGISTIC_FIXED + LOGISTIC_SECONDS * train * PROBE_FEATURES * max(2, classes))
    return sum(decode + images / (rates.get(size) or _scaled(rates, size)).evaluate + logistic for size in sizes)


def measure_sizes(
    labelled: LabelledImages, sizes: Sequence[int], rates: dict[int, Throughput], embed: Callable[[], Callable], *, limit: float | None,
    source_side: int | None = None, seed: int = 0,
) -> SizeProbe:
    """The probe's held-out accuracy at each of ``sizes`` (smallest first) on at most
    :data:`PROBE_IMAGES` labelled images (never the test split); ``embed()`` gives the
    starting weights' ``images -> features``. Measured only when its estimated cost fits in
    ``limit`` seconds; it stops early past twice that, keeping the sizes read so far."""
    rows, labels = _sample(labelled, seed)
    classes = len(np.unique(labels))
    cost = probe_seconds(len(rows), sizes, rates, classes, source_side)
    if len(rows) < PROBE_LEAST or classes < 2:
        return SizeProbe({}, len(rows), skipped=f"{len(rows)} labelled images of {classes} classes are too few to rank sizes by")
    if limit is not None and cost > limit:
        return SizeProbe({}, len(rows), skipped=f"{len(rows)} images at {', '.join(map(str, sizes))} px need {duration(cost)}, over {duration(limit)}")
    started, features_of = time.perf_counter(), embed()
    samples = [labelled.samples[i] for i in rows]
    accuracies: dict[int, float] = {}
    for size in sorted(sizes):
        images, kept, _ = decode_all(samples, size)
        samples, labels = [samples[i] for i in kept], labels[kept]  # an unreadable file is left out at every size
        if len(samples) < PROBE_LEAST:
            return SizeProbe({}, len(samples), time.perf_counter() - started, skipped=f"only {len(samples)} of its images could be read")
        accuracies[size] = _accuracy(np.asarray(features_of(images), dtype=np.float64), labels, seed)
        if limit is not None and time.perf_counter() - started > 2 * limit:
            break
    return SizeProbe(accuracies, len(samples), time.perf_counter() - started)


def _sample(labelled: LabelledImages, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows of at most :data:`PROBE_IMAGES` labelled images outside the test split, their labels), drawn at random."""
    every = np.asarray(labelled.labels, dtype=np.int64)
    rows = np.arange(len(every)) if labelled.splits is None else np.flatnonzero(np.asarray(labelled.splits) != "test")
    if len(rows) > PROBE_IMAGES:
        rows = np.sort(np.random.default_rng(seed).choice(rows, PROBE_IMAGES, replace=False))
    return rows, every[rows]


def _accuracy(features: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """Held-out accuracy of the references' logistic regression on ``features``, every image
    scored once by stratified k-fold cross-validation (fewer folds for a rare class)."""
    from sklearn.model_selection import StratifiedKFold

    folds = min(PROBE_FOLDS, int(np.bincount(labels)[np.unique(labels)].min()))
    if folds < 2:  # a class of one image: one split, that image in training
        train, val = stratified_split(labels, 1 / PROBE_FOLDS, seed)
        return float(fit_logistic(features[train], labels[train]).score(features[val], labels[val]))
    correct = sum(int((fit_logistic(features[train], labels[train]).predict(features[val]) == labels[val]).sum())
                  for train, val in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, labels))  # fmt: skip
    return correct / len(labels)

