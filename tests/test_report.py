"""report.html from a study: sections, inline plots, and the notes for what cannot be drawn yet."""

from __future__ import annotations

import html
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from autoft.report import write_report

DISTRIBUTIONS = {"lr": FloatDistribution(1e-5, 1e-2, log=True), "strategy": CategoricalDistribution(["freeze", "l2sp"])}


def _trial(number: int, lr: float, state=TrialState.COMPLETE, **attrs) -> optuna.trial.FrozenTrial:
    curve = [0.5 + 0.1 * e - abs(lr - 1e-3) * 100 for e in range(1, 4)]
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_accuracy": v, "val_f1_macro": v} for e, v in enumerate(curve, 1)]
    complete = state == TrialState.COMPLETE
    return create_trial(
        state=state,
        value=max(curve) if complete else None,
        params={"lr": lr, "strategy": "freeze" if number % 2 else "l2sp"},
        distributions=DISTRIBUTIONS,
        intermediate_values={e: v for e, v in enumerate(curve, 1)} if state != TrialState.FAIL else {},
        user_attrs={"history": history, **attrs} if complete else attrs,
    )


def _study(trials) -> optuna.Study:
    study = optuna.create_study(direction="maximize", study_name="colours")
    for t in trials:
        study.add_trial(t)
    return study


def test_report_draws_every_plot_inline(tmp_path: Path):
    trials = [_trial(i, lr) for i, lr in enumerate([1e-3, 3e-4, 2e-3, 5e-3, 1e-4])]
    trials.append(_trial(5, 1e-5, TrialState.PRUNED))
    trials.append(_trial(6, 1e-2, TrialState.FAIL, fail_reason="FloatingPointError: loss is nan <at> epoch 2"))
    path = write_report(_study(trials), tmp_path / "report.html", info={"backbone": "test_resnet", "metric": "accuracy", "space": {"lr": "1e-05 to 0.01 (log)"}}, classes=["red", "green"], confusion=[[5, 1], [0, 6]])
    page = path.read_text()
    sections = page.split("<h2>")[1:]
    plotted = {s.split("</h2>")[0] for s in sections if "<svg" in s}
    assert plotted == {"Optimisation history", "Parameter importances", "Learning curves of the best trials", "Confusion matrix of the best model"}
    assert "accuracy 0.9167" in page  # 11 of 12 on the diagonal
    assert html.escape("FloatingPointError: loss is nan <at> epoch 2") in page and "<at>" not in page
    assert "pruned after epoch 3" in page and "1e-05 to 0.01 (log)" in page
    assert "<script" not in page and "src=" not in page  # nothing to fetch


def test_early_report_explains_missing_plots(tmp_path: Path):
    page = write_report(_study([_trial(0, 1e-3)]), tmp_path / "report.html").read_text()
    assert "Parameter importances need at least two completed trials." in page
    assert "Appears once the best trial has finished training." in page
    assert page.count("<svg") == 2  # history and learning curves only


def test_report_of_an_empty_study(tmp_path: Path):
    page = write_report(_study([]), tmp_path / "report.html").read_text()
    assert "No trial has completed yet." in page and "<svg" not in page
