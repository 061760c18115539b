"""The leaderboard at the end of a search: top trials by value, the default recipe, reference models apart."""

from __future__ import annotations

import io
from datetime import datetime, timedelta

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from rich.console import Console

from autoft.cli.leaderboard import BASELINE_STYLE, DEFAULT_RECIPE_STYLE, ENSEMBLE_STYLE, key_parameters, leaderboard
from autoft.searching.report_data import Baseline, EnsembleSummary

DISTRIBUTIONS = {
    "lr": FloatDistribution(1e-5, 1e-2, log=True),
    "dropout": FloatDistribution(0, 0.5),
    "freeze_depth": IntDistribution(0, 4),
    "strategy": CategoricalDistribution(["freeze", "l2sp"]),
}


def trial(number: int, value: float | None, *, state=TrialState.COMPLETE, seconds: float = 30.0, epochs: int = 6, **attrs) -> optuna.trial.FrozenTrial:
    start = datetime(2026, 1, 1, 12, 0, 0)
    t = create_trial(
        state=state,
        value=value,
        params={"lr": 3.2e-4 * (number + 1), "dropout": 0.125, "freeze_depth": number % 4, "strategy": "l2sp" if number % 2 else "freeze"},
        distributions=DISTRIBUTIONS,
        intermediate_values={e: (value or 0.5) - 0.01 * (epochs - e) for e in range(1, epochs + 1)},
        user_attrs=attrs,
    )
    t.number = number
    t.datetime_start, t.datetime_complete = start, start + timedelta(seconds=seconds)
    return t


def render(table, terminal: bool = True, width: int = 220) -> list[str]:
    console = Console(record=True, width=width, force_terminal=terminal, file=io.StringIO())
    console.print(table, crop=False)  # as `autoft search` prints it
    return console.export_text().splitlines()


def row_of(lines: list[str], needle: str) -> list[str]:
    line = next(line for line in lines if needle in line)
    return [cell.strip() for cell in line.strip("│ ").split("│")]


def test_the_top_trials_by_value_with_what_made_them():
    trials = [trial(0, 0.975, recipe="default"), trial(1, 0.981), trial(2, 0.962, seconds=102), trial(3, 0.986), trial(4, 0.990, seconds=4.25)]
    trials += [trial(5, 0.970), trial(6, 0.983), trial(7, None, state=TrialState.PRUNED, epochs=2), trial(8, None, state=TrialState.FAIL, epochs=0)]
    lines = render(leaderboard(trials, "accuracy"))
    assert "Top 5 of 9 trials" in lines[0]
    order = [row_of(lines, f"trial {n}")[0] for n in (4, 3, 6, 1, 0)]
    assert order == ["1", "2", "3", "4", "5"]
    assert row_of(lines, "trial 4") == ["1", "trial 4", "0.9900", "complete", "freeze", "lr=0.0016 freeze_depth=0", "6", "4.2s"]
    assert not any("trial 2" in line or "trial 5" in line or "trial 7" in line or "trial 8" in line for line in lines)


def test_the_default_recipe_is_shown_last_when_it_is_not_in_the_top():
    trials = [trial(0, 0.90, recipe="default", seconds=102)] + [trial(n, 0.95 + n / 1000) for n in range(1, 7)]
    table = leaderboard(trials, "accuracy")
    lines = render(table)
    assert row_of(lines, "default recipe")[:3] == ["7", "trial 0 (default recipe)", "0.9000"] and row_of(lines, "default recipe")[-1] == "1m42s"
    assert [line for line in lines if "trial" in line and "Top" not in line][-1].count("default recipe") == 1
    assert table.table.rows[-1].style == DEFAULT_RECIPE_STYLE


def test_baselines_and_the_ensemble_rank_among_the_trials_drawn_apart():
    trials = [trial(0, 0.975, recipe="default"), trial(1, 0.986), trial(2, 0.970)]
    table = leaderboard(
        trials,
        "accuracy",
        baselines=[Baseline("logistic regression on pixels", 0.881, "scikit-learn")],
        ensemble=EnsembleSummary(members=(1, 0, 2), value=0.991, latency_ms=12.3, single_latency_ms=4.1, batch_size=32),
    )
    lines = render(table)
    models = [row_of(lines, needle)[1] for needle in ("ensemble", "trial 1", "trial 0", "trial 2", "logistic")]
    body = [line for line in lines if any(m in line for m in models)]
    assert [next(m for m in models if m in line) for line in body] == models  # by value: 0.991, 0.986, 0.975, 0.970, 0.881
    assert row_of(lines, "ensemble")[:4] == ["ref", "ensemble of trials 1, 0, 2", "0.9910", "ensemble"]
    assert "(3.0x)" in row_of(lines, "ensemble")[5]
    assert row_of(lines, "logistic")[:4] == ["ref", "logistic regression on pixels", "0.8810", "baseline"]
    assert [r.style for r in table.table.rows] == [ENSEMBLE_STYLE, None, None, None, BASELINE_STYLE]


