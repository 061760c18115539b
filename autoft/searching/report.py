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
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from autoft.core.io import write_text
from autoft.searching.report_data import BestEvaluation, ReportExtras, SearchPlan, THUMBNAIL_SIZE, TOP_K, Timings, confident_mistakes, describe_ensemble, ensemble_name, epochs_run, format_value, per_class_metrics, top_k_accuracy, trial_seconds
from autoft.searching.report_plots import confusion_plot, curves_plot, escape, history_plot, importance_plot, note_html, section_html, slice_plot
from autoft.core.text import duration
from autoft.searching.records import TrialRecord, visible

if TYPE_CHECKING:

    pass



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
    trials = visible(study.get_trials(deepcopy=False))  # surplus trials never trained: not shown
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    metric = info.get("metric") or study.user_attrs.get("autoft", {}).get("metric") or "accuracy"
    if confusion is None and extras.best_eval is not None:
        confusion = _confusion_of(extras.best_eval)
        classes = classes or list(extras.best_eval.classes)

    sections = [
        section_html("Summary", _summary(trials, best, info, metric, extras.timings)),
        section_html("Against reference models", _references(best, metric, extras)) if extras.baselines or extras.ensemble else "",
        section_html("Plan", _key_values(_plan_rows(extras.plan))) if extras.plan else "",
        section_html("Where the time went", _timings(extras.timings)) if extras.timings else "",
        section_html("Best hyperparameters", _key_values(best.params) if best else note_html("No trial has completed yet.")),
        section_html("Search space", _key_values(info["space"])) if info.get("space") else "",
        section_html("Best model, class by class", _class_report(extras.best_eval)),
        section_html("Confusion matrix of the best model", confusion_plot(confusion, classes) if confusion else note_html("Appears once the best trial has finished training.")),
        section_html("Most confident mistakes of the best model", _gallery(extras.best_eval)),
        section_html("Optimisation history", history_plot(trials, metric)),
        section_html(f"Parameters against {metric}", slice_plot(study, complete, metric)),
        section_html("Parameter importances", importance_plot(study, complete)),
        section_html("Learning curves of the best trials", curves_plot(complete, metric)),
        section_html("Trials", _trials_table(trials, metric)),
    ]
    return write_text(path, _page(f"autoft search: {study.study_name}", "".join(sections)))


def _page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
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
<h1>{escape(title)}</h1>
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
        rows["wall time"] = duration(sum(spent.values()), column=True)
    return _key_values(rows)


def _references(best: FrozenTrial | None, metric: str, extras: ReportExtras) -> str:
    rows = []
    if best is not None:
        rows.append(("best", f"best trial ({best.number})", best.value, ""))
    rows += [("reference", b.name, b.value, b.note) for b in extras.baselines]
    ensemble = extras.ensemble
    if ensemble is not None:
        rows.append(("reference", ensemble_name(ensemble), ensemble.value, describe_ensemble(ensemble)))
    rows.sort(key=lambda r: -r[2])
    body = "".join(
        f'<tr class="{kind}"><td>{escape(name)}</td><td class="number">{value:.4f}</td><td>{escape(note)}</td></tr>' for kind, name, value, note in rows
    )
    return f"<table><thead><tr><th>model</th><th>{escape(metric)}</th><th>note</th></tr></thead><tbody>{body}</tbody></table>" + note_html(
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
        "time budget": duration(plan.time_budget_s, column=True) or None,
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
        return note_html("No phase has been timed yet.")
    body = "".join(
        f'<tr><td>{escape(phase)}</td><td class="number" data-sort="{seconds}">{duration(seconds, column=True)}</td>'
        f'<td><span class="bar" style="width:{300 * seconds / total:.0f}px"></span> {seconds / total:.0%}</td></tr>'
        for phase, seconds in rows.items()
    )
    return f"<table><thead><tr><th>phase</th><th>wall time</th><th>share</th></tr></thead><tbody>{body}</tbody></table>" + note_html(
        f"{duration(total, column=True)} in all."
    )


def _class_report(evaluation: BestEvaluation | None) -> str:
    if evaluation is None:
        return note_html("Appears once the best model has been evaluated on held-out images.")
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
        f"<tr><td>{escape(m.name)}</td>" + "".join(f'<td class="number">{v:.3f}</td>' for v in (m.precision, m.recall, m.f1)) + f'<td class="number">{m.support}</td></tr>'
        for m in metrics
    )
    return (
        note_html(f"On the {evaluation.split} images, top-1 predictions.")
        + _key_values(overall)
        + f'<table class="sortable" id="classes"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    )


def _gallery(evaluation: BestEvaluation | None) -> str:
    if evaluation is None:
        return note_html("Appears once the best model has been evaluated on held-out images.")
    mistakes = confident_mistakes(evaluation.labels, evaluation.probabilities, evaluation.images, evaluation.classes)
    if not mistakes:
        return note_html(f"No mistakes on the {len(evaluation.labels)} {evaluation.split} images.")
    figures = []
    for m in mistakes:
        image = f'<img alt="{escape(evaluation.split)} image {m.index}" src="data:image/png;base64,{base64.b64encode(m.thumbnail_png).decode()}">' if m.thumbnail_png else ""
        caption = f"true <b>{escape(m.true_label)}</b><br>predicted <b>{escape(m.predicted_label)}</b> ({m.confidence:.2f})"
        figures.append(f"<figure>{image}<figcaption>{caption}</figcaption></figure>")
    return note_html(f"The {len(mistakes)} wrong predictions on {evaluation.split} images the model was surest of, surest first.") + f'<div class="gallery">{"".join(figures)}</div>'


def _confusion_of(evaluation: BestEvaluation) -> list[list[int]]:
    import numpy as np
    from sklearn.metrics import confusion_matrix

    predicted = np.asarray(evaluation.probabilities).argmax(axis=1)
    return confusion_matrix(evaluation.labels, predicted, labels=range(len(evaluation.classes))).tolist()


def _key_values(values: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(format_value(v))}</td></tr>" for k, v in values.items())
    return f"<table>{rows}</table>"


def _trials_table(trials: list[FrozenTrial], metric: str) -> str:
    if not trials:
        return note_html("No trial yet.")
    names = sorted({p for t in trials for p in t.params}, key=lambda n: (n != "strategy", n))
    head = "".join(f"<th>{escape(h)}</th>" for h in ["#", "state", metric, "epochs", "time", *names, "note"])
    body = []
    for t in trials:
        seconds = trial_seconds(t)
        cells = [
            _cell(t.number),
            f'<td><span class="{t.state.name}">{t.state.name.lower()}</span></td>',
            _cell(format_value(t.value), t.value),
            _cell(epochs_run(t)),
            _cell(duration(seconds, column=True), seconds),
            *(_cell(format_value(t.params.get(n, "")), t.params.get(n)) for n in names),
            f"<td>{escape(_trial_note(t))}</td>",
        ]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="sortable" id="trials"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _cell(text: Any, sort: Any = None) -> str:
    key = f' data-sort="{escape(sort)}"' if isinstance(sort, (int, float)) and not isinstance(sort, bool) else ""
    number = ' class="number"' if isinstance(sort, (int, float)) or isinstance(text, int) else ""
    return f"<td{number}{key}>{escape(text)}</td>"


def _trial_note(t: FrozenTrial) -> str:
    notes = []
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


