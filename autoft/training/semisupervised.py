"""Pseudo-labels for unlabelled images, by label propagation over a k-NN graph.

Small labelled sets come with many unlabelled images (``--unlabelled``). Label spreading
(Zhou et al., 2004) spreads the known labels along a k-nearest-neighbour graph of all
images; the images it labels confidently then train the network like labelled ones
(Iscen et al., 2019, "Label propagation for deep semi-supervised learning"). It costs
well under a second for thousands of images, so it runs once per split of the labels
before the trials, and the search chooses how confident a pseudo-label must be.

The graph is built in the feature space whose propagation labels held-out *labelled*
images best: downscaled pixels, standardised or compared by their angle (:data:`PIXEL_SPACES`),
or the pooled features of the starting weights (when they are pretrained, or come from the
pretraining stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

from autoft.core.runtime import blas_alone
from autoft.data import Images, ImageTensors, image_batches

MAX_POOL = 20_000  # unlabelled images propagated to; a random subset beyond that
PIXEL_SIZE = 16  # side of the downscaled images whose pixels are features
COMPONENTS = 50  # PCA components of the pixel features
NEIGHBOURS = 10


@dataclass(frozen=True)
class PixelSpace:
    """How downscaled pixels become a feature vector: centred on the images' mean pixel,
    each pixel scaled to unit variance, and each image scaled to unit length (so that
    neighbours are near in angle, whatever an image's brightness)."""

    centre: bool
    standardise: bool
    normalise: bool

    def fit(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(offset, scale) from ``pixels`` ``(N, D)``: the features are ``(x - offset) / scale``, then normalised."""
        offset = pixels.mean(0) if self.centre else np.zeros(pixels.shape[1])
        scale = pixels.std(0) + 1e-6 if self.standardise else np.ones(pixels.shape[1])
        return offset, scale

    def transform(self, pixels: np.ndarray, offset: np.ndarray, scale: np.ndarray) -> np.ndarray:
        features = (pixels - offset) / scale
        if self.normalise:
            features = features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-12)
        return features


# Which suits depends on the images (labels spread over 100 labelled and 1,160 unlabelled
# images, then scored on the test split: digits 0.88 standardised and 0.92 by angle; gray
# scenes 0.29 and 0.14; textures 0.44, 0.43 centred and 0.67 centred by angle), so each is
# measured on the labelled images and the best one used (:func:`pseudo_label`).
PIXEL_SPACES = {
    "pixels": PixelSpace(centre=True, standardise=True, normalise=False),
    "pixels by angle": PixelSpace(centre=False, standardise=False, normalise=True),
    "centred pixels by angle": PixelSpace(centre=True, standardise=False, normalise=True),
}


@dataclass
class PseudoLabels:
    """Labels proposed for unlabelled images ``index`` (into the pool given), with confidences."""

    index: np.ndarray  # int64, which pool images were labelled
    labels: np.ndarray  # int64
    confidence: np.ndarray  # float, the winning class's share of the spread label mass
    features: str = "pixels"
    score: float | None = None  # accuracy on labelled images whose labels it was not given, when measured
    scores: dict[str, float] = field(default_factory=dict)  # that accuracy in each space measured

    def most_confident(self, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """(pool indices, labels) of the ``fraction`` of pseudo-labels with the highest confidence.

        A share rather than a confidence threshold: the spread of confidences depends on the
        number of classes and the graph, while "the surest 60%" means the same everywhere.
        """
        count = int(round(min(max(fraction, 0.0), 1.0) * len(self.labels)))
        keep = np.sort(np.argsort(-self.confidence, kind="stable")[:count])
        return self.index[keep], self.labels[keep]


def downscaled_pixels(images: Images, size: int = PIXEL_SIZE) -> np.ndarray:
    """uint8 ``(N, 3, S, S)`` images (a set on disk is read a batch at a time) -> float32
    ``(N, 3, size, size)`` in [0, 1], averaged down to ``size`` when larger."""
    out = []
    for batch in image_batches(images, 1024):
        batch = batch.float().div_(255)
        if batch.shape[-1] > size:
            batch = torch.nn.functional.adaptive_avg_pool2d(batch, size)
        out.append(batch.numpy())
    return np.concatenate(out) if out else np.zeros((0, 3, size, size), np.float32)


def pixel_features(images: Images, space: str = "pixels", size: int = PIXEL_SIZE) -> np.ndarray:
    """uint8 ``(N, 3, S, S)`` images -> downscaled pixels in one of :data:`PIXEL_SPACES`, ``(N, 3 * size**2)``."""
    pixels = downscaled_pixels(images, size)
    pixels = pixels.reshape(len(pixels), -1).astype(np.float64)
    kind = PIXEL_SPACES[space]
    return kind.transform(pixels, *kind.fit(pixels))


def reduce(features: np.ndarray, components: int = COMPONENTS, seed: int = 0) -> np.ndarray:
    from sklearn.decomposition import PCA

    n = min(components, features.shape[1], len(features) - 1)
    if n < 2:
        return features
    return PCA(n, random_state=seed).fit_transform(features)


def spread(features: np.ndarray, labels: np.ndarray, num_classes: int, neighbours: int = NEIGHBOURS) -> np.ndarray:
    """Label distributions ``(N, num_classes)`` for every row; ``labels`` is -1 where unknown."""
    from sklearn.semi_supervised import LabelSpreading

    model = LabelSpreading(kernel="knn", n_neighbors=max(2, min(neighbours, len(features) - 1)), alpha=0.2, max_iter=100)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter reached: the distribution is still usable
        model.fit(features, labels)
    distribution = np.zeros((len(features), num_classes))
    distribution[:, model.classes_[model.classes_ >= 0]] = model.label_distributions_
    total = distribution.sum(1, keepdims=True)
    return np.divide(distribution, total, out=np.full_like(distribution, 1.0 / num_classes), where=total > 0)


def held_out_accuracy(features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int = 5, seed: int = 0) -> float:
    """How well propagation labels labelled images whose labels it was not given.

    ``features`` holds the labelled rows first (``len(labels)`` of them), then the pool.
    """
    from sklearn.model_selection import StratifiedKFold

    n = len(labels)
    smallest = int(np.bincount(labels)[np.bincount(labels) > 0].min())
    k = max(2, min(folds, smallest))
    if smallest < 2:
        return 0.0
    correct = 0
    for keep, hide in StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(n), labels):
        known = np.full(len(features), -1)
        known[keep] = labels[keep]
        correct += int((spread(features, known, num_classes)[hide].argmax(1) == labels[hide]).sum())
    return correct / n


@blas_alone
def pseudo_label(
    labelled: Images,
    labels: np.ndarray,
    pool: torch.Tensor,
    num_classes: int,
    *,
    embedders: Mapping[str, Callable[[Images], np.ndarray]] | None = None,
    seed: int = 0,
    measure: bool = False,
    space: str | None = None,
) -> PseudoLabels:
    """Propagate ``labels`` of the ``labelled`` uint8 images to the ``pool`` of unlabelled ones.

    The graph is built in ``space`` when given (a name of :data:`PIXEL_SPACES` or of
    ``embedders``); otherwise in each of them, and the one whose propagation labels held-out
    labelled images best wins. ``embedders`` map a name to a function from uint8 images to
    features (a backbone's pooled features). With ``measure`` that held-out accuracy is
    measured (and kept) for a given space too. Labelled images on disk are read a batch at a
    time, never whole.
    """
    index = np.arange(len(pool))
    if len(pool) > MAX_POOL:
        index = np.sort(np.random.default_rng(seed).choice(len(pool), MAX_POOL, replace=False))
        pool = pool[torch.as_tensor(index)]
    labelled = labelled if isinstance(labelled, ImageTensors) else ImageTensors(labelled)
    both = ImageTensors.concat([labelled, ImageTensors(pool)])
    spaces = {name: lambda name=name: reduce(pixel_features(both, name), seed=seed) for name in PIXEL_SPACES}
    for name, embed in (embedders or {}).items():  # the unlabelled pool apart: an embedder may keep its features (Probe.embed)
        spaces[name] = lambda embed=embed: reduce(np.concatenate([embed(labelled), embed(pool)]).astype(np.float64), seed=seed)
    if space is not None:
        spaces = {space: spaces[space]}
    scores: dict[str, float] = {}
    best: tuple[float, str, np.ndarray] | None = None
    for name, make in spaces.items():
        features = make()
        score = scores[name] = held_out_accuracy(features, labels, num_classes, seed=seed) if len(spaces) > 1 or measure else 1.0
        if best is None or score > best[0]:
            best = (score, name, features)
    assert best is not None
    score, name, features = best
    known = np.concatenate([labels, np.full(len(pool), -1)])
    distribution = spread(features, known, num_classes)[len(labels) :]
    measured = len(spaces) > 1 or measure
    return PseudoLabels(
        index=index.astype(np.int64), labels=distribution.argmax(1).astype(np.int64), confidence=distribution.max(1), features=name,
        score=score if measured else None, scores=scores if measured else {},
    )  # fmt: skip


def pseudo_labels(cache: dict[int, PseudoLabels], pool: ImageTensors, unlabelled: torch.Tensor, num_classes: int, embedders: Mapping[str, Callable],
                  seed: int, split: int | None, train_index: np.ndarray) -> PseudoLabels:  # fmt: skip
    """Pseudo-labels propagated from split ``split``'s training labels only (``None``: every
    labelled image), so that no validation label leaks into what trains on them; kept in
    ``cache``, so trials and label spreading's candidate share one computation per split.

    The feature space of the graph is chosen once, on every labelled image (the space whose
    propagation labels held-out labelled images best, :func:`pseudo_label`), and each split
    spreads in it: measuring every space on every split would cost seconds a split on
    thousands of images. The choice among a few spaces sees the validation labels; the
    labels spread do not."""
    if -1 not in cache:
        cache[-1] = pseudo_label(pool, pool.labels.numpy(), unlabelled, num_classes, embedders=embedders, seed=seed, measure=True)
    key = -1 if split is None else split
    if key not in cache:
        labelled = pool.subset(train_index)  # read a batch at a time if it is on disk
        cache[key] = pseudo_label(labelled, labelled.labels.numpy(), unlabelled, num_classes, embedders=embedders, seed=seed, space=cache[-1].features)
    return cache[key]
