"""Simple models as candidates: scored on the trials' splits, and shippable when they win.

Each candidate is fitted on exactly the train/validation split, or folds, that score the
trials, so its held-out probabilities are the same evidence as a trial's
``predictions.npy``; when selection picks it, :meth:`Candidate.refit` fits it on every
labelled image and writes an ordinary ``model.pt`` (:mod:`autoft.model.candidate_modules` rebuilds
its module) that export, ``autoft predict`` and ``autoft serve`` take as they take a trained
backbone's.

- **logistic regression on pixels**: :func:`autoft.training.baselines.pixel_baseline`, unchanged;
- **a linear probe** on a backbone's L2-normalised pooled features (its starting weights,
  random or pretrained): :func:`autoft.training.baselines.probe_baseline`, unchanged, shipped as
  that backbone with the probe as its head;
- **the linear probe on spread labels** (pretrained weights, with unlabelled images, when the
  plan buys it): the same, fitted also on every unlabelled image label spreading labelled from
  the split's training labels (:class:`SpreadProbeFitter`), shipped the same way;
- **label spreading (k-NN)**: labels spread from the split's labelled images to the
  unlabelled ones (:func:`autoft.training.semisupervised.pseudo_label`, the trials' own), then
  a new image takes the labels of its 10 nearest labelled and label-spread images, one vote
  each, in a space of downscaled pixels. Spreading labels is no model of new
  images; its nearest neighbours are: what spreading would give a new image joining the graph.
"""

from __future__ import annotations

import re

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np
import torch

from autoft.model.backbones import build_backbone
from autoft.training.baselines import BaselineResult, Score, Split, fit_and_score, fit_logistic, pixel_baseline, probe_baseline
from autoft.model.candidate_modules import NEIGHBOURS, PIXELS, PROBE, fold_linear, neighbours_backbone, pixel_backbone, probe_backbone
from autoft.model.checkpoints import save_checkpoint
from autoft.data import Images, ImageTensors
from autoft.training.semisupervised import PIXEL_SIZE, PIXEL_SPACES, PseudoLabels, downscaled_pixels, pseudo_labels
from autoft.specs import Backbone

PIXELS_NAME = "logistic regression on pixels"
SPREAD_NAME = "label spreading (k-NN)"
# Every spread label, the 10 nearest one vote each. On the test splits of 100 labelled digits and
# 1,157 unlabelled (three draws), that scored 0.950, 0.972 and 0.952, where logistic regression on
# the labelled images and the surest 60% of spread labels (the student this replaced) scored
# 0.922, 0.919 and 0.937; on 20 labelled textures with 1,660 unlabelled, 0.655 against 0.335.
# Where spreading is poor (20 labelled photos, 4 classes: 0.36) its cross-validated score says so.
STUDENT_NEIGHBOURS = 10
COMPONENTS = 50
KEPT = 4  # image sets whose features a Probe keeps
PseudoSource = Callable[[int | None, np.ndarray], PseudoLabels]  # (split or None for all, train indices) -> pseudo-labels


class Fitter(Protocol):
    """How a candidate fits on every labelled image: its module, and what its checkpoint records."""

    def fit_all(self, classes: int) -> tuple[Backbone, str, dict]:
        """(the fitted module as a Backbone, the checkpoint's ``backbone`` name, its ``candidate`` record)."""
        ...


@dataclass
class Candidate:
    """A simple model scored like a trial. ``index`` and ``probabilities`` are what a trial
    writes to ``predictions.npy``: pool indices held out by some split (sorted), and their
    probabilities averaged over the splits that held them out. ``split_scores`` are the
    metric on each split's validation images, in the order of the splits; ``value`` is their
    mean, as a trial's is. ``reference`` is the same fit as a baseline (its value pooled over
    the validation rows, the numbers the summary has always quoted)."""

    name: str
    kind: str
    index: np.ndarray
    probabilities: np.ndarray
    split_scores: list[float]
    seconds: float
    reference: BaselineResult
    classes: list[str]
    image_size: int
    fitter: Fitter = field(repr=False)
    spread: bool = False  # it learns from labels spread to the unlabelled images

    @property
    def value(self) -> float:
        return float(np.mean(self.split_scores))

    def predicted(self, index: np.ndarray) -> np.ndarray | None:
        """Its probabilities for pool images ``index``, or None when it did not hold them all out."""
        rows = np.minimum(np.searchsorted(self.index, index), len(self.index) - 1)
        return self.probabilities[rows] if np.array_equal(self.index[rows], index) else None

    @property
    def file_name(self) -> str:
        """``logistic-regression-on-pixels.pt``: its checkpoint's name in a search's ``refit/``."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") + ".pt"

    def refit(self, path: Path, *, data: str | None = None, seed: int = 0) -> Path:
        """Fit on every labelled image and write its checkpoint to ``path``; ``data`` and
        ``seed`` record the images, as a trial's checkpoint does, so export verifies on them."""
        backbone, name, record = self.fitter.fit_all(len(self.classes))
        params = {"candidate": self.name}
        return save_checkpoint(Path(path), backbone_name=name, backbone=backbone, classes=self.classes, image_size=self.image_size,
                               params=params, data=data, seed=seed, candidate=record)  # fmt: skip


