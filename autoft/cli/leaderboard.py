"""The leaderboard printed at the end of a search: the best trials beside the reference models.

Like AutoGluon's leaderboard, one table ranks what was tried: the top trials with their
strategy, key parameters, epochs and time, the default recipe for comparison, and reference
baselines and an ensemble, drawn apart so that no one mistakes them for trials. Printed to a
log or a pipe, it is plain lines, one a row, nothing cut to fit a width (:mod:`autoft.cli.tables`).
"""

from __future__ import annotations

from typing import Sequence

from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from autoft.cli.tables import WholeTable
from autoft.searching.report_data import Baseline, EnsembleSummary, describe_ensemble, ensemble_name, epochs_run, trial_seconds
from autoft.core.text import duration
from autoft.searching.records import TrialRecord

TOP = 5
BASELINE_STYLE = "italic dim"
ENSEMBLE_STYLE = "bold magenta"
DEFAULT_RECIPE_STYLE = "dim"


def leaderboard(
    trials: Sequence[FrozenTrial],
    metric: str,
    *,
    baselines: Sequence[Baseline] = (),
    ensemble: EnsembleSummary | None = None,
    top: int = TOP,
) -> WholeTable:
    """A Rich table of the ``top`` completed trials by ``metric`` (higher is better), the default
    recipe when it is not among them, and the baselines and ensemble ranked among them by value."""
    ranked = sorted((t for t in trials if t.state == TrialState.COMPLETE and t.value is not None), key=lambda t: -t.value)
    shown = ranked[:top]
    default = next((t for t in ranked[top:] if TrialRecord.of(t).recipe == "default"), None)
    rows: list[tuple[float, list[str], str]] = [(t.value, _trial_cells(t, ranked.index(t) + 1), "") for t in shown]
    rows += [(b.value, ["ref", b.name, f"{b.value:.4f}", "baseline", "", b.note, "", ""], BASELINE_STYLE) for b in baselines]
    if ensemble is not None:
        members = ensemble_name(ensemble)
        rows.append((ensemble.value, ["ref", members, f"{ensemble.value:.4f}", "ensemble", "", describe_ensemble(ensemble), "", ""], ENSEMBLE_STYLE))
    rows.sort(key=lambda row: -row[0])

    table = Table("rank", "model", f"val {metric}", "state", "strategy", "key parameters", "epochs", "time", title=f"Top {min(top, len(ranked))} of {len(trials)} trials")
    for column in (0, 2, 6, 7):
        table.columns[column].justify = "right"
    for _, cells, style in rows:
        table.add_row(*cells, style=style or None)
    if default is not None:  # below a line, out of order: what the search is measured against
        table.add_section()
        table.add_row(*_trial_cells(default, ranked.index(default) + 1), style=DEFAULT_RECIPE_STYLE)
    if not ranked:
        table.caption = "no trial completed"
    return WholeTable(table)


def _trial_cells(trial: FrozenTrial, rank: int) -> list[str]:
    record = TrialRecord.of(trial)
    name = f"trial {trial.number}" + (" (default recipe)" if record.recipe == "default" else "")
    state = "cut short" if record.cut_short else "complete"
    folds = record.fold_scores
    epochs = f"{len(folds)} folds" if folds else str(epochs_run(trial))
    return [str(rank), name, f"{trial.value:.4f}", state, str(trial.params.get("strategy", "")), key_parameters(trial.params), epochs, duration(trial_seconds(trial), column=True)]


KEY_PARAMETERS = ("lr", "regularizer", "augment", "pseudo_labels", "freeze_depth")  # what most tells recipes apart


def key_parameters(params: dict) -> str:
    """``lr=0.00032 regularizer=mixup augment=none``: the few parameters that most tell recipes
    apart, the strategy left to its own column; every parameter is in report.html."""
    names = [n for n in KEY_PARAMETERS if n in params and params[n] not in ("none", None)]
    if "init" in params:
        names.append("init")
    return " ".join(f"{n}={_short(params[n])}" for n in names)


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.2g}"
    text = str(value)
    return text.rsplit("/", 1)[-1].removesuffix(".pt") if "/" in text else text  # a pretraining checkpoint by its file name
