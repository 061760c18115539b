"""The Python API behind ``autoft search``: prepare, run the trials, finish.

:func:`search` is a thin wrapper over :class:`~autoft.searching.config.SearchConfig`;
:func:`run_search` runs the three phases: :func:`~autoft.searching.preparing.prepare`
(weights, calibration and the plan, decoding, the study, pretraining and baselines),
:func:`run_trials` (the Optuna study, within the budget) and :func:`finish` (the model
chosen, refit, exported, published and reported).
"""

from __future__ import annotations

import shutil
import socket
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from autoft.errors import AutoftError
from autoft.events import SearchStart, TrialEnd
from autoft.io import file_lock
from autoft.searching.config import SearchConfig
from autoft.searching.finishing import FinalModel, best_trial, build_final, chance_level, publish_best, selection_evidence, wall_time
from autoft.searching.objective import CLEANUP_LOCK, STATE_NAME, Objective, stop_on_full_disk
from autoft.searching.preparing import finish_preparing, prepare
from autoft.runtime import stop_requested
from autoft.searching.records import TrialRecord, count_states, visible
from autoft.searching.session import Session
from autoft.searching.storage import awaited_states, counted_trials, has_heartbeat, heartbeat_seconds, lost_trials, recover_trials, running_elsewhere
from autoft.searching.workers import parallel_workers

REPORT_FILE = "report.html"
PORTFOLIO = (  # tried first on a fresh study, after the default recipe: strong, different recipes
    {"augment": "shift"},  # small objects that fill the frame: a random crop cuts them, a shift keeps them whole
    {"regularizer": "mixup"},
    {"augment": "none"},  # for images any crop or flip changes the meaning of (text, charts)
)


@dataclass
class SearchResult:
    out: Path
    study_name: str
    storage: str
    best_number: int
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
    with stop_on_full_disk(session):  # a rerun on a disk still full: recovering trials and storing the plan write to the storage
        queued_again = open_study(session)
        finish_preparing(session)
    for hook in config.pre_search:
        hook(session)
    try:
        with session.timed("trials"), parallel_workers(session):
            run_trials(session, queued_again)
        if stop_requested():  # Ctrl-C or SIGTERM once the trials were over: no refit, a rerun finishes
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        write_report_quietly(session)
        raise
    return finish(session, queued_again)


# ---------------------------------------------------------------------------
# The study


def open_study(session: Session) -> list[int]:
    """Check the study is this search's, recover crashed trials, and seed a fresh one."""
    study, config = session.study, session.config
    stored = {"backbone": config.backbone, "weights": session.weights, "data": session.data_source, "metric": config.metric,
              "num_classes": session.data.num_classes, "image_size": session.data.image_size, "folds": session.plan.folds}  # fmt: skip
    _check_config(study, stored)
    queued_again = recover_trials(study)
    existing = study.get_trials(deepcopy=False)
    # Same seed, same fresh search; a resumed or parallel worker must not replay the first
    # worker's random draws, so its sampler seed also depends on who and when.
    seed = config.seed if not existing and config.storage is None else zlib.crc32(f"{config.seed}/{len(existing)}/{socket.gethostname()}/{time.time_ns()}".encode())
    study.sampler = make_sampler(config.sampler, seed)
    study.pruner = make_pruner(config.pruner, session.plan.evaluations, session.cross_validated)
    if not existing:
        _enqueue_portfolio(session)
    return queued_again


def _check_config(study: optuna.Study, config: dict[str, Any]) -> None:
    stored = study.user_attrs.get("autoft")
    if stored is None:
        study.set_user_attr("autoft", config)
        return
    for key in ("backbone", "weights", "metric", "num_classes", "image_size", "folds"):
        if key in stored and stored.get(key) != config[key]:
            raise AutoftError(
                f"study {study.study_name!r} in this storage was started with {key} {stored.get(key)!r}, not {config[key]!r}; "
                "pass another --study (or --out) to start a new search, or the same flags to resume it"
            )


