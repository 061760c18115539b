"""``report.html``: one self-contained page about a search, readable offline.

Plots are inline SVG drawn by matplotlib (Agg), thumbnails are inline PNG, and the one script
(sorting tables) is inline too: nothing is fetched from the network. The report is rewritten
atomically after every trial, so a crashed search still has one.

What only the caller knows (the plan, where the time went, reference baselines, an ensemble, the
best model's predictions on validation images) comes in a :class:`ReportExtras`; every part of
it is optional, and each section it feeds says what is missing rather than disappearing.
"""

from __future__ import annotations

import base64
import html
import io
import math
import warnings
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoft.io import write_text

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

    members: tuple[int, ...]
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


def format_duration(seconds: float | None) -> str:
    """``4.2s``, ``42s``, ``1m42s``, ``2h05m``; empty for ``None``."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def trial_seconds(trial: FrozenTrial) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def epochs_run(trial: FrozenTrial) -> int:
    return len(trial.intermediate_values)


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


# ---------------------------------------------------------------------------
# The page


def write_report(
    study: optuna.Study,
    path: str | Path,
    *,
    info: dict[str, Any] | None = None,
    classes: Sequence[str] | None = None,
    confusion: list[list[int]] | None = None,
    extras: ReportExtras | None = None,
) -> Path:
    """Write the report of ``study`` to ``path``; ``info`` adds summary rows (backbone, data, space),
    ``extras`` the sections only the caller can fill."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    info, extras = dict(info or {}), extras or ReportExtras()
    from autoft.searching.records import visible

    trials = visible(study.get_trials(deepcopy=False))  # surplus trials never trained: not shown
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    metric = info.get("metric") or study.user_attrs.get("autoft", {}).get("metric") or "accuracy"
    if confusion is None and extras.best_eval is not None:
        confusion = _confusion_of(extras.best_eval)
        classes = classes or list(extras.best_eval.classes)

    sections = [
        _section("Summary", _summary(trials, best, info, metric, extras.timings)),
        _section("Against reference models", _references(best, metric, extras)) if extras.baselines or extras.ensemble else "",
        _section("Plan", _key_values(_plan_rows(extras.plan))) if extras.plan else "",
        _section("Where the time went", _timings(extras.timings)) if extras.timings else "",
        _section("Best hyperparameters", _key_values(best.params) if best else _note("No trial has completed yet.")),
        _section("Search space", _key_values(info["space"])) if info.get("space") else "",
        _section("Best model, class by class", _class_report(extras.best_eval)),
        _section("Confusion matrix of the best model", _confusion_plot(confusion, classes) if confusion else _note("Appears once the best trial has finished training.")),
        _section("Most confident mistakes of the best model", _gallery(extras.best_eval)),
        _section("Optimisation history", _history_plot(trials, metric)),
        _section(f"Parameters against {metric}", _slice_plot(study, complete, metric)),
        _section("Parameter importances", _importance_plot(study, complete)),
        _section("Learning curves of the best trials", _curves_plot(complete, metric)),
        _section("Trials", _trials_table(trials, metric)),
    ]
    return write_text(path, _page(f"autoft search: {study.study_name}", "".join(sections)))