def fit_candidates(
    pool: ImageTensors,
    splits: Sequence[Split],
    classes: list[str],
    score: Score,
    *,
    probe: "Probe | None" = None,
    unlabelled: torch.Tensor | None = None,
    pseudo: PseudoSource | None = None,
    spread_probe: bool = False,
    seed: int = 0,
) -> list[Candidate]:
    """Every simple model the data allows, scored on ``splits`` (into the labelled ``pool``):
    logistic regression on pixels; the linear probe when ``probe`` is given, and with
    ``spread_probe`` the probe on spread labels too; label spreading's nearest neighbours when
    there are ``unlabelled`` images. ``pseudo`` gives a split's pseudo-labels (a search passes
    its own, computed once per split); by default they are propagated here, in the probe's
    feature space as well as the pixels'."""
    labels = pool.labels.numpy()
    found = [_candidate(pixel_baseline(pool, labels, splits, len(classes), score), PIXELS, PixelFitter(pool), splits, labels, score, classes, pool)]
    if probe is not None:
        reference = probe_baseline(probe.embed, pool, labels, splits, len(classes), score, probe.label)
        found.append(_candidate(reference, PROBE, ProbeFitter(pool, probe), splits, labels, score, classes, pool))
    if unlabelled is not None and len(unlabelled):
        embedders = {"start": probe.embed} if probe is not None else {}
        source = pseudo or _propagation(pool, unlabelled, len(classes), embedders, seed)
        if probe is not None and spread_probe:
            spread = SpreadProbeFitter(pool, probe, unlabelled, source)
            found.append(_candidate(spread.baseline(splits, len(classes), score), PROBE, spread, splits, labels, score, classes, pool, spread=True))
        student = SpreadFitter(pool, unlabelled, source)
        found.append(_candidate(student.baseline(splits, len(classes), score), NEIGHBOURS, student, splits, labels, score, classes, pool, spread=True))
    return found


def _candidate(
    reference: BaselineResult, kind: str, fitter: Fitter, splits: Sequence[Split], labels: np.ndarray, score: Score, classes: list[str], pool: ImageTensors, spread: bool = False,
) -> Candidate:
    index, probabilities = held_out(splits, reference.probabilities, len(labels))
    scores, start = [], 0
    for _, val in splits:
        scores.append(float(score(labels[val], reference.probabilities[start : start + len(val)])))
        start += len(val)
    return Candidate(reference.name, kind, index, probabilities, scores, reference.seconds, reference, list(classes), int(pool.image_shape[-1]), fitter, spread)


def held_out(splits: Sequence[Split], rows: np.ndarray, pool_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted pool indices, probabilities) from ``rows`` stacked in the order of the splits'
    validation indices; an image held out by several splits (repeated folds) gets their mean."""
    order = np.concatenate([val for _, val in splits])
    total = np.zeros((pool_size, rows.shape[1]))
    counts = np.zeros(pool_size)
    np.add.at(total, order, rows)
    np.add.at(counts, order, 1)
    seen = np.flatnonzero(counts)
    return seen, (total[seen] / counts[seen, None]).astype(np.float32)


def flat_pixels(images: Images) -> np.ndarray:
    pixels = downscaled_pixels(images, PIXEL_SIZE)
    return pixels.reshape(len(pixels), -1)


# ---------------------------------------------------------------------------
# Logistic regression on pixels


@dataclass
class PixelFitter:
    pool: ImageTensors

    def fit_model(self):
        """The pipeline on the images' downscaled pixels in [0, 1], as the reference fits it."""
        return fit_logistic(flat_pixels(self.pool), self.pool.labels.numpy(), standardise=False)

    def fit_all(self, classes: int) -> tuple[Backbone, str, dict]:
        return pixel_module(self.fit_model(), int(self.pool.image_shape[-1]), classes), "pixels", {"kind": PIXELS, "side": PIXEL_SIZE}