def _enqueue_portfolio(session: Session) -> None:
    """The known-good default recipe first, then a few strong, different ones."""
    space, strategies = session.space, session.strategies
    first = "freeze" if "freeze" in strategies else next(iter(strategies))
    default = space.defaults(first, strategies[first], session.n_groups)
    if session.unlabelled is not None:
        default = {**default, **{k: v for k, v in {"pseudo_labels": "propagate", "pseudo_fraction": 0.6}.items() if space.contains(k, v)}}
    session.study.enqueue_trial(default, user_attrs=TrialRecord.attrs(recipe="default"))
    room = len(PORTFOLIO) if session.config.trials is None else session.config.trials - 1
    for change in PORTFOLIO[: max(0, room)]:
        recipe = {**default, **change}
        if all(space.contains(k, v) for k, v in change.items()):
            session.study.enqueue_trial(recipe, user_attrs=TrialRecord.attrs(recipe="portfolio"))


def make_sampler(name: Any, seed: int) -> optuna.samplers.BaseSampler:
    if isinstance(name, optuna.samplers.BaseSampler):
        return name
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: parallel workers do not all sample next to the same running trial.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=5)


def make_pruner(name: Any, evaluations: int, folds: bool) -> optuna.pruners.BasePruner:
    if isinstance(name, optuna.pruners.BasePruner):
        return name
    name = name or ("wilcoxon" if folds else "hyperband")
    if folds and name in ("hyperband", "median"):
        raise AutoftError(f"--pruner {name} compares evaluations, but cross-validated trials report one score per fold; use --pruner wilcoxon or none")
    if not folds and name == "wilcoxon":
        raise AutoftError("--pruner wilcoxon compares per-fold scores; use it with cross-validation (--cv K)")
    if name == "hyperband":
        # The first evaluation is mostly learning-rate warmup: judging a trial on it alone is noise.
        return optuna.pruners.HyperbandPruner(min_resource=2 if evaluations >= 4 else 1, max_resource=evaluations, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "wilcoxon":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=0.1)
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------------------
# The trials


def run_trials(session: Session, queued_again: list[int]) -> None:
    """Trials until the cap (``--trials``), or while time remains for another one."""
    config, study = session.config, session.study
    total = config.trials if config.trials is not None else (None if config.seconds is not None else 20)
    done = counted_trials(study.get_trials(deepcopy=False))
    session.emit(SearchStart(study=study.study_name, total=total or session.plan.expected_trials, done=done, queued_again=queued_again))
    after = _AfterTrial(session, total)
    with stop_on_full_disk(session):
        while True:
            if stop_requested():
                raise KeyboardInterrupt
            if total is None or done < total:
                _optimize(session, n_trials=None if total is None else total - done, callbacks=[after])
            if not await_other_workers(session, total):
                return
            done = counted_trials(study.get_trials(deepcopy=False))


def _optimize(session: Session, n_trials: int | None, callbacks: list) -> None:
    try:
        session.study.optimize(Objective(session), n_trials=n_trials, catch=(Exception,), callbacks=callbacks, gc_after_trial=False)
    except ValueError as exc:
        # Another worker found this worker's heartbeat stale (a pause past the grace period) and
        # failed the trial, then queued it again: its result cannot be stored, the retry runs it.
        if "Cannot tell a FAIL trial" not in str(exc):
            raise
        session.notes.append("a trial was failed by another worker that found its heartbeat late (AUTOFT_GRACE_SECONDS), and ran again")


def await_other_workers(session: Session, total: int | None) -> bool:
    """Wait while other workers (other machines, or --jobs processes) run trials of the study,
    within the trials' deadline: a worker whose trial is lost turns stale and is failed and queued
    again here. True when a trial waits to be run (run trials again), False when none runs elsewhere.
    Every worker so ends on the whole study, and builds its model from all of it."""
    heartbeat = has_heartbeat(session.storage_url)
    poll = min(heartbeat_seconds()[0], 5) if heartbeat else 0.5
    while True:
        if stop_requested():
            raise KeyboardInterrupt
        if session.trials_deadline is not None and time.monotonic() >= session.trials_deadline:
            return False
        lost_trials(session.study)  # a stale or dead worker's trial failed and queued again
        trials = session.study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials) and (total is None or counted_trials(trials) < total):
            return True
        if not running_elsewhere(session.study, heartbeat):
            return False
        time.sleep(poll)


