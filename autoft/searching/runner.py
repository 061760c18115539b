"""The Python API behind ``autoft search``: prepare, run the trials, finish.

:func:`search` is a thin wrapper over :class:`~autoft.searching.config.SearchConfig`;
:func:`run_search` runs the three phases: :func:`~autoft.searching.preparing.prepare`
(weights, calibration and the plan, decoding, the study, pretraining and baselines),
:func:`run_trials` (the Optuna study, within the budget) and :func:`finish` (the model
chosen, refit, exported, published and reported).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from autoft.deploy.exporting import ExportFailed
from autoft.errors import AutoftError
from autoft.searching.config import SearchConfig
from autoft.searching.finishing import FinalModel, best_trial, add_seeds, build_final, chance_level, choose_members, mixed_evidence, selection_evidence, wall_time
from autoft.searching.publishing import publish_best
from autoft.searching.objective import stop_on_full_disk
from autoft.searching.preparing import prepare
from autoft.searching.reporting import REPORT_FILE, write_report_quietly
from autoft.searching.selection import candidate_final, judge
from autoft.core.runtime import stop_requested, torch_threads
from autoft.searching.records import TrialRecord, count_states, visible
from autoft.searching.session import Session
from autoft.searching.trials import open_study, run_trials
from autoft.searching.worker import worker_main
from autoft.searching.workers import parallel_workers


@dataclass
class SearchResult:
    out: Path
    study_name: str
    storage: str
    best_number: int | None  # the trial shipped; None when a simple model ships
    best_value: float
    best_params: dict[str, Any]
    best_dir: Path
    report: Path
    states: dict[str, int]  # trials by state: COMPLETE, PRUNED, FAIL...
    metrics: dict[str, Any]
    seconds: float
    queued_again: list[int] = field(default_factory=list)  # crashed trials run again
    plan: dict[str, Any] = field(default_factory=dict)


def search(backbone: str, data: Any, out: str | Path | None = None, **options: Any) -> SearchResult:
    """Search fine-tuning recipes for ``backbone`` on ``data``; write the best model and a report.

    ``options`` are :class:`~autoft.searching.config.SearchConfig` fields (``timeout="6m"``,
    ``unlabelled=``, ``trials=``, ``cv=``, ...). Running the same call again resumes:
    finished trials are kept and crashed ones run again.
    """
    return run_search(SearchConfig(backbone, data, out, **options))


def run_search(config: SearchConfig) -> SearchResult:
    session = prepare(config)
    with torch_threads(session.ctx.plan.threads):  # the CPU threads calibration measured fastest; the caller's count comes back after
        return _run(session)


def _run(session: Session) -> SearchResult:
    config = session.ctx.config
    with stop_on_full_disk(session):  # a rerun on a disk still full: recovering trials and storing the plan write to the storage
        queued_again = open_study(session)
    for hook in config.pre_search:
        hook(session)
    try:
        with session.timed("trials"), parallel_workers(session, worker_main):
            run_trials(session, queued_again)
        if stop_requested():  # Ctrl-C or SIGTERM once the trials were over: no refit, a rerun finishes
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        write_report_quietly(session)
        raise
    return finish(session, queued_again)


# ---------------------------------------------------------------------------
# The end


def finish(session: Session, queued_again: list[int]) -> SearchResult:
    """Choose what ships (the trials' model or a simple candidate), refit it, publish ``best/``, report."""
    study = session.study
    trials = visible(study.get_trials(deepcopy=False))
    states = count_states(trials)
    best = best_trial(study)
    with session.timed("refit"):
        final = _final_model(session, best, trials, states)
    metrics = describe_final(session, best, final, states)
    try:
        best_dir = publish_best(session, final, metrics)
    except ExportFailed as failure:
        final, metrics, best_dir = _publish_alone(session, best, final, states, failure)
    session.state.timings["total"] = wall_time(session)
    write_report_quietly(session, metrics)
    return SearchResult(
        out=session.ctx.out, study_name=study.study_name, storage=session.ctx.storage_url, best_number=best.number if best and not final.candidate else None,
        best_value=float(metrics["value"]), best_params=dict(best.params) if best and not final.candidate else {}, best_dir=best_dir,
        report=session.ctx.out / REPORT_FILE, states=states, metrics=metrics, seconds=wall_time(session), queued_again=queued_again, plan=session.ctx.plan.as_dict(),
    )  # fmt: skip


def _publish_alone(session: Session, best: optuna.trial.FrozenTrial | None, final: FinalModel, states: dict[str, int], failure: ExportFailed):
    """The model chosen failed its export's verification: ship, of its members and then of the
    simple models, the best one alone whose export passes, and say why. A search never ends
    without a model for want of one export (gray scenes at 6m: an ensemble's k-NN member ranked
    tied neighbours apart in PyTorch and onnxruntime, and the search ended with none)."""
    note = f"{_shipped(final)} failed its export ({failure}); the best of its members and the simple models that exports ships alone"
    for single in _singles(session, final):
        single.notes[:0] = [*final.notes, note]
        metrics = describe_final(session, best, single, states)
        try:
            return single, metrics, publish_best(session, single, metrics)
        except ExportFailed as again:
            note += f"; {_shipped(single)} failed too ({again})"
    raise failure


def _singles(session: Session, final: FinalModel):
    """Each member of ``final`` alone (an ensemble's), then each simple model not among them, best first."""
    if final.is_ensemble:
        members = sorted(zip(final.members, final.checkpoints), key=lambda mc: -session.ctx.sign * _single_value(session, mc[0]))
        for member, checkpoint in members:
            if isinstance(member, int):
                yield FinalModel([checkpoint], [1.0], [member], final.refit)
            else:
                yield FinalModel([checkpoint], [1.0], [], None, candidate=member, reason="the rest of the ensemble could not be exported")
    tried = {final.candidate, *final.simple_members}
    for candidate in sorted(session.ctx.candidates, key=lambda c: -session.ctx.sign * c.value):
        if candidate.name not in tried:
            yield candidate_final(session, candidate, "the model chosen could not be exported")


def _shipped(final: FinalModel) -> str:
    return f"the {final.name}" if final.is_ensemble and final.seeds == 1 else final.name


def _single_value(session: Session, member: int | str) -> float:
    """A trial's value, or a simple model's on the same splits."""
    if isinstance(member, int):
        return float(session.study.trials[member].value)
    return next(c.value for c in session.ctx.candidates if c.name == member)


def _final_model(session: Session, best: optuna.trial.FrozenTrial | None, trials: list, states: dict[str, int]) -> FinalModel:
    if best is None:
        verdict = judge(session, None, "")
        if verdict.candidate is None:
            write_report_quietly(session)
            reasons = [f"trial {t.number}: {TrialRecord.of(t).reason(t)}" for t in trials if TrialRecord.of(t).reason(t)]
            raise AutoftError(f"no trial completed ({', '.join(f'{n} {k.lower()}' for k, n in states.items()) or 'none ran'})" + (f"; {reasons[0]}" if reasons else ""))
        return candidate_final(session, verdict.candidate, verdict.reason)
    members, choice = choose_members(session, best)
    ensemble = len(members) > 1 and choice is not None
    verdict = judge(session, choice.value if ensemble else float(best.value), "ensemble of trials" if ensemble else f"best trial ({best.number})", mixed_evidence(session, best, members))
    if verdict.candidate is not None:
        return candidate_final(session, verdict.candidate, verdict.reason)
    final = build_final(session, best, members, choice)
    if ensemble and len(final.checkpoints) < len(members):  # the time left built fewer members (the best trial first): judge what ships
        if final.is_ensemble and final.choice is not None:
            verdict = judge(session, final.choice.value, f"ensemble of the {len(final.checkpoints)} members the time left built",
                            mixed_evidence(session, best, dict(zip(final.members, final.weights))))  # fmt: skip
        else:
            only = final.members[0]
            verdict = judge(session, _single_value(session, only), f"{'trial ' + str(only) if isinstance(only, int) else only}, the one ensemble member the time left built",
                            mixed_evidence(session, best, {only: 1.0}))  # fmt: skip
        if verdict.candidate is not None:
            return candidate_final(session, verdict.candidate, verdict.reason)
    return add_seeds(session, final)


def describe_final(session: Session, best: optuna.trial.FrozenTrial | None, final: FinalModel, states: dict[str, int]) -> dict[str, Any]:
    """best/metrics.json: what was chosen, on what evidence, against which references."""
    config, plan, ctx = session.ctx.config, session.ctx.plan, session.ctx
    if final.candidate:
        value = _single_value(session, final.candidate)
        model = f"{final.candidate}, refit on {len(ctx.pool)} images"
    else:
        value = final.choice.value if final.is_ensemble and final.choice else _single_value(session, final.members[0])
        model = final.name
        if final.simple_members:
            *others, last = final.simple_members
            model += f" with {', '.join(others) + ' and ' if others else ''}{last}"
        if final.refit:
            model += f", refit on {final.refit['images']} images"
    evidence = f"{plan.folds}-fold cross-validation" + (f" x{plan.repeats}" if plan.repeats > 1 else "") + f" on {len(ctx.pool)} images" if plan.folds else f"a validation split of {len(ctx.splits[0][1])} images"
    summary = f"best {value:.4f} ({model})" + _against_references(session, value, final)
    metrics: dict[str, Any] = {
        "study": session.study.study_name, "trial": best.number if best and not final.candidate else None, "metric": config.metric, "value": value,
        "best_trial_value": float(best.value) if best else None, "selection": evidence, "summary": summary, "baselines": [{"name": b.name, "value": b.value} for b in ctx.baselines], "beat_baselines": _beats_references(session, value, final),
        "model": {"members": final.members, "weights": final.weights, "refit": final.refit, "candidate": final.candidate},
        "notes": final.notes + session.state.notes, "plan": plan.as_dict(), "trial_states": states, "timings": dict(session.state.timings),
        "params": dict(best.params) if best and not final.candidate else {}, "history": TrialRecord.of(best).history if best and not final.candidate else [],
        "num_labelled": len(ctx.pool), "num_unlabelled": 0 if ctx.unlabelled is None else len(ctx.unlabelled),
    }  # fmt: skip
    chance = chance_level(ctx.pool.labels.numpy())
    if config.metric == "accuracy" and value <= chance + 0.02:
        metrics["warning"] = f"the best model is no better than chance ({chance:.3f}, always the most common class)"
        metrics["summary"] += f"; WARNING: {metrics['warning']}"
    degenerate = _degenerate(session, best) if best and not final.candidate else None
    if degenerate:
        metrics.setdefault("warning", degenerate)
    return metrics


def _beats_references(session: Session, value: float, final: FinalModel) -> bool | None:
    """Whether the model shipped beats every simple model (None: there were none); a simple model shipped beats none."""
    baselines = session.ctx.baselines
    if not baselines:
        return None
    if final.candidate:
        return False
    sign = session.ctx.sign
    return all(sign * value > sign * b.value for b in baselines)


def _against_references(session: Session, value: float, final: FinalModel) -> str:
    """`` vs logistic regression on pixels 0.9610`` and, when a simple model ships, why."""
    if final.candidate:
        return f": {final.reason}" if final.reason else ""
    baselines = session.ctx.baselines
    if not baselines:
        return ""
    sign = session.ctx.sign
    top = max(baselines, key=lambda b: sign * b.value)
    text = f" vs {top.name} {top.value:.4f}"
    if sign * value <= sign * top.value:
        text += f": the search did not beat {top.name}"
    return text


def _degenerate(session: Session, best: optuna.trial.FrozenTrial) -> str | None:
    """A warning when the best trial's held-out predictions are near-uniform or one class for all."""
    from autoft.deploy.predict import degenerate_predictions

    index, predictions = selection_evidence(session, best)
    if best.number not in predictions:
        return None
    return degenerate_predictions(predictions[best.number], session.ctx.data.classes)
