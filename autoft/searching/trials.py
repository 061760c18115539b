"""The trials of a search: the study configured and seeded, then Optuna runs :class:`Objective`
until the cap (``--trials``) or while the budget holds another trial.

The command's process and every ``--jobs`` worker run the same :func:`run_trials` on the
same study; :func:`configure_study` gives each its own sampler seed and the same pruner.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from autoft.errors import AutoftError
from autoft.core.events import SearchStart, TrialEnd
from autoft.core.io import file_lock
from autoft.searching.finishing import best_trial, ensemble_reserve
from autoft.searching.plan_search import NOISY_VAL
from autoft.searching.selection import TIE_TOLERANCE
from autoft.searching.objective import CLEANUP_LOCK, STATE_NAME, Objective, stop_on_full_disk
from autoft.searching.reporting import write_report_quietly
from autoft.core.runtime import stop_requested
from autoft.searching.records import TrialRecord
from autoft.searching.session import Session, metric_sign
from autoft.searching.storage import awaited_states, counted_trials, has_heartbeat, heartbeat_seconds, lost_trials, recover_trials, running_elsewhere

PRETRAINED_LR = 3e-4  # the default recipe's learning rate from pretrained weights: low, so fine-tuning keeps what they know
SHIFT = {"augment": "shift"}  # small objects that fill the frame: a random crop cuts them, a shift keeps them whole
PORTFOLIO = (  # tried first on a fresh study, after the default recipe: strong, different recipes
    SHIFT,
    {"regularizer": "mixup"},
    {"augment": "none"},  # for images any crop or flip changes the meaning of (text, charts)
)


# ---------------------------------------------------------------------------
# The study


def open_study(session: Session) -> list[int]:
    """Check the study is this search's, recover crashed trials, store the plan, and seed a fresh study."""
    study, ctx = session.study, session.ctx
    config = ctx.config
    stored = {"backbone": config.backbone, "weights": ctx.weights, "data": ctx.data_source, "metric": config.metric,
              "num_classes": ctx.data.num_classes, "image_size": ctx.data.image_size, "folds": ctx.plan.folds}  # fmt: skip
    _check_config(study, stored)
    queued_again = recover_trials(study)
    existing = study.get_trials(deepcopy=False)
    fresh = not existing and config.storage is None
    configure_study(session, config.seed if fresh else None)
    study.set_user_attr("plan", ctx.plan.as_dict())  # for the dashboard: the plan as the data left it
    if not existing and trial_cap(session) != 0:
        _enqueue_portfolio(session)
    return queued_again


def configure_study(session: Session, seed: int | None = None) -> None:
    """This process's sampler and the search's pruner on the study. The same seed gives the
    same fresh search; a resumed search or another worker must not replay the first one's
    random draws, so without ``seed`` the sampler's also depends on who and when."""
    ctx = session.ctx
    if seed is None:
        seed = zlib.crc32(f"{ctx.config.seed}/{ctx.worker}/{socket.gethostname()}/{os.getpid()}/{time.time_ns()}".encode())
    session.study.sampler = make_sampler(ctx.config.sampler, seed)
    session.study.pruner = make_pruner(ctx.config.pruner, ctx.plan.evaluations, ctx.cross_validated)


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
    space, strategies = session.ctx.space, session.ctx.strategies
    first = default_strategy(strategies, pretrained=session.ctx.weights is not None)
    default = space.defaults(first, strategies[first], session.ctx.n_groups)
    if first == "lp-ft" and space.contains("lr", PRETRAINED_LR):
        default["lr"] = PRETRAINED_LR
    if not session.ctx.data.hflip and space.contains("augment", SHIFT["augment"]):
        default.update(SHIFT)  # images a mirror changes (digits, text) a zooming crop cuts too: see _portfolio
    if session.ctx.unlabelled is not None:
        helps, why = spread_helps(session)
        wanted = {"pseudo_labels": "propagate", "pseudo_fraction": 0.6} if helps else {"pseudo_labels": "none"}
        default = {**default, **{k: v for k, v in wanted.items() if space.contains(k, v)}}
        if why and space.contains("pseudo_labels", "none"):
            session.state.notes.append(why)
    session.study.enqueue_trial(default, user_attrs=TrialRecord.attrs(recipe="default"), skip_if_exists=True)  # workers started together: once, unless at the same instant
    cap = trial_cap(session)
    changes = _portfolio(default)
    room = len(changes) if cap is None else cap - 1
    for change in changes[: max(0, room)]:
        recipe = {k: v for k, v in {**default, **change}.items() if k != "pseudo_fraction" or change.get("pseudo_labels") != "none"}
        if all(space.contains(k, v) for k, v in change.items()):
            session.study.enqueue_trial(recipe, user_attrs=TrialRecord.attrs(recipe="portfolio"), skip_if_exists=True)


def _portfolio(default: dict[str, Any]) -> list[dict[str, Any]]:
    """The changes tried after the default recipe: first, when it trains on pseudo-labels,
    the same recipe without them, so the search compares the two on the same splits; then
    :data:`PORTFOLIO`, each on the default's pseudo-labels. Where flips are off the default
    recipe shifts instead of cropping, and the portfolio's shift becomes the crop: on the 100
    digits of the suite's tuning half at 1m the default fit that shifted scored 0.921 and 0.921
    on the test images, the one that cropped 0.879 and 0.895 (the other runs of each shipped
    logistic regression)."""
    supervised = [{"pseudo_labels": "none"}] if default.get("pseudo_labels") == "propagate" else []
    swapped = {"augment": "crop-flip"} if default.get("augment") == SHIFT["augment"] else SHIFT
    return [*supervised, *(swapped if change == SHIFT else change for change in PORTFOLIO)]


