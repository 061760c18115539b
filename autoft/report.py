"""``report.html``: one self-contained page about a search, readable offline.

Plots are inline SVG drawn by matplotlib (Agg); nothing is fetched from the network. The
report is rewritten atomically after every trial, so a crashed search still has one.
"""

from __future__ import annotations

import html
import io
import math
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoft.io import write_text

TOP_CURVES = 5  # learning curves drawn: the best trials only, to stay legible
MAX_ANNOTATED_CLASSES = 20


def write_report(
    study: optuna.Study,
    path: str | Path,
    *,
    info: dict[str, Any] | None = None,
    classes: Sequence[str] | None = None,
    confusion: list[list[int]] | None = None,
) -> Path:
    """Write the report of ``study`` to ``path``; ``info`` adds summary rows (backbone, data, space)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    info = dict(info or {})
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    metric = info.get("metric") or study.user_attrs.get("autoft", {}).get("metric") or "accuracy"

    sections = [
        _section("Summary", _summary(trials, best, info, metric)),
        _section("Best hyperparameters", _key_values(best.params) if best else _note("No trial has completed yet.")),
        _section("Optimisation history", _history_plot(trials, metric)),
        _section("Parameter importances", _importance_plot(study, complete)),
        _section("Learning curves of the best trials", _curves_plot(complete, metric)),
        _section("Confusion matrix of the best model", _confusion_plot(confusion, classes) if confusion else _note("Appears once the best trial has finished training.")),
        _section("Trials", _trials_table(trials, metric)),
    ]
    if info.get("space"):
        sections.insert(2, _section("Search space", _key_values(info["space"])))
    title = f"autoft search: {study.study_name}"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0; font-size: 90%; }}
th, td {{ border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }}
.COMPLETE {{ color: #186a3b; }} .PRUNED {{ color: #7d6608; }} .FAIL {{ color: #922b21; }} .RUNNING, .WAITING {{ color: #1f618d; }}
.note {{ color: #666; font-style: italic; }}
figure {{ margin: 0; }} svg {{ max-width: 100%; height: auto; }}
</style></head><body>
<h1>{_e(title)}</h1>
<p class="note">Written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.</p>
{''.join(sections)}
</body></html>
"""
    return write_text(path, page)


# ---------------------------------------------------------------------------
# Sections


def _summary(trials: list[FrozenTrial], best: FrozenTrial | None, info: dict[str, Any], metric: str) -> str:
    rows = {k: v for k, v in info.items() if k != "space" and v is not None}
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    rows["trials"] = ", ".join(f"{n} {state}" for state, n in counts.items() if n) or "none yet"
    if "trials" in info:
        rows["trials"] += f" (target {info['trials']})"
    if best is not None:
        rows["best"] = f"trial {best.number}: {metric} {best.value:.4f}"
    return _key_values(rows)


def _key_values(values: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>" for k, v in values.items())
    return f"<table>{rows}</table>"


def _trials_table(trials: list[FrozenTrial], metric: str) -> str:
    if not trials:
        return _note("No trial yet.")
    names = sorted({p for t in trials for p in t.params}, key=lambda n: (n != "strategy", n))
    head = "".join(f"<th>{_e(h)}</th>" for h in ["#", "state", metric, "epochs", "seconds", *names, "note"])
    body = []
    for t in trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        cells = [
            str(t.number),
            f'<span class="{t.state.name}">{t.state.name.lower()}</span>',
            _e(_fmt(t.value)),
            str(len(t.intermediate_values)),
            _e(_fmt(seconds, 1)),
            *(_e(_fmt(t.params.get(n, ""))) for n in names),
            _e(_trial_note(t)),
        ]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _trial_note(t: FrozenTrial) -> str:
    notes = []
    if t.user_attrs.get("recipe") == "default":
        notes.append("default recipe")
    if "failed_trial" in t.system_attrs:
        notes.append(f"rerun of trial {t.system_attrs['failed_trial']}")
    if t.state == TrialState.PRUNED and t.intermediate_values:
        notes.append(f"pruned after epoch {max(t.intermediate_values)}")
    if t.user_attrs.get("pruned_after_folds"):
        notes.append(f"stopped by the pruner after {t.user_attrs['pruned_after_folds']} folds")
    for key in ("cut_short", "fail_reason"):
        if t.user_attrs.get(key):
            notes.append(str(t.user_attrs[key]))
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
    top = sorted((t for t in complete if t.user_attrs.get("history")), key=lambda t: -t.value)[:TOP_CURVES]
    if not top:
        return _note("No completed trial has per-epoch values (cross-validated trials report one score per fold).")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for t in top:
        history = t.user_attrs["history"]
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


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    fig.tight_layout()
    with plt.rc_context({"svg.fonttype": "none"}):  # text stays text: smaller and searchable
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
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


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)
