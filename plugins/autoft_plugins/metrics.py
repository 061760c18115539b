"""Built-in validation metrics: accuracy, f1_macro, balanced_accuracy, top5_accuracy, log_loss."""

from __future__ import annotations

import numpy as np

from autoft import hookimpl
from autoft.specs import MetricSpec


def accuracy(labels: np.ndarray, probabilities: np.ndarray) -> float:
    return float((probabilities.argmax(1) == labels).mean())


def f1_macro(labels: np.ndarray, probabilities: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, probabilities.argmax(1), average="macro", zero_division=0))


def balanced_accuracy(labels: np.ndarray, probabilities: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(labels, probabilities.argmax(1)))


def top5_accuracy(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The true class among the five most probable (all of them with five classes or fewer)."""
    k = min(5, probabilities.shape[1])
    top = np.argsort(-probabilities, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    from sklearn.metrics import log_loss as sklearn_log_loss

    return float(sklearn_log_loss(labels, probabilities, labels=list(range(probabilities.shape[1]))))


@hookimpl
def autoft_register_metrics(register):
    register(MetricSpec("accuracy", "Share of images classified right", accuracy))
    register(MetricSpec("f1_macro", "F1 score averaged over classes (each class counts the same)", f1_macro))
    register(MetricSpec("balanced_accuracy", "Recall averaged over classes", balanced_accuracy))
    register(MetricSpec("top5_accuracy", "Share of images whose class is among the five most probable", top5_accuracy))
    register(MetricSpec("log_loss", "Cross-entropy of the predicted probabilities (lower is better)", log_loss, greater_is_better=False))
