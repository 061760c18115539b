"""Pseudo-labels for unlabelled images, by label propagation over a k-NN graph.

Small labelled sets come with many unlabelled images (``--unlabelled``). Label spreading
(Zhou et al., 2004) spreads the known labels along a k-nearest-neighbour graph of all
images; the images it labels confidently then train the network like labelled ones
(Iscen et al., 2019, "Label propagation for deep semi-supervised learning"). It costs
well under a second for thousands of images, so it runs once per split of the labels
before the trials, and the search chooses how confident a pseudo-label must be.

The graph is built in the feature space whose propagation labels held-out *labelled*
images best: downscaled pixels (always), or the pooled features of the starting weights
(when they are pretrained, or come from the pretraining stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch

from autoft.core.runtime import blas_alone
from autoft.data import Images, ImageTensors, image_batches

MAX_POOL = 20_000  # unlabelled images propagated to; a random subset beyond that
PIXEL_SIZE = 16  # side of the downscaled images whose pixels are features
COMPONENTS = 50  # PCA components of the pixel features
NEIGHBOURS = 10


@dataclass
class PseudoLabels:
    """Labels proposed for unlabelled images ``index`` (into the pool given), with confidences."""

    index: np.ndarray  # int64, which pool images were labelled
    labels: np.ndarray  # int64
    confidence: np.ndarray  # float, the winning class's share of the spread label mass
    features: str = "pixels"
    score: float | None = None  # accuracy on labelled images whose labels it was not given, when measured

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


def pixel_features(images: Images, size: int = PIXEL_SIZE) -> np.ndarray:
    """uint8 ``(N, 3, S, S)`` images -> standardised downscaled pixels, ``(N, 3 * size**2)``."""
    pixels = downscaled_pixels(images, size)
    features = pixels.reshape(len(pixels), -1)
    return (features - features.mean(0)) / (features.std(0) + 1e-6)


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
) -> PseudoLabels:
    """Propagate ``labels`` of the ``labelled`` uint8 images to the ``pool`` of unlabelled ones.

    ``embedders`` map a name to a function from uint8 images to features (a backbone's
    pooled features); the feature space that labels held-out labelled images best wins.
    With ``measure`` that held-out accuracy is measured (and kept) for a single space too.
    Labelled images on disk are read a batch at a time, never whole.
    """
    index = np.arange(len(pool))
    if len(pool) > MAX_POOL:
        index = np.sort(np.random.default_rng(seed).choice(len(pool), MAX_POOL, replace=False))
        pool = pool[torch.as_tensor(index)]
    labelled = labelled if isinstance(labelled, ImageTensors) else ImageTensors(labelled)
    both = ImageTensors.concat([labelled, ImageTensors(pool)])
    spaces = {"pixels": lambda: reduce(pixel_features(both), seed=seed)}
    for name, embed in (embedders or {}).items():
        spaces[name] = lambda embed=embed: reduce(np.asarray(embed(both), dtype=np.float64), seed=seed)
    best: tuple[float, str, np.ndarray] | None = None
    for name, make in spaces.items():
        features = make()
        score = held_out_accuracy(features, labels, num_classes, seed=seed) if len(spaces) > 1 or measure else 1.0
        if best is None or score > best[0]:
            best = (score, name, features)
    assert best is not None
    score, name, features = best
    known = np.concatenate([labels, np.full(len(pool), -1)])
    distribution = spread(features, known, num_classes)[len(labels) :]
    measured = score if len(spaces) > 1 or measure else None
    return PseudoLabels(index=index.astype(np.int64), labels=distribution.argmax(1).astype(np.int64), confidence=distribution.max(1), features=name, score=measured)