def pixel_module(model, image_size: int, classes: int, offset: np.ndarray | None = None, scale: np.ndarray | None = None) -> Backbone:
    backbone = pixel_backbone(image_size, PIXEL_SIZE, classes)
    fold_linear(backbone.model.linear, model, classes, offset, scale)
    return backbone


# ---------------------------------------------------------------------------
# The linear probe


@dataclass
class Probe:
    """The backbone whose pooled features a linear probe reads: built once, with its
    starting ``weights`` (None for random ones, a source's tag, or a file)."""

    backbone_name: str
    weights: str | None
    backbone: Backbone
    device: torch.device
    _kept: dict[int, tuple[Images, np.ndarray]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, backbone_name: str, weights: str | None, classes: int, *, registry=None, device: str | torch.device = "cpu", seed: int = 0) -> "Probe":
        from autoft.core.runtime import seed_everything

        seed_everything(seed)  # random weights are the same as the search's own embedder's
        backbone = build_backbone(backbone_name, num_classes=classes, weights=weights, registry=registry)
        device = torch.device(device)
        backbone.model.to(device).eval()
        return cls(backbone_name, weights, backbone, device)

    @property
    def label(self) -> str:
        return f"{self.weights or 'random'} {self.backbone_name}"

    def embed(self, images: Images) -> np.ndarray:
        """Pooled features of ``images``. Those of the last :data:`KEPT` image sets are kept,
        known by identity (never changed in place): a search asks for its unlabelled images'
        features once per split of the labels, to spread them, and once more for the probe
        on spread labels; they are computed once."""
        from autoft.training.pretraining import embed_all

        kept = self._kept.pop(id(images), None)
        if kept is None or kept[0] is not images:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kept = (images, embed_all(self.backbone, images, self.device).numpy())
        self._kept[id(images)] = kept  # holding the images: their id is not reused while kept
        while len(self._kept) > KEPT:
            del self._kept[next(iter(self._kept))]  # the least recently asked for
        return kept[1]


@dataclass
class ProbeFitter:
    pool: ImageTensors
    probe: Probe

    def features(self) -> np.ndarray:
        return np.asarray(self.probe.embed(self.pool), dtype=np.float64)

    def fit_model(self):
        return fit_logistic(self.features(), self.pool.labels.numpy())

    def fit_all(self, classes: int) -> tuple[Backbone, str, dict]:
        model = self.fit_model()
        backbone = probe_backbone(self.probe.backbone, classes)
        backbone.model.head.to(self.probe.device)
        fold_linear(backbone.model.head, model, classes)
        return backbone, self.probe.backbone_name, {"kind": PROBE, "weights": self.probe.weights}


