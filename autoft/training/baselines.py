"""Reference models every search is measured against, scored on the trials' own splits.

An AutoML search must beat what a user could write in one line. Before the trials, two
quick references are fitted on exactly the validation split, or the folds, that score
the trials:

- logistic regression on the downscaled pixels;
- a linear probe (logistic regression) on the starting backbone's pooled features.

Their out-of-fold probabilities are kept too: the summary compares the best model with
them, and says so plainly when it does not win.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from autoft.core.runtime import blas_alone
from autoft.data import Images, ImageTensors
from autoft.training.semisupervised import downscaled_pixels

Score = Callable[[np.ndarray, np.ndarray], float]  # (labels, probabilities) -> metric value
Split = tuple[np.ndarray, np.ndarray]  # (train indices, validation indices) into the labelled pool


@dataclass
class BaselineResult:
    name: str
    value: float  # the metric over the validation images of every split, pooled
    seconds: float
    probabilities: np.ndarray  # (n_validated, num_classes), in the order of the splits' validation indices

    def describe(self, metric: str) -> str:
        return f"{self.name} {self.value:.4f}"


@blas_alone
def fit_logistic(features: np.ndarray, labels: np.ndarray, standardise: bool = True):
    """The references' model: standardised features (a pass-through scaler for pixels), then logistic regression (C=1).

    Pixels are not standardised: a border pixel that is nearly always dark would be scaled up
    to the weight of the strokes, its noise with it. On 100 digits, raw 16-px pixels scored 0.878
    on held-out images against 0.835 standardised; on 20 gray scene classes, 0.240 against 0.222.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(with_mean=standardise, with_std=standardise), LogisticRegression(max_iter=500, C=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings on tiny sets: the fit is still usable
        model.fit(features, labels)
    return model


Rows = Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]]  # (split number, its train indices) -> (features, labels) it also trains on


def fit_and_score(
    features: np.ndarray, labels: np.ndarray, splits: Sequence[Split], num_classes: int, score: Score, name: str, standardise: bool = True, extra: Rows | None = None,
) -> BaselineResult:
    """Fit a standardised logistic regression on each split's train rows (and ``extra``'s rows
    for that split); score every validation row once."""
    import time

    started = time.perf_counter()
    validated, probabilities = [], []
    for number, (train, val) in enumerate(splits):
        x, y = features[train], labels[train]
        if extra is not None:
            more, more_labels = extra(number, train)
            x, y = np.concatenate([x, more]), np.concatenate([y, more_labels])
        model = fit_logistic(x, y, standardise)
        proba = np.zeros((len(val), num_classes))
        proba[:, model.classes_] = model.predict_proba(features[val])
        validated.append(val)
        probabilities.append(proba)
    order = np.concatenate(validated)
    stacked = np.concatenate(probabilities)
    return BaselineResult(name, float(score(labels[order], stacked)), time.perf_counter() - started, stacked)


def pixel_baseline(images: Images, labels: np.ndarray, splits: Sequence[Split], num_classes: int, score: Score) -> BaselineResult:
    pixels = downscaled_pixels(images)
    return fit_and_score(pixels.reshape(len(pixels), -1), labels, splits, num_classes, score, "logistic regression on pixels", standardise=False)


def probe_baseline(
    embed: Callable[[Images], np.ndarray], images: Images, labels: np.ndarray, splits: Sequence[Split], num_classes: int, score: Score, weights: str
) -> BaselineResult:
    """A linear probe on pooled features of the starting weights (``weights`` names them in the report)."""
    return fit_and_score(np.asarray(embed(images), dtype=np.float64), labels, splits, num_classes, score, f"linear probe on {weights} features")


def mirror_accuracies(pool: ImageTensors, split: Split, limit: int = 2000, seed: int = 0) -> tuple[float, float]:
    """(accuracy on the validation images, accuracy on their mirror images) of logistic
    regression on the training images' pixels: whether a horizontal flip changes what an
    image shows (digits, text, charts), measured on the data. At most ``limit`` training
    images of the labelled ``pool`` are used, read a batch at a time."""
    labels = pool.labels.numpy()
    rng = np.random.default_rng(seed)
    train, val = (rng.choice(part, min(len(part), n), replace=False) for part, n in ((split[0], limit), (split[1], limit // 2)))
    pixels = downscaled_pixels(pool.subset(np.concatenate([train, val])))
    mirrored = pixels[len(train) :, ..., ::-1]  # downscaling keeps left and right: mirror the small images, not read them again
    features = np.concatenate([pixels, mirrored]).reshape(len(train) + 2 * len(val), -1)
    model = fit_logistic(features[: len(train)], labels[train])
    plain, flipped = features[len(train) : len(train) + len(val)], features[len(train) + len(val) :]
    return float(model.score(plain, labels[val])), float(model.score(flipped, labels[val]))


def flips_change_labels(plain: float, mirrored: float, chance: float) -> bool:
    """Whether mirroring cost the pixel model over half of its margin over chance (and it
    has a margin worth reading): then horizontal flips would teach wrong labels."""
    margin = plain - chance
    return margin > 0.1 and plain - mirrored > 0.5 * margin