def _page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0; font-size: 90%; }}
th, td {{ border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }}
td.number {{ text-align: right; font-variant-numeric: tabular-nums; }}
table.sortable th {{ cursor: pointer; user-select: none; }}
table.sortable th[data-order="asc"]::after {{ content: " \\25B2"; }} table.sortable th[data-order="desc"]::after {{ content: " \\25BC"; }}
.COMPLETE {{ color: #186a3b; }} .PRUNED {{ color: #7d6608; }} .FAIL {{ color: #922b21; }} .RUNNING, .WAITING {{ color: #1f618d; }}
tr.reference td {{ font-style: italic; background: #fafafa; }} tr.best td {{ font-weight: bold; }}
.note {{ color: #666; font-style: italic; }}
.bar {{ display: inline-block; height: .8em; background: #2874a6; vertical-align: middle; }}
.gallery {{ display: flex; flex-wrap: wrap; gap: .8em; }}
.gallery figure {{ width: {THUMBNAIL_SIZE + 24}px; font-size: 80%; text-align: center; }}
.gallery img {{ width: {THUMBNAIL_SIZE}px; height: {THUMBNAIL_SIZE}px; object-fit: contain; image-rendering: pixelated; border: 1px solid #ccc; }}
figure {{ margin: 0; }} svg {{ max-width: 100%; height: auto; }}
</style></head><body>
<h1>{_e(title)}</h1>
<p class="note">Written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. Click a column heading of a table to sort it.</p>
{body}
<script>{SORT_SCRIPT}</script>
</body></html>
"""


# Sorts a table.sortable by the clicked column: numbers as numbers (a cell's data-sort wins
# over its text), empty cells last either way.
SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.tHead.querySelectorAll("th").forEach(function (th, column) {
    th.addEventListener("click", function () {
      var ascending = th.dataset.order !== "asc";
      table.tHead.querySelectorAll("th").forEach(function (other) { delete other.dataset.order; });
      th.dataset.order = ascending ? "asc" : "desc";
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = sortKey(a.cells[column]), y = sortKey(b.cells[column]);
        if (x === null || y === null) { return x === y ? 0 : (x === null ? 1 : -1); }
        return (x < y ? -1 : x > y ? 1 : 0) * (ascending ? 1 : -1);
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
function sortKey(cell) {
  var text = cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent.trim();
  if (text === "") { return null; }
  var number = Number(text);
  return isNaN(number) ? text.toLowerCase() : number;
}
"""


# ---------------------------------------------------------------------------
# Sections


def _summary(trials: list[FrozenTrial], best: FrozenTrial | None, info: dict[str, Any], metric: str, timings: Timings | None) -> str:
    rows = {k: v for k, v in info.items() if k != "space" and v is not None}
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    rows["trials"] = ", ".join(f"{n} {state}" for state, n in counts.items() if n) or "none yet"
    if "trials" in info:
        rows["trials"] += f" (target {info['trials']})"
    if best is not None:
        rows["best"] = f"trial {best.number}: {metric} {best.value:.4f}"
    spent = _timing_rows(timings)
    if spent:
        rows["wall time"] = format_duration(sum(spent.values()))
    return _key_values(rows)


def _references(best: FrozenTrial | None, metric: str, extras: ReportExtras) -> str:
    rows = []
    if best is not None:
        rows.append(("best", f"best trial ({best.number})", best.value, ""))
    rows += [("reference", b.name, b.value, b.note) for b in extras.baselines]
    ensemble = extras.ensemble
    if ensemble is not None:
        rows.append(("reference", f"ensemble of trials {', '.join(map(str, ensemble.members))}", ensemble.value, describe_ensemble(ensemble)))
    rows.sort(key=lambda r: -r[2])
    body = "".join(
        f'<tr class="{kind}"><td>{_e(name)}</td><td class="number">{value:.4f}</td><td>{_e(note)}</td></tr>' for kind, name, value, note in rows
    )
    return f"<table><thead><tr><th>model</th><th>{_e(metric)}</th><th>note</th></tr></thead><tbody>{body}</tbody></table>" + _note(
        "Reference models are scored on the same split with the same metric as the trials."
    )


def _plan_rows(plan: SearchPlan) -> dict[str, Any]:
    rows = {
        "image size": f"{plan.image_size} px" if plan.image_size else None,
        "epochs per trial (at most)": plan.epochs,
        "steps per epoch": plan.steps_per_epoch,
        "trials": plan.trials,
        "cross-validation folds": plan.folds,
        "pretraining": plan.pretraining,
        "time budget": format_duration(plan.time_budget_s) or None,
    }
    return {k: v for k, v in rows.items() if v is not None}


def _timing_rows(timings: Timings | None) -> dict[str, float]:
    if timings is None:
        return {}
    return {f.name: getattr(timings, f.name) for f in fields(timings) if getattr(timings, f.name) is not None}


def _timings(timings: Timings) -> str:
    rows = _timing_rows(timings)
    total = sum(rows.values())
    if not rows or total <= 0:
        return _note("No phase has been timed yet.")
    body = "".join(
        f'<tr><td>{_e(phase)}</td><td class="number" data-sort="{seconds}">{format_duration(seconds)}</td>'
        f'<td><span class="bar" style="width:{300 * seconds / total:.0f}px"></span> {seconds / total:.0%}</td></tr>'
        for phase, seconds in rows.items()
    )
    return f"<table><thead><tr><th>phase</th><th>wall time</th><th>share</th></tr></thead><tbody>{body}</tbody></table>" + _note(
        f"{format_duration(total)} in all."
    )


def _class_report(evaluation: BestEvaluation | None) -> str:
    if evaluation is None:
        return _note("Appears once the best model has been evaluated on held-out images.")
    import numpy as np

    labels, probabilities = np.asarray(evaluation.labels), np.asarray(evaluation.probabilities)
    metrics = per_class_metrics(labels, probabilities, evaluation.classes)
    overall = {"images": len(labels), "accuracy": f"{float(np.mean(probabilities.argmax(1) == labels)):.4f}"}
    top_k = top_k_accuracy(labels, probabilities)
    if top_k is not None:
        overall[f"top-{TOP_K} accuracy"] = f"{top_k:.4f}"
    overall["macro F1"] = f"{np.mean([m.f1 for m in metrics]):.4f}"
    head = "".join(f"<th>{h}</th>" for h in ("class", "precision", "recall", "F1", "images"))
    body = "".join(
        f"<tr><td>{_e(m.name)}</td>" + "".join(f'<td class="number">{v:.3f}</td>' for v in (m.precision, m.recall, m.f1)) + f'<td class="number">{m.support}</td></tr>'
        for m in metrics
    )
    return (
        _note(f"On the {evaluation.split} images, top-1 predictions.")
        + _key_values(overall)
        + f'<table class="sortable" id="classes"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    )


def _gallery(evaluation: BestEvaluation | None) -> str:
    if evaluation is None:
        return _note("Appears once the best model has been evaluated on held-out images.")
    mistakes = confident_mistakes(evaluation.labels, evaluation.probabilities, evaluation.images, evaluation.classes)
    if not mistakes:
        return _note(f"No mistakes on the {len(evaluation.labels)} {evaluation.split} images.")
    figures = []
    for m in mistakes:
        image = f'<img alt="{_e(evaluation.split)} image {m.index}" src="data:image/png;base64,{base64.b64encode(m.thumbnail_png).decode()}">' if m.thumbnail_png else ""
        caption = f"true <b>{_e(m.true_label)}</b><br>predicted <b>{_e(m.predicted_label)}</b> ({m.confidence:.2f})"
        figures.append(f"<figure>{image}<figcaption>{caption}</figcaption></figure>")
    return _note(f"The {len(mistakes)} wrong predictions on {evaluation.split} images the model was surest of, surest first.") + f'<div class="gallery">{"".join(figures)}</div>'


def _confusion_of(evaluation: BestEvaluation) -> list[list[int]]:
    import numpy as np
    from sklearn.metrics import confusion_matrix

    predicted = np.asarray(evaluation.probabilities).argmax(axis=1)
    return confusion_matrix(evaluation.labels, predicted, labels=range(len(evaluation.classes))).tolist()


def _key_values(values: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(format_value(v))}</td></tr>" for k, v in values.items())
    return f"<table>{rows}</table>"


def _trials_table(trials: list[FrozenTrial], metric: str) -> str:
    if not trials:
        return _note("No trial yet.")
    names = sorted({p for t in trials for p in t.params}, key=lambda n: (n != "strategy", n))
    head = "".join(f"<th>{_e(h)}</th>" for h in ["#", "state", metric, "epochs", "time", *names, "note"])
    body = []
    for t in trials:
        seconds = trial_seconds(t)
        cells = [
            _cell(t.number),
            f'<td><span class="{t.state.name}">{t.state.name.lower()}</span></td>',
            _cell(format_value(t.value), t.value),
            _cell(epochs_run(t)),
            _cell(format_duration(seconds), seconds),
            *(_cell(format_value(t.params.get(n, "")), t.params.get(n)) for n in names),
            f"<td>{_e(_trial_note(t))}</td>",
        ]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="sortable" id="trials"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _cell(text: Any, sort: Any = None) -> str:
    key = f' data-sort="{_e(sort)}"' if isinstance(sort, (int, float)) and not isinstance(sort, bool) else ""
    number = ' class="number"' if isinstance(sort, (int, float)) or isinstance(text, int) else ""
    return f"<td{number}{key}>{_e(text)}</td>"


def _trial_note(t: FrozenTrial) -> str:
    notes = []
    from autoft.searching.records import TrialRecord

    record = TrialRecord.of(t)
    if record.recipe == "default":
        notes.append("default recipe")
    if record.retry_of is not None:
        notes.append(f"rerun of trial {record.retry_of}")
    if t.state == TrialState.PRUNED and t.intermediate_values:
        notes.append(f"pruned after epoch {max(t.intermediate_values)}")
    if record.pruned_after_folds:
        notes.append(f"stopped by the pruner after {record.pruned_after_folds} folds")
    notes += [text for text in (record.cut_short, record.reason(t)) if text]
    return "; ".join(notes)


# ---------------------------------------------------------------------------
# Plots


def _history_plot(trials: list[FrozenTrial], metric: str) -> str:
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done:
        return _note("No trial has completed yet.")
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


def _slice_plot(study: optuna.Study, complete: list[FrozenTrial], metric: str) -> str:
    """Optuna's slice plot: one panel per parameter, each completed trial a dot at (its value, its metric)."""
    if len(complete) < 2 or not any(t.params for t in complete):
        return _note("Appears once two trials have completed.")
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.visualization.matplotlib import plot_slice

    with plt.rc_context(), warnings.catch_warnings():  # optuna sets a global style sheet; keep it to this plot
        warnings.simplefilter("ignore")
        axes = np.atleast_1d(plot_slice(study, target_name=metric))
        fig = axes[0].figure
        fig.suptitle("")
        axes[0].set_title("")  # one parameter: the title sits on its only panel
        return _svg(fig, tight_layout=False) + _note("Each dot is a completed trial, darker for later trials; a parameter a trial did not use leaves it out of that panel.")


def _importance_plot(study: optuna.Study, complete: list[FrozenTrial]) -> str:
    if len(complete) < 2:
        return _note("Parameter importances need at least two completed trials.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError) as exc:
        return _note(f"Parameter importances could not be computed: {exc}")
    if not importances:
        return _note("Parameter importances could not be computed: no parameter varied across every completed trial.")
    import matplotlib.pyplot as plt

    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1))
    ax.barh(names, [importances[n] for n in names], color="#2874a6")
    ax.set_xlabel("importance (fANOVA, over completed trials)")
    return _svg(fig) + _note(f"Optuna's fANOVA importance evaluator over the {len(complete)} completed trials; with this few, read it as a hint.")


def _curves_plot(complete: list[FrozenTrial], metric: str) -> str:
    from autoft.searching.records import TrialRecord

    top = sorted((t for t in complete if TrialRecord.of(t).history), key=lambda t: -t.value)[:TOP_CURVES]
    if not top:
        return _note("No completed trial has per-epoch values (cross-validated trials report one score per fold).")
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


def _confusion_plot(matrix: list[list[int]], classes: Sequence[str] | None) -> str:
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
    return _svg(fig) + _note(f"On the validation split: {values.sum()} images, accuracy {accuracy:.4f}.")


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


def _section(title: str, body: str) -> str:
    return f"<section><h2>{_e(title)}</h2>{body}</section>\n"


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _e(text: Any) -> str:
    return html.escape(str(text))