REPORT_SHARE = 0.05  # of the trials' time, the most that refreshing report.html between trials may take


class _AfterTrial:
    """After each trial: drop weights that cannot be used, refresh the report, stop at the cap or the budget.

    The report is refreshed after a trial only when the time since the last refresh is
    at least 1 / :data:`REPORT_SHARE` times what that refresh took (its plots cost seconds
    once a study has many trials); the search writes it whole at its end.
    """

    def __init__(self, session: Session, total: int | None):
        self.session, self.total = session, total
        self.report_cost, self.reported = 0.0, float("-inf")

    def _refresh_report(self) -> None:
        if time.monotonic() - self.reported < self.report_cost / REPORT_SHARE:
            return
        started = time.monotonic()
        write_report_quietly(self.session)
        self.reported = time.monotonic()
        self.report_cost = self.reported - started

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        session = self.session
        record = TrialRecord.of(trial)
        if record.surplus:
            return  # it never trained: nothing to clean, report or count
        trials = study.get_trials(deepcopy=False)
        best = best_trial(study)
        with file_lock(session.out / CLEANUP_LOCK, wait=False) as held:
            if held:  # only one worker deletes trial folders at a time
                prune_trial_folders(session.out, trials, best, keep_predictions=session.config.ensemble > 1)
        if session.worker == 0:  # the command's process writes the report; --jobs workers only train
            self._refresh_report()
        done = counted_trials(trials)
        session.emit(TrialEnd(
            number=trial.number, state=_state_label(trial), value=trial.value, reason=record.reason(trial) or None,
            best_value=best.value if best else None, best_number=best.number if best else None, done=done, total=self.total or done,
        ))  # fmt: skip
        if self.total is not None and done >= self.total:
            study.stop()  # other workers count toward the same total
        left = None if session.trials_deadline is None else session.trials_deadline - time.monotonic()
        if left is not None and left < 0.5 * session.fit_seconds() * (session.plan.folds or 1) * session.plan.repeats:
            study.stop()  # too little time for another trial to say anything: it goes to the refit


def _state_label(trial: optuna.trial.FrozenTrial) -> str:
    return trial.state.name


def prune_trial_folders(out: Path, trials: list[optuna.trial.FrozenTrial], best: optuna.trial.FrozenTrial | None, keep_predictions: bool) -> None:
    """Keep the weights of the best trial and of unfinished ones, and the state of each crashed
    trial that a retry, queued, running or to come, will resume from (the newest attempt's; the
    retry takes that folder over); keep every completed trial's predictions when ensembles are
    on; delete the rest, superseded attempts included. Call it holding :data:`CLEANUP_LOCK`."""
    folder = out / "trials"
    if not folder.is_dir():
        return
    by_number = {t.number: t for t in trials}
    keep = {t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)}
    keep |= awaited_states(trials, has_state=lambda number: (folder / str(number) / STATE_NAME).is_file())
    if best is not None:
        keep.add(best.number)
    for child in folder.iterdir():
        if not (child.is_dir() and child.name.isdigit()) or int(child.name) in keep:
            continue
        trial = by_number.get(int(child.name))
        if keep_predictions and trial is not None and trial.state == TrialState.COMPLETE:
            for item in child.iterdir():
                if item.name != "predictions.npy":
                    item.unlink(missing_ok=True) if item.is_file() else shutil.rmtree(item, ignore_errors=True)
        elif trial is None or trial.state != TrialState.RUNNING:
            shutil.rmtree(child, ignore_errors=True)


# ---------------------------------------------------------------------------
# The end