@dataclass
class SpreadProbeFitter(ProbeFitter):
    """The linear probe fitted on the labelled images and on every unlabelled image label
    spreading labelled from them: the trials' own pseudo-labels, from each split's training
    labels only. On lite0's ImageNet features, scored on the test images against the probe on
    the labelled images alone: photo-96 0.948 -> 0.974, digits 0.690 -> 0.806 (the tuning
    half), textures 0.980 -> 0.995; where spreading labels badly (gray-scenes-20, 20 classes:
    63% of held-out labelled images right) 0.607 -> 0.575, as its cross-validated score says.
    The surest 60% or 30% of the spread labels did worse on the tuning half (0.961, 0.961 on
    photo-96; 0.785, 0.738 on digits)."""

    unlabelled: torch.Tensor
    pseudo: PseudoSource

    def spread_rows(self, split: int | None, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of the unlabelled images spread labelled from ``train``'s labels."""
        spread = self.pseudo(split, train)
        return self.probe.embed(self.unlabelled)[spread.index], spread.labels

    def baseline(self, splits: Sequence[Split], classes: int, score: Score) -> BaselineResult:
        name = f"linear probe on {self.probe.label} features and spread labels"
        return fit_and_score(self.features(), self.pool.labels.numpy(), splits, classes, score, name, extra=self.spread_rows)

    def fit_model(self):
        more, labels = self.spread_rows(None, np.arange(len(self.pool)))
        return fit_logistic(np.concatenate([self.features(), more]), np.concatenate([self.pool.labels.numpy(), labels]))


# ---------------------------------------------------------------------------
# Label spreading, as the nearest neighbours among the images it labelled


class PixelNormaliser:
    """A scikit-learn transformer: one of :data:`PIXEL_SPACES` fitted on the pixels it is given."""

    def __init__(self, space: str):
        self.space = space

    def fit(self, pixels: np.ndarray, labels=None) -> "PixelNormaliser":
        self.offset_, self.scale_ = PIXEL_SPACES[self.space].fit(pixels)
        return self

    def transform(self, pixels: np.ndarray) -> np.ndarray:
        return PIXEL_SPACES[self.space].transform(np.asarray(pixels, np.float64), self.offset_, self.scale_)


def _propagation(pool: ImageTensors, unlabelled: torch.Tensor, classes: int, embedders: Mapping[str, Callable], seed: int) -> PseudoSource:
    cache: dict[int, PseudoLabels] = {}

    def spread(split: int | None, train: np.ndarray) -> PseudoLabels:
        return pseudo_labels(cache, pool, unlabelled, classes, embedders, seed, split, train)

    return spread


@dataclass
class SpreadFitter:
    pool: ImageTensors
    unlabelled: torch.Tensor
    pseudo: PseudoSource
    _pixels: np.ndarray | None = field(default=None, repr=False)

    def pixels(self) -> np.ndarray:
        """Downscaled pixels of the labelled pool, computed once (those of the unlabelled
        images are computed split by split, for the ones spreading labelled)."""
        if self._pixels is None:
            self._pixels = flat_pixels(self.pool)
        return self._pixels

    def space(self) -> str:
        """The pixel space the neighbours are found in: the one whose spreading labelled
        held-out labelled images best (the graph's own, unless a backbone's features won)."""
        every = self.pseudo(None, np.arange(len(self.pool)))
        if every.features in PIXEL_SPACES:
            return every.features
        pixel = {name: score for name, score in every.scores.items() if name in PIXEL_SPACES}
        return max(pixel, key=pixel.get) if pixel else "pixels"

    def references(self, split: int | None, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(downscaled pixels, labels) of one split's labelled images and every image spread labelled from them."""
        spread = self.pseudo(split, train)
        features = np.concatenate([self.pixels()[train], flat_pixels(self.unlabelled[torch.as_tensor(spread.index)])])
        return features, np.concatenate([self.pool.labels.numpy()[train], spread.labels])

    def fit(self, split: int | None, train: np.ndarray, references: tuple[np.ndarray, np.ndarray] | None = None):
        """The model of one split: its labelled images and every label spread from them, as
        references of a k-nearest-neighbour classifier (``references``: :meth:`references`'
        answer for this split, when the caller has it already)."""
        from sklearn.decomposition import PCA
        from sklearn.neighbors import KNeighborsClassifier
        from sklearn.pipeline import make_pipeline

        features, labels = references or self.references(split, train)
        components = max(1, min(COMPONENTS, features.shape[1], len(features) - 1))
        neighbours = KNeighborsClassifier(min(STUDENT_NEIGHBOURS, len(features)), algorithm="brute")
        return make_pipeline(PixelNormaliser(self.space()), PCA(components, random_state=0), neighbours).fit(features, labels)

    def baseline(self, splits: Sequence[Split], classes: int, score: Score) -> BaselineResult:
        started = time.perf_counter()
        labelled = self.pixels()
        rows = []
        for number, (train, val) in enumerate(splits):
            model = self.fit(number, train)
            proba = np.zeros((len(val), classes))
            proba[:, model.classes_] = model.predict_proba(labelled[val])
            rows.append(proba)
        stacked = np.concatenate(rows)
        order = np.concatenate([val for _, val in splits])
        value = float(score(self.pool.labels.numpy()[order], stacked))
        return BaselineResult(SPREAD_NAME, value, time.perf_counter() - started, stacked)

    def fit_model(self):
        return self.fit(None, np.arange(len(self.pool)))

    def fit_all(self, classes: int) -> tuple[Backbone, str, dict]:
        every = np.arange(len(self.pool))
        features, labels = self.references(None, every)
        model = self.fit(None, every, (features, labels))
        normaliser, pca, neighbours = (step for _, step in model.steps)
        shape = {"references": len(labels), "components": int(pca.n_components_), "neighbours": int(neighbours.n_neighbors), "normalise": PIXEL_SPACES[normaliser.space].normalise}
        backbone = neighbours_backbone(int(self.pool.image_shape[-1]), PIXEL_SIZE, classes, **shape)
        state = {"offset": normaliser.offset_, "scale": normaliser.scale_, "centre": pca.mean_, "components": pca.components_,
                 "references": model[:-1].transform(features), "votes": np.eye(classes)[labels]}  # fmt: skip
        with torch.no_grad():
            for name, value in state.items():
                getattr(backbone.model, name).copy_(torch.as_tensor(np.asarray(value, np.float64)))
        return backbone, "pixels", {"kind": NEIGHBOURS, "side": PIXEL_SIZE, **shape}