def test_an_ensemble_holding_simple_models_names_them():
    from autoft.searching.report_data import ensemble_name

    assert ensemble_name(EnsembleSummary(members=(1, "logistic regression on pixels"), value=0.96)) == "ensemble of trial 1 with logistic regression on pixels"
    assert ensemble_name(EnsembleSummary(members=(3, 0, "a", "b"), value=0.9)) == "ensemble of trials 3, 0 with a and b"
    assert ensemble_name(EnsembleSummary(members=("a", "b", "c"), value=0.9)) == "ensemble of a, b and c"
    assert ensemble_name(EnsembleSummary(members=(2, 2, 2), value=0.9)) == "trial 2 from 3 seeds"  # one recipe's fits from three seeds
    assert ensemble_name(EnsembleSummary(members=(2, 5), value=0.9)) == "ensemble of trials 2, 5"
    lines = render(leaderboard([trial(1, 0.94)], "accuracy", ensemble=EnsembleSummary(members=(1, "probe"), value=0.96)))
    assert row_of(lines, "ensemble")[1] == "ensemble of trial 1 with probe"


def test_cross_validated_and_cut_short_trials_say_so():
    lines = render(leaderboard([trial(0, 0.9, fold_scores={"0": 0.9, "1": 0.88, "2": 0.91}), trial(1, 0.8, cut_short="the time budget ran out")], "f1_macro"))
    assert "val f1_macro" in lines[2]
    assert row_of(lines, "trial 0")[6] == "3 folds" and row_of(lines, "trial 1")[3] == "cut short"


def test_no_completed_trial_is_said_plainly():
    lines = render(leaderboard([trial(0, None, state=TrialState.FAIL)], "accuracy"))
    assert "no trial completed" in "\n".join(lines)


def test_key_parameters_read_compactly():
    params = {"strategy": "l2sp", "weight_decay": 0.0123456, "lr": 0.00031623, "freeze_depth": 2, "regularizer": "none", "augment": "none", "init": "/cache/pretrain/k/backbone-epoch12.pt"}
    assert key_parameters(params) == "lr=0.00032 freeze_depth=2 init=backbone-epoch12"  # the few that tell recipes apart; "none" is left out
    assert key_parameters({**params, "regularizer": "mixup", "pseudo_labels": "propagate"}) == "lr=0.00032 regularizer=mixup pseudo_labels=propagate freeze_depth=2 init=backbone-epoch12"


def test_printed_to_a_log_every_row_is_one_whole_line_at_any_width():
    trials = [trial(0, 0.975, recipe="default"), trial(1, 0.981, cut_short="the time budget ran out")]
    trials[1].params.update(regularizer="mixup", augment="randaugment", pseudo_labels="propagate", init="runs/pretrain/simclr-epoch-40.pt")
    baselines = [Baseline("logistic regression on pixels", 0.9, "same splits")]
    boxed = render(leaderboard(trials, "accuracy", baselines=baselines), terminal=True, width=80)
    assert any("…" in line for line in boxed) and all(len(line) <= 80 for line in boxed)  # a terminal: fitted, cells cut
    lines = render(leaderboard(trials, "accuracy", baselines=baselines), terminal=False, width=80)
    assert lines[0] == "Top 2 of 2 trials" and lines[1].split() == ["rank", "model", "val", "accuracy", "state", "strategy", "key", "parameters", "epochs", "time"]
    assert len(lines) == 5 and not any("…" in line or "│" in line for line in lines)
    row = next(line for line in lines if "trial 1" in line)
    assert "lr=0.00064 regularizer=mixup augment=randaugment pseudo_labels=propagate freeze_depth=1 init=simclr-epoch-40" in row
    assert row.split()[:2] == ["1", "trial"] and "cut short" in row
    assert "logistic regression on pixels" in next(line for line in lines if line.lstrip().startswith("ref"))
