"""The report's plots, as inline SVG: history, slices, importances, learning curves, confusion."""

from __future__ import annotations

import html
import io
import math
import warnings
from typing import TYPE_CHECKING, Any, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoft.searching.records import TrialRecord


if TYPE_CHECKING:

    pass


TOP_CURVES = 5  # learning curves drawn: the best trials only, to stay legible
MAX_ANNOTATED_CLASSES = 20


# ---------------------------------------------------------------------------
# Plots


def history_plot(trials: list[FrozenTrial], metric: str) -> str:
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done:
        return note_html("No trial has completed yet.")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.scatter([t.number for t in done], [t.value for t in done], s=18, label=f"trial {metric}", color="#2874a6")
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    if pruned:
        last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
        ax.scatter([t.number for t in pruned], last, s=14, marker="x", color="#b7950b", label="pruned (last value)")
    ordered = sorted(done, key=lambda t: t.number)
    best, running = [], -math.inf
    for t in ordered:
        running = max(running, t.value)
        best.append(running)
    ax.step([t.number for t in ordered], best, where="post", color="#c0392b", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    _integer_ticks(ax)
    ax.legend(loc="lower right", fontsize=8)
    return _svg(fig)


def slice_plot(study: optuna.Study, complete: list[FrozenTrial], metric: str) -> str:
    """Optuna's slice plot: one panel per parameter, each completed trial a dot at (its value, its metric)."""
    if len(complete) < 2 or not any(t.params for t in complete):
        return note_html("Appears once two trials have completed.")
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.visualization.matplotlib import plot_slice

    with plt.rc_context(), warnings.catch_warnings():  # optuna sets a global style sheet; keep it to this plot
        warnings.simplefilter("ignore")
        axes = np.atleast_1d(plot_slice(study, target_name=metric))
        fig = axes[0].figure
        fig.suptitle("")
        axes[0].set_title("")  # one parameter: the title sits on its only panel
        return _svg(fig, tight_layout=False) + note_html("Each dot is a completed trial, darker for later trials; a parameter a trial did not use leaves it out of that panel.")


def importance_plot(study: optuna.Study, complete: list[FrozenTrial]) -> str:
    if len(complete) < 2:
        return note_html("Parameter importances need at least two completed trials.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError) as exc:
        return note_html(f"Parameter importances could not be computed: {exc}")
    if not importances:
        return note_html("Parameter importances could not be computed: no parameter varied across every completed trial.")
    import matplotlib.pyplot as plt

    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1))
    ax.barh(names, [importances[n] for n in names], color="#2874a6")
    ax.set_xlabel("importance (fANOVA, over completed trials)")
    return _svg(fig) + note_html(f"Optuna's fANOVA importance evaluator over the {len(complete)} completed trials; with this few, read it as a hint.")


def curves_plot(complete: list[FrozenTrial], metric: str) -> str:
    top = sorted((t for t in complete if TrialRecord.of(t).history), key=lambda t: -t.value)[:TOP_CURVES]
    if not top:
        return note_html("No completed trial has per-epoch values (cross-validated trials report one score per fold).")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for t in top:
        history = TrialRecord.of(t).history
        epochs = [r["epoch"] for r in history]
        line = left.plot(epochs, [r[f"val_{metric}"] for r in history], marker="o", ms=3, label=f"trial {t.number}")[0]
        right.plot(epochs, [r["train_loss"] for r in history], color=line.get_color(), linestyle="--", label=f"trial {t.number} train")
        right.plot(epochs, [r["val_loss"] for r in history], color=line.get_color(), label=f"trial {t.number} val")
    left.set(xlabel="epoch", ylabel=f"validation {metric}")
    right.set(xlabel="epoch", ylabel="loss (dashed: train)")
    _integer_ticks(left)
    _integer_ticks(right)
    left.legend(fontsize=8)
    return _svg(fig)


def confusion_plot(matrix: list[list[int]], classes: Sequence[str] | None) -> str:
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.asarray(matrix)
    n = len(values)
    names = list(classes) if classes and len(classes) == n else [str(i) for i in range(n)]
    size = min(12, 3 + 0.4 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(values, cmap="Blues")
    if n <= MAX_ANNOTATED_CLASSES:
        ax.set_xticks(range(n), names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
        threshold = values.max() / 2 if values.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(values[i, j]), ha="center", va="center", fontsize=7, color="white" if values[i, j] > threshold else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(values) / max(values.sum(), 1)
    return _svg(fig) + note_html(f"On the validation split: {values.sum()} images, accuracy {accuracy:.4f}.")


# ---------------------------------------------------------------------------
# Helpers


def _svg(fig, *, tight_layout: bool = True) -> str:
    """``tight_layout=False`` for a figure that laid itself out (a colorbar beside its panels), cropped instead."""
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    if tight_layout:
        fig.tight_layout()
    with plt.rc_context({"svg.fonttype": "none"}):  # text stays text: smaller and searchable
        fig.savefig(
            buffer, format="svg", bbox_inches=None if tight_layout else "tight", metadata={"Date": None, "Creator": None, "Format": None, "Type": None}
        )
    plt.close(fig)
    text = buffer.getvalue()
    return "<figure>" + text[text.index("<svg") :] + "</figure>"


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def section_html(title: str, body: str) -> str:
    return f"<section><h2>{escape(title)}</h2>{body}</section>\n"


def note_html(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def escape(text: Any) -> str:
    return html.escape(str(text))