def spread_helps(session: Session) -> tuple[bool, str | None]:
    """Whether the default recipe trains on pseudo-labels, and why not: only when the best
    simple model that learns from the spread labels (label spreading's k-NN, the linear probe
    on spread labels) scores at least as well as every one that does not, on the same splits.
    A teacher below a simple model would hand the network worse labels than it can learn from
    the labelled images alone, and they outnumber those images (textures, 20 labelled and
    1,660 unlabelled: spreading's student of the time read 0.45, one image above logistic
    regression on pixels but below the linear probe's 0.70; every trial on 60% of its labels
    scored 0.780 on the test images, the fixed recipe without them 0.870). The search may
    still choose them (``pseudo_labels``)."""
    sign = metric_sign(session.ctx)
    best = lambda found: max(found, key=lambda c: sign * c.value)  # noqa: E731
    spread = [c for c in session.ctx.candidates if c.spread]
    rivals = [c for c in session.ctx.candidates if not c.spread]
    if not spread or not rivals:
        return True, None
    student, rival = best(spread), best(rivals)
    if sign * student.value >= sign * rival.value - TIE_TOLERANCE:  # means over folds: equal scores may differ in the last bits
        return True, None
    return False, f"the default recipe trains without pseudo-labels: {student.name} scored {student.value:.4f}, below {rival.name}'s {rival.value:.4f}"


def default_strategy(strategies: dict[str, Any], pretrained: bool) -> str:
    """The default recipe's strategy: from pretrained weights, a linear probe then fine-tuning
    (LP-FT: the head learns on frozen features before they move, so they are not wrecked by a
    random head's gradients); from random weights, every layer trains (``freeze`` at depth 0)."""
    for name in ("lp-ft", "freeze") if pretrained else ("freeze",):
        if name in strategies:
            return name
    return next(iter(strategies))


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
    study = session.study
    total = trial_cap(session)
    done = counted_trials(study.get_trials(deepcopy=False))
    session.emit(SearchStart(study=study.study_name, total=total or session.ctx.plan.expected_trials, done=done, queued_again=queued_again))
    after = _AfterTrial(session, total)
    with stop_on_full_disk(session):
        while True:
            if stop_requested():
                raise KeyboardInterrupt
            if total is None or done < total:
                _optimize(session, n_trials=None if total is None else total - done, callbacks=[after])
            if session.exhausted() or not await_other_workers(session, total):  # exhausted: every choice's plugin failed
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
        session.state.notes.append("a trial was failed by another worker that found its heartbeat late (AUTOFT_GRACE_SECONDS), and ran again")


def await_other_workers(session: Session, total: int | None) -> bool:
    """Wait while other workers (other machines, or --jobs processes) run trials of the study,
    within the trials' budget: a worker whose trial is lost turns stale and is failed and queued
    again here. True when a trial waits to be run (run trials again), False when none runs elsewhere.
    Every worker so ends on the whole study, and builds its model from all of it."""
    heartbeat = has_heartbeat(session.ctx.storage_url)
    poll = min(heartbeat_seconds()[0], 5) if heartbeat else 0.5
    while True:
        if stop_requested():
            raise KeyboardInterrupt
        if session.trials_budget().expired():
            return False
        lost_trials(session.study)  # a stale or dead worker's trial failed and queued again
        trials = session.study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials) and (total is None or counted_trials(trials) < total) and session.time_for_a_trial():
            return True  # not when the trials stopped for want of time: a queued recipe started then fails before its first evaluation
        if not running_elsewhere(session.study, heartbeat):
            return False
        time.sleep(poll)


def trial_cap(session: Session) -> int | None:
    """How many trials the study may hold: ``--trials`` when given; else none when the plan
    bought only the simple models, and otherwise trials while time remains (20 without
    ``--timeout``). A plan that bought no search still runs the portfolio's next recipe when
    the default fit leaves time for it (the plan's estimate is a bound, and fits often end
    sooner): an anytime search spends what it has. But not on one validation split of fewer
    than :data:`~autoft.searching.plan_search.NOISY_VAL` images (unless ``--no-cv`` asked for
    one): choosing among trials there is choosing by noise (digits-shift, 60 images: four
    trials, the one that read 0.98 scored 0.895 on the test images, the fixed recipe 0.935)."""
    config, plan = session.ctx.config, session.ctx.plan
    if config.trials is not None:
        return config.trials
    if not plan.default_fit:
        return 0
    if not plan.search and not plan.folds and not config.no_cv and len(session.ctx.splits[0][1]) < NOISY_VAL:
        return 1
    return None if config.seconds is not None else (20 if plan.search else 1)


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
        session.state.ensemble_seconds = ensemble_reserve(session, best_trial(session.study))  # a resumed search's ensemble so far

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
        with file_lock(session.ctx.out / CLEANUP_LOCK, wait=False) as held:
            if held:  # only one worker deletes trial folders at a time
                prune_trial_folders(session.ctx.out, trials, best, keep_predictions=session.ctx.config.ensemble > 1)
        if trial.state == TrialState.COMPLETE:
            session.state.ensemble_seconds = ensemble_reserve(session, best)
        if session.ctx.worker == 0:  # the command's process writes the report; --jobs workers only train
            self._refresh_report()
        done = counted_trials(trials)
        session.emit(TrialEnd(
            number=trial.number, state=_state_label(trial), value=trial.value, reason=record.reason(trial) or None,
            best_value=best.value if best else None, best_number=best.number if best else None, done=done, total=self.total or done,
        ))  # fmt: skip
        if self.total is not None and done >= self.total:
            study.stop()  # other workers count toward the same total
        if not session.time_for_a_trial():
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