def finish(session: Session, queued_again: list[int]) -> SearchResult:
    study = session.study
    trials = visible(study.get_trials(deepcopy=False))
    states = count_states(trials)
    best = best_trial(study)
    if best is None:
        write_report_quietly(session)
        reasons = [f"trial {t.number}: {TrialRecord.of(t).reason(t)}" for t in trials if TrialRecord.of(t).reason(t)]
        raise AutoftError(f"no trial completed ({', '.join(f'{n} {k.lower()}' for k, n in states.items()) or 'none ran'})" + (f"; {reasons[0]}" if reasons else ""))
    with session.timed("refit"):
        final = build_final(session, best)
    metrics = describe_final(session, best, final, states)
    best_dir = publish_best(session, final, metrics)
    session.timings["total"] = wall_time(session)
    write_report_quietly(session, metrics)
    return SearchResult(
        out=session.out, study_name=study.study_name, storage=session.storage_url, best_number=best.number, best_value=float(best.value),
        best_params=dict(best.params), best_dir=best_dir, report=session.out / REPORT_FILE, states=states, metrics=metrics,
        seconds=wall_time(session), queued_again=queued_again, plan=session.plan.as_dict(),
    )  # fmt: skip


def describe_final(session: Session, best: optuna.trial.FrozenTrial, final: FinalModel, states: dict[str, int]) -> dict[str, Any]:
    """best/metrics.json: what was chosen, on what evidence, against which references."""
    config, plan = session.config, session.plan
    value = final.choice.value if final.is_ensemble and final.choice else float(best.value)
    evidence = f"{plan.folds}-fold cross-validation" + (f" x{plan.repeats}" if plan.repeats > 1 else "") + f" on {len(session.pool)} images" if plan.folds else f"a validation split of {len(session.splits[0][1])} images"
    model = f"ensemble of {len(final.trials)}" if final.is_ensemble else f"trial {best.number}"
    if final.refit:
        model += f", refit on {final.refit['images']} images"
    summary = f"best {value:.4f} ({model})"
    baselines = [{"name": b.name, "value": b.value} for b in session.baselines]
    if baselines:
        sign = 1.0 if session.study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
        top = max(session.baselines, key=lambda b: sign * b.value)
        summary += f" vs {top.name} {top.value:.4f}"
        if sign * value <= sign * top.value:
            summary += f": the search did not beat {top.name}"
    beaten = None if not baselines else sign * value > sign * top.value  # None: no baseline to beat
    metrics: dict[str, Any] = {
        "study": session.study.study_name, "trial": best.number, "metric": config.metric, "value": value, "best_trial_value": float(best.value),
        "selection": evidence, "summary": summary, "baselines": baselines, "beat_baselines": beaten, "model": {"members": final.trials, "weights": final.weights, "refit": final.refit},
        "notes": final.notes + session.notes, "plan": plan.as_dict(), "trial_states": states, "timings": dict(session.timings), "params": dict(best.params),
        "history": TrialRecord.of(best).history, "num_labelled": len(session.pool), "num_unlabelled": 0 if session.unlabelled is None else len(session.unlabelled),
    }  # fmt: skip
    chance = chance_level(session.pool.labels.numpy())
    if config.metric == "accuracy" and value <= chance + 0.02:
        metrics["warning"] = f"the best model is no better than chance ({chance:.3f}, always the most common class)"
        metrics["summary"] += f"; WARNING: {metrics['warning']}"
    degenerate = _degenerate(session, best)
    if degenerate:
        metrics.setdefault("warning", degenerate)
    return metrics


def _degenerate(session: Session, best: optuna.trial.FrozenTrial) -> str | None:
    """A warning when the best trial's held-out predictions are near-uniform or one class for all."""
    from autoft.predict import degenerate_predictions

    index, predictions = selection_evidence(session, best)
    if best.number not in predictions:
        return None
    return degenerate_predictions(predictions[best.number], session.data.classes)


def write_report_quietly(session: Session, metrics: dict[str, Any] | None = None) -> None:
    """A report failure must never stop a search; say so and go on."""
    from autoft.searching.reporting import write_search_report

    try:
        write_search_report(session, session.out / REPORT_FILE, metrics)
    except Exception as exc:  # noqa: BLE001 - matplotlib and importance errors vary
        warnings.warn(f"could not write {REPORT_FILE}: {type(exc).__name__}: {exc}", stacklevel=2)
