"""What a report shows beside the study: the sections a caller fills (plan, timings, references,
the best model's evaluation), the best model's predictions summarised, and the small
formatters the console leaderboard shares."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from optuna.trial import FrozenTrial


if TYPE_CHECKING:
    import numpy as np

    from autoft.data import ImageTensors


TOP_CURVES = 5  # learning curves drawn: the best trials only, to stay legible
MAX_ANNOTATED_CLASSES = 20
MISTAKES_SHOWN = 24
THUMBNAIL_SIZE = 96  # pixels: larger images are shrunk, smaller ones drawn bigger by the browser
TOP_K = 5


# ---------------------------------------------------------------------------
# Optional sections, filled by the caller


@dataclass(frozen=True)
class Baseline:
    """A reference model scored on the same split and metric: ``logistic regression on pixels``."""

    name: str
    value: float
    note: str = ""


@dataclass(frozen=True)
class EnsembleSummary:
    """An ensemble of trials' models, with latencies measured in the same run (milliseconds per batch)."""

    members: tuple[int | str, ...]  # trial numbers, and simple models' names
    value: float
    latency_ms: float | None = None
    single_latency_ms: float | None = None
    batch_size: int | None = None
    note: str = ""


@dataclass(frozen=True)
class SearchPlan:
    """What the search set out to do, as planned before the first trial."""

    image_size: int | None = None
    epochs: int | None = None
    steps_per_epoch: int | None = None
    trials: int | None = None
    pretraining: str | None = None  # "simclr, 12 epochs on 1,108 images"
    folds: int | None = None
    time_budget_s: float | None = None


@dataclass(frozen=True)
class Timings:
    """Wall time of each phase, in seconds; ``None`` for a phase that did not run."""

    decoding: float | None = None
    pretraining: float | None = None
    trials: float | None = None
    refit: float | None = None
    export: float | None = None


@dataclass(frozen=True)
class BestEvaluation:
    """The best model on held-out images: labels ``(N,)``, probabilities ``(N, classes)`` and,
    for the gallery of mistakes, the images as uint8 ``(N, C, H, W)`` (an array, or an
    :class:`~autoft.data.ImageTensors` of which only the images shown are read)."""

    labels: "np.ndarray"
    probabilities: "np.ndarray"
    classes: Sequence[str]
    images: "np.ndarray | ImageTensors | None" = None
    split: str = "validation"


@dataclass(frozen=True)
class ReportExtras:
    plan: SearchPlan | None = None
    timings: Timings | None = None
    baselines: Sequence[Baseline] = ()
    ensemble: EnsembleSummary | None = None
    best_eval: BestEvaluation | None = None


# ---------------------------------------------------------------------------
# The best model's predictions, summarised (pure functions)


@dataclass(frozen=True)
class ClassMetrics:
    name: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class Mistake:
    index: int  # into the evaluated images
    true_label: str
    predicted_label: str
    confidence: float  # the probability given to the wrong label
    thumbnail_png: bytes | None = None


def per_class_metrics(labels: "np.ndarray", probabilities: "np.ndarray", classes: Sequence[str]) -> list[ClassMetrics]:
    """Precision, recall, F1 and support of each class, for the top-1 predictions."""
    import numpy as np
    from sklearn.metrics import precision_recall_fscore_support

    predicted = np.asarray(probabilities).argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=range(len(classes)), zero_division=0)
    return [ClassMetrics(str(n), float(p), float(r), float(f), int(s)) for n, p, r, f, s in zip(classes, precision, recall, f1, support)]


def top_k_accuracy(labels: "np.ndarray", probabilities: "np.ndarray", k: int = TOP_K) -> float | None:
    """The share of images whose label is among the ``k`` most likely; ``None`` with ``k`` classes or fewer."""
    import numpy as np
    from sklearn.metrics import top_k_accuracy_score

    probabilities = np.asarray(probabilities)
    if probabilities.shape[1] <= k:
        return None
    return float(top_k_accuracy_score(labels, probabilities, k=k, labels=range(probabilities.shape[1])))


def confident_mistakes(
    labels: "np.ndarray", probabilities: "np.ndarray", images: "np.ndarray | ImageTensors | None", classes: Sequence[str], limit: int = MISTAKES_SHOWN
) -> list[Mistake]:
    """The wrong predictions the model was surest of, surest first, each with a PNG thumbnail when images are given."""
    import numpy as np

    probabilities = np.asarray(probabilities)
    labels = np.asarray(labels)
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities[np.arange(len(predicted)), predicted]
    wrong = np.flatnonzero(predicted != labels)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    shown = None if images is None else images[order] if isinstance(images, np.ndarray) else images.take(order).numpy()
    return [
        Mistake(int(i), str(classes[labels[i]]), str(classes[predicted[i]]), float(confidence[i]), _thumbnail(shown[k]) if shown is not None else None)
        for k, i in enumerate(order)
    ]


def _thumbnail(image: "np.ndarray") -> bytes:
    """uint8 CHW (1 or 3 channels) -> PNG bytes, at most THUMBNAIL_SIZE on a side."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(image, dtype=np.uint8)
    picture = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels, 0, -1))
    picture.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


# ---------------------------------------------------------------------------
# Small formatters shared with the console leaderboard


def trial_seconds(trial: FrozenTrial) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def epochs_run(trial: FrozenTrial) -> int:
    return len(trial.intermediate_values)


def seed_fits(members: Sequence[int | str]) -> int:
    """How many fits of one trial's recipe, from as many seeds, ``members`` average (that trial's
    number repeated: :func:`autoft.searching.finishing.add_seeds`); 1 for any other model."""
    return len(members) if len(members) > 1 and len(set(members)) == 1 and isinstance(members[0], int) else 1


def ensemble_name(ensemble: EnsembleSummary) -> str:
    """``ensemble of trials 3, 7``, ``ensemble of trial 3 with linear probe on ... features``, or ``trial 3 from 2 seeds``."""
    if (fits := seed_fits(ensemble.members)) > 1:
        return f"trial {ensemble.members[0]} from {fits} seeds"
    numbers = [m for m in ensemble.members if isinstance(m, int)]
    trials = [str(m) for m in numbers]
    simple = [str(m) for m in ensemble.members if isinstance(m, str)]
    named = f"trial{'s' if len(trials) > 1 else ''} {', '.join(trials)}" if trials else ""
    listed = ", ".join(simple[:-1]) + " and " + simple[-1] if len(simple) > 1 else "".join(simple)
    return "ensemble of " + (f"{named} with {listed}" if named and listed else named or listed)


def describe_ensemble(ensemble: EnsembleSummary) -> str:
    """Its note and measured latency against the best single model, in one line."""
    parts = [ensemble.note] if ensemble.note else []
    if ensemble.latency_ms is not None and ensemble.single_latency_ms:
        batch = f" per batch of {ensemble.batch_size}" if ensemble.batch_size else ""
        ratio = ensemble.latency_ms / ensemble.single_latency_ms
        parts.append(f"latency {ensemble.latency_ms:.1f} ms vs {ensemble.single_latency_ms:.1f} ms for the best single model{batch} ({ratio:.1f}x)")
    return "; ".join(parts)


def format_value(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


