"""report.html for a search: the study, plus what only the search knows (plan, timings, baselines, evidence)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from autoft.searching.report import write_report
from autoft.searching.report_data import Baseline, BestEvaluation, EnsembleSummary, ReportExtras, SearchPlan, Timings
from autoft.searching.finishing import best_trial
from autoft.searching.objective import load_predictions
from autoft.searching.session import Session


def write_search_report(session: Session, path: Path, metrics: dict[str, Any] | None = None) -> Path:
    study, plan, config = session.study, session.ctx.plan, session.ctx.config
    best = best_trial(study)
    evaluation = _evaluation(session, best.number) if best is not None else None
    confusion = None
    if evaluation is not None:
        from sklearn.metrics import confusion_matrix

        confusion = confusion_matrix(evaluation.labels, evaluation.probabilities.argmax(1), labels=list(range(session.ctx.data.num_classes))).tolist()
    pretraining = f"{config.pretrain}, {plan.pretrain_epochs} epochs on {len(session.ctx.unlabelled) + len(session.ctx.pool)} images" if plan.pretrain_epochs and session.ctx.unlabelled is not None else None
    extras = ReportExtras(
        plan=SearchPlan(image_size=plan.image_size, epochs=plan.evaluations, steps_per_epoch=plan.eval_every, trials=plan.trials or plan.expected_trials,
                        pretraining=pretraining, folds=plan.folds, time_budget_s=config.seconds),  # fmt: skip
        timings=Timings(**{k: session.state.timings.get(k) for k in ("decoding", "pretraining", "trials", "refit", "export")}),
        baselines=[Baseline(b.name, b.value, "same splits as the trials") for b in session.ctx.baselines],
        ensemble=_ensemble(metrics),
        best_eval=evaluation,
    )  # fmt: skip
    info = {
        "study": study.study_name, "backbone": config.backbone, "weights": session.ctx.weights or "random", "data": session.ctx.data_source or "(in memory)",
        "metric": config.metric, "plan": plan.line(), "selection": (metrics or {}).get("selection", ""), "summary": (metrics or {}).get("summary", ""),
        "space": session.ctx.space.describe(session.ctx.n_groups, session.ctx.strategies),
    }  # fmt: skip
    return write_report(study, path, info=info, classes=session.ctx.data.classes, confusion=confusion, extras=extras)


def _evaluation(session: Session, number: int) -> BestEvaluation | None:
    """The best trial's predictions on the images it did not train on: its validation split or out-of-fold."""
    saved = load_predictions(session.ctx.trial_dir(number))
    if saved is None:
        return None
    index, probabilities = saved
    split = "out-of-fold" if session.ctx.cross_validated else "validation"
    return BestEvaluation(labels=session.ctx.pool.labels.numpy()[index], probabilities=probabilities, classes=session.ctx.data.classes,
                          images=session.ctx.pool.subset(index), split=split)  # fmt: skip


def _ensemble(metrics: dict[str, Any] | None) -> EnsembleSummary | None:
    model = (metrics or {}).get("model", {})
    if len(model.get("members", [])) < 2:
        return None
    latency = (metrics or {}).get("latency_ms") or {}
    return EnsembleSummary(members=tuple(model["members"]), value=float(metrics["value"]), latency_ms=latency.get("model"), single_latency_ms=latency.get("single"),
                           batch_size=latency.get("batch_size"), note=f"weights {', '.join(f'{w:.2f}' for w in model['weights'])}")  # fmt: skip


REPORT_FILE = "report.html"


def write_report_quietly(session: Session, metrics: dict[str, Any] | None = None) -> None:
    """A report failure must never stop a search; say so and go on."""
    try:
        write_search_report(session, session.ctx.out / REPORT_FILE, metrics)
    except Exception as exc:  # noqa: BLE001 - matplotlib and importance errors vary
        warnings.warn(f"could not write {REPORT_FILE}: {type(exc).__name__}: {exc}", stacklevel=2)
