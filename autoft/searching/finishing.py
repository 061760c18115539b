"""After the trials: choose the model, refit it on every labelled image, export, report.

The model shipped is the one the evidence chose. Trials are compared on their
validation split or folds; an ensemble (greedy selection on the predictions the trials, and
the simple models fitted on the same splits, made for images they did not train on) replaces
the best single model when it beats it there by more than :data:`ENSEMBLE_MARGIN`, on
:data:`ENSEMBLE_CONFIDENCE` of the bootstrap resamples of those images. Then each
chosen recipe is trained once more on every labelled image (train and validation, with its
pseudo-labels) for the number of steps at which its trial peaked, scaled to the larger set,
within what is left of the budget; a simple member is fitted on every labelled image.
``best/`` is built in a staging folder and published by one atomic swap (:mod:`autoft.searching.publishing`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from autoft.core.budget import Budget
from autoft.model.checkpoints import CHECKPOINT_NAME
from autoft.model.ensemble import EnsembleChoice, Member, greedy_selection, win_rate
from autoft.errors import AutoftError
from autoft.core.events import Refit
from autoft.model.metrics import score as metric_score
from autoft.searching.objective import Objective, load_predictions
from autoft.searching.plan_search import NOISY_VAL
from autoft.searching.planning import REFIT_SPARE
from autoft.searching.records import TrialRecord
from autoft.searching.report_data import seed_fits
from autoft.searching.session import Session
from autoft.training.trainer import OutOfTime

ENSEMBLE_MARGIN = 0.005  # an ensemble must beat the best single model by more than this ...
ENSEMBLE_CONFIDENCE = 0.84  # ... on this share of the selection images' bootstrap resamples: one standard error
MIN_REFIT_SECONDS = 3.0
UNDERTRAINED_FACTOR = 4  # the most a refit extends a trial that peaked at its last evaluation
REFIT_SLACK = 0.04  # of the budget: what a refit may run past the deadline when it is all that is left
BUILD_SECONDS = 1.0  # building a backbone and one evaluation, beside the steps
ENSEMBLE_SHARE = 0.25  # of the budget: the most kept back for refitting an ensemble's further members
Evidence = tuple[np.ndarray, np.ndarray]  # (pool indices, probabilities): what a model predicted for the images it was scored on
SEEDS = 3  # the most fits of a single shipped recipe, each from its own seed, that the time left at the end averages (:func:`add_seeds`)
SEED_STRIDE = 1000  # a further fit's seed: --seed plus this, times the fits before it


@dataclass
class FinalModel:
    """What ``best/`` holds: one or more members, each a recipe with its trained weights."""

    checkpoints: list[Path]  # one checkpoint per member
    weights: list[float]
    trials: list[int]
    refit: dict[str, Any] | None  # images and steps of the refit, None when trial weights are kept
    choice: EnsembleChoice | None = None
    notes: list[str] = field(default_factory=list)
    candidate: str | None = None  # the simple model shipped instead of trials (see autoft.searching.selection)
    reason: str | None = None  # why it ships
    simple_members: list[str] = field(default_factory=list)  # simple models among an ensemble's members

    @property
    def members(self) -> list[Member]:
        return [*self.trials, *self.simple_members]

    @property
    def is_ensemble(self) -> bool:
        return len(self.checkpoints) > 1

    @property
    def seeds(self) -> int:
        """How many fits of one trial's recipe, from as many seeds, are averaged (:func:`add_seeds`); 1 for any other model."""
        return seed_fits(self.members)

    @property
    def name(self) -> str:
        """``trial 3``, ``trial 3 from 2 seeds``, ``ensemble of 3``, or the simple model shipped."""
        if self.candidate:
            return self.candidate
        if self.seeds > 1:
            return f"trial {self.trials[0]} from {self.seeds} seeds"
        return f"ensemble of {len(self.checkpoints)}" if self.is_ensemble else f"trial {self.members[0]}"


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best completed trial among those scored on the most folds (all of them, but for a
    search whose every trial was cut short); None before any completed.

    A cross-validated trial the time budget cut short, or the pruner stopped, returns the mean
    of the folds it scored, as Optuna's WilcoxonPruner advises so the sampler learns from it.
    That mean is not the same evidence as the others': one fold of 20 images read 0.95 for a
    trial that shipped 0.82 on the test images, against the full trials' 0.86 and logistic
    regression's 0.92 over every fold (digits, 2m)."""
    scored = [(len(TrialRecord.of(t).fold_scores), t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not scored:
        return None
    most = max(n for n, _ in scored)
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
    return max((t for n, t in scored if n == most), key=lambda t: (sign * float(t.value), -t.number))


def selection_evidence(session: Session, best: optuna.trial.FrozenTrial) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(pool indices, probabilities by trial) on the images the best trial was scored on,
    for every completed trial that predicted all of them."""
    own = trial_predictions(session, best.number)
    if own is None:
        return np.zeros(0, np.int64), {}
    index, _ = own
    found = {}
    for trial in session.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        saved = trial_predictions(session, trial.number)
        if saved is not None and np.array_equal(saved[0], index):
            found[trial.number] = saved[1]
    return index, found


def trial_predictions(session: Session, number: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(pool indices, probabilities) a completed trial saved, read once a search process: the
    ensemble chosen so far is computed again after every trial, from every trial's predictions."""
    kept = session.state.predictions.get(number)
    if kept is None:
        kept = load_predictions(session.ctx.trial_dir(number))
        if kept is not None:  # a trial of another machine has none here, and may never
            session.state.predictions[number] = kept
    return kept


def member_evidence(session: Session, best: optuna.trial.FrozenTrial) -> tuple[np.ndarray, dict[Member, np.ndarray]]:
    """:func:`selection_evidence`, and the simple models' predictions for the same images (they
    were fitted on the trials' splits): every model an ensemble may hold, on one footing. The
    simple models join only on :data:`~autoft.searching.plan_search.NOISY_VAL` images or more:
    on fewer, a mix of a network and a far weaker model is chosen by a few images (textures at
    6m, 20 images: the best trial with logistic regression on pixels read 0.90 against 0.75 for
    the trial alone, and scored 0.730 on the test images; the round before, a trial alone scored 0.855)."""
    index, found = selection_evidence(session, best)
    if len(index) < NOISY_VAL or not session.ctx.config.simple_models:
        return index, found
    for candidate in session.ctx.candidates:
        if (held_out := candidate.predicted(index)) is not None:  # it held out every image the best trial was scored on
            found[candidate.name] = held_out
    return index, found


def mixed_evidence(session: Session, best: optuna.trial.FrozenTrial, weights: dict[Member, float]) -> Evidence | None:
    """(pool indices, probabilities) of the model mixing ``weights``' members, on the images the
    best trial was scored on (:func:`member_evidence`); None when a member's are not at hand."""
    index, predictions = member_evidence(session, best)
    if not len(index) or any(member not in predictions for member in weights):
        return None
    total = sum(weights.values())
    return index, sum(weight / total * np.asarray(predictions[member], np.float64) for member, weight in weights.items())


def predicted_elsewhere(trials: list[optuna.trial.FrozenTrial], here: set[int], host: str) -> list[int]:
    """Completed trials run on a host other than ``host`` whose predictions are not ``here``."""
    return [t.number for t in trials if t.state == TrialState.COMPLETE and t.number not in here and TrialRecord.of(t).host not in (None, host)]


def choose_members(session: Session, best: optuna.trial.FrozenTrial) -> tuple[dict[Member, float], EnsembleChoice | None]:
    """{member: weight}: the best trial alone, or an ensemble of trials and simple models that
    beats the best single model of either kind on the same evidence."""
    index, predictions = member_evidence(session, best)
    if session.ctx.config.ensemble < 2 or len(predictions) < 2:
        return {best.number: 1.0}, None
    from autoft.searching.storage import process_identity

    elsewhere = predicted_elsewhere(session.study.get_trials(deepcopy=False), {m for m in predictions if isinstance(m, int)}, process_identity()["host"])
    if elsewhere:  # each machine would ensemble its own trials: every one ships the study's best trial instead
        session.state.notes.append(f"no ensemble: trials {', '.join(map(str, elsewhere[:5]))} ran on other machines, whose predictions are not in {session.ctx.out}")
        return {best.number: 1.0}, None
    return _chosen(session, best, index, predictions)


def _chosen(session: Session, best: optuna.trial.FrozenTrial, index: np.ndarray, predictions: dict[Member, np.ndarray]) -> tuple[dict[Member, float], EnsembleChoice]:
    labels = session.ctx.pool.labels.numpy()[index]
    choice = _select(session, predictions, labels)
    if not _wins(session, choice, predictions, labels):
        return {best.number: 1.0}, choice
    first = lambda kv: (kv[0] != best.number, isinstance(kv[0], str), -kv[1])  # the best trial first: built first when time is short; simple models last, in seconds
    return dict(sorted(choice.weights.items(), key=first)), choice


def ensemble_reserve(session: Session, best: optuna.trial.FrozenTrial | None) -> float:
    """Seconds to keep back for refitting the further trials of the ensemble the evidence so
    far chooses, beside the best trial's refit (which :meth:`Session.refit_reserve` keeps):
    each one's whole refit, a fifth to spare, and its part of the export, at most
    :data:`ENSEMBLE_SHARE` of the budget.
    Simple members take seconds and are not counted. Without it the trials ran until the
    time kept for one refit, and a chosen ensemble was cut to its first member (digits, 10 a
    class at 6m: in two draws of three, 1 and 2 members built of 3 chosen)."""
    config, budget = session.ctx.config, session.ctx.budget
    if best is None or config.ensemble < 2 or not (config.refit and session.ctx.plan.refit) or not budget.bounded:
        return 0.0
    index, predictions = member_evidence(session, best)
    if len(predictions) < 2:
        return 0.0
    members, _ = _chosen(session, best, index, predictions)
    trials = {t.number: t for t in session.study.get_trials(deepcopy=False)}
    further = [trials[n] for n in members if isinstance(n, int) and n != best.number]
    seconds = sum(REFIT_SPARE * (BUILD_SECONDS + _refit_peak(session, t) * session.seconds_per_step()) + session.ctx.plan.export_seconds for t in further)
    return min(seconds, ENSEMBLE_SHARE * budget.seconds)


def _select(session: Session, predictions: dict[Member, np.ndarray], labels: np.ndarray) -> EnsembleChoice:
    """Greedy selection on the search's metric, its values in the metric's own sign."""
    sign, metric = session.ctx.sign, evidence_score(session)  # selection maximises; log loss is minimised
    choice = greedy_selection(predictions, labels, lambda y, p: sign * metric(y, p), max_members=session.ctx.config.ensemble)
    return dataclasses.replace(choice, value=sign * choice.value, single_value=sign * choice.single_value)


def _wins(session: Session, choice: EnsembleChoice, predictions: dict[Member, np.ndarray], labels: np.ndarray) -> bool:
    """An ensemble of several members that beats its best single model by more than
    :data:`ENSEMBLE_MARGIN`, and on :data:`ENSEMBLE_CONFIDENCE` of the bootstrap resamples of the
    images (the one-standard-error rule: the simpler model, unless the evidence is sure). On
    80 photos from ImageNet weights, an ensemble right on one image more than the linear probe
    (0.9625 against 0.95) shipped, and scored 0.941 on the test images against the probe's 0.955."""
    if not (len(choice.weights) > 1 and session.ctx.sign * choice.gain > ENSEMBLE_MARGIN):
        return False
    sign, metric = session.ctx.sign, evidence_score(session)
    return win_rate(predictions, labels, choice, lambda y, p: sign * metric(y, p)) >= ENSEMBLE_CONFIDENCE


def build_final(session: Session, best: optuna.trial.FrozenTrial, members: dict[Member, float] | None = None, choice: EnsembleChoice | None = None) -> FinalModel:
    """The chosen members (by default :func:`choose_members`'), each refit on every labelled image."""
    if members is None:
        members, choice = choose_members(session, best)
    members = dict(sorted(members.items(), key=lambda kv: isinstance(kv[0], str)))  # trials first, as FinalModel.members lists them
    trials = {t.number: t for t in session.study.get_trials(deepcopy=False)}
    work = session.ctx.out / "refit"
    work.mkdir(parents=True, exist_ok=True)
    built: list[tuple[Member, Path, float]] = []
    refit: dict[str, Any] | None = None
    notes: list[str] = []
    for number, weight in members.items():
        if isinstance(number, str):
            path, note = _simple_member(session, number, work)
            notes += [note] if note else []
            built += [(number, path, weight)] if path else []
            continue
        trial = trials[number]
        path, info = _member(session, trial, work / f"{number}.pt", first=not built)
        if "note" in info:
            notes.append(info["note"])
        if path is None:
            continue
        built.append((number, path, weight))
        refit = refit or info.get("refit")
    if not built:
        raise AutoftError("the best trial left no weights and there was no time to train it again; give the search more time")
    if choice is not None and len(built) < len(members):
        built, choice = _reselect(session, best, built)
        notes.append(f"ensemble reduced to {len(built)} of {len(members)} members by the time left")
        refit = refit if any(isinstance(n, int) for n, _, _ in built) else None
    total = sum(w for _, _, w in built)  # the members kept, their weights summing to 1
    trial_members, simple = [n for n, _, _ in built if isinstance(n, int)], [n for n, _, _ in built if isinstance(n, str)]
    return FinalModel([p for _, p, _ in built], [w / total for _, _, w in built], trial_members, refit, choice if len(built) > 1 else None, notes, simple_members=simple)


def _reselect(session: Session, best: optuna.trial.FrozenTrial, built: list[tuple[Member, Path, float]]) -> tuple[list[tuple[Member, Path, float]], EnsembleChoice]:
    """Selection again among the members the time left built: the best single of them, or an
    ensemble of them that beats it. What remains of an ensemble can be worse than one of its
    members alone (textures at 6m: the best trial with logistic regression on pixels read 0.45
    in 5-fold CV, the trial alone 0.75, and the linear probe's 0.70 shipped)."""
    index, predictions = member_evidence(session, best)
    labels, predictions = session.ctx.pool.labels.numpy()[index], {n: predictions[n] for n, _, _ in built}
    choice = _select(session, predictions, labels)
    weights = choice.weights if _wins(session, choice, predictions, labels) else {choice.single: 1.0}
    return [(n, path, weights[n]) for n, path, _ in built if n in weights], dataclasses.replace(choice, weights=weights)


def _simple_member(session: Session, name: str, work: Path) -> tuple[Path | None, str | None]:
    """A simple model of an ensemble, fitted on every labelled image (seconds); a fit scikit-learn refuses leaves it out."""
    candidate = next(c for c in session.ctx.candidates if c.name == name)
    try:
        return candidate.refit(work / candidate.file_name, data=session.ctx.data_source, seed=session.ctx.config.seed), None
    except (ValueError, RuntimeError) as exc:
        return None, f"{name} left out of the ensemble: could not fit it on every labelled image ({exc})"


def evidence_score(session: Session):
    """(labels, probabilities) -> the search's metric, in its own sign."""
    spec = session.ctx.registry.metric(session.ctx.config.metric)
    return lambda y, p: metric_score(spec, y, p, session.ctx.registry)


def _member(session: Session, trial: optuna.trial.FrozenTrial, path: Path, first: bool) -> tuple[Path | None, dict[str, Any]]:
    """Train ``trial``'s recipe on every labelled image, or keep its own weights (``--no-refit``).

    The first member (the best trial) gets what time is left, cut short if need be; a
    further ensemble member is trained only when its whole refit still fits.
    """
    own = session.ctx.trial_dir(trial.number) / CHECKPOINT_NAME
    if not session.ctx.config.refit and own.is_file():
        return own, {}
    steps = _refit_steps(session, trial, whole=not first)
    if steps is None and not first:
        return None, {}
    if steps is None:
        return (own, {"note": "no time left to refit on every image: the best trial's own weights are kept"}) if own.is_file() else (None, {})
    session.emit(Refit(number=trial.number, steps=steps, images=len(session.ctx.pool)))
    split = None if session.ctx.config.refit else 0
    try:
        fitted = Objective(session).fit(dict(trial.params), split, number=trial.number, steps=steps, eval_every=steps, budget=refit_budget(session))
    except OutOfTime:
        return (own, {"note": "the refit ran out of time: the best trial's own weights are kept"}) if own.is_file() else (None, {})
    images = session.fit_size(split, dict(trial.params))
    fitted.save(path, dict(trial.params))
    labelled = len(session.ctx.pool) if split is None else len(session.ctx.splits[0][0])
    return path, {"refit": {"images": images, "labelled": labelled, "steps": fitted.steps, "seconds": round(fitted.seconds, 2)}}


def add_seeds(session: Session, final: FinalModel) -> FinalModel:
    """``final``, a single refit trial, with its recipe trained again on every labelled image
    from other seeds while the time left holds a whole fit (at the first's measured length, a
    fifth to spare, and its part of the export), up to :data:`SEEDS` fits, averaged.

    A search ends with time it cannot spend on a trial: a fold of the next one no longer fits
    beside the refit (6m, 2 CPU cores: 43 to 86 s of 360 left on three of eight sets). Averaging
    fits that differ only in their seed removes variance no split can measure, and the refit is
    already trusted without a split of its own. An ensemble chosen on evidence, a simple model,
    and a trial's own weights (no time for even one refit) ship as they were chosen."""
    config = session.ctx.config
    if final.candidate or final.is_ensemble or not final.refit or not config.refit or min(SEEDS, config.ensemble) < 2 or not session.ctx.budget.bounded:
        return final
    trial = next(t for t in session.study.get_trials(deepcopy=False) if t.number == final.trials[0])
    cost = REFIT_SPARE * (BUILD_SECONDS + final.refit["seconds"]) + session.ctx.plan.export_seconds
    checkpoints, steps = list(final.checkpoints), final.refit["steps"]
    while len(checkpoints) < min(SEEDS, config.ensemble) and session.work_budget().left() >= cost:
        seed = config.seed + SEED_STRIDE * len(checkpoints)
        session.emit(Refit(number=trial.number, steps=steps, images=len(session.ctx.pool), seed=seed))
        try:
            fitted = Objective(session).fit(dict(trial.params), None, number=trial.number, steps=steps, eval_every=steps, budget=session.work_budget(), seed=seed)
        except OutOfTime:
            break
        path = session.ctx.out / "refit" / f"{trial.number}-seed{seed}.pt"
        fitted.save(path, dict(trial.params))
        checkpoints.append(path)
    fits = len(checkpoints)
    if fits == 1:
        return final
    note = f"trial {trial.number}'s recipe was trained {fits} times on every labelled image, from {fits} seeds, and the fits averaged: the time left held {fits - 1} more"
    return dataclasses.replace(final, checkpoints=checkpoints, weights=[1 / fits] * fits, trials=[trial.number] * fits, notes=[*final.notes, note])


def refit_budget(session: Session) -> Budget:
    """What is left of the search's budget, and :data:`REFIT_SLACK` of it past its end: a short
    refit that overruns a little beats shipping nothing."""
    budget = session.work_budget()
    return budget.extended(REFIT_SLACK * budget.seconds) if budget.bounded else budget


def _refit_steps(session: Session, trial: optuna.trial.FrozenTrial, whole: bool) -> int | None:
    """The steps at which the trial peaked, scaled from its training set to the refit's, cut
    to what the time left can train; None when too little is left (``whole``: for all of them)."""
    plan, record = session.ctx.plan, TrialRecord.of(trial)
    peak = _refit_peak(session, trial)
    left = session.work_budget().left()
    if left is None:
        return peak
    if whole:
        return peak if left - BUILD_SECONDS >= peak * session.seconds_per_step() else None
    if left < MIN_REFIT_SECONDS and session.ctx.config.seconds:
        left += REFIT_SLACK * session.ctx.config.seconds  # the bound's 5%: a short refit beats shipping nothing
    share = left - BUILD_SECONDS
    steps = min(peak, int(share / session.seconds_per_step()))
    if share < MIN_REFIT_SECONDS or steps < (record.best_step or plan.steps):
        return None  # a refit shorter than its trial's own fit is a worse model no split has checked: the trial's weights ship
    return steps


def _refit_peak(session: Session, trial: optuna.trial.FrozenTrial) -> int:
    """The steps at which the trial peaked, scaled from its training set to the refit's."""
    plan, params = session.ctx.plan, dict(trial.params)
    record = TrialRecord.of(trial)
    peak = int(record.best_step or plan.steps)
    if session.ctx.config.refit:  # as many passes over the larger set as the trial peaked at
        ratio = session.fit_size(None, params) / max(session.fit_size(0, params), 1)
        peak = max(plan.eval_every, round(peak * ratio))
        if record.peaked_at_end and not session.ctx.config.epochs:
            peak *= UNDERTRAINED_FACTOR  # still improving when its trial ended: the time kept for the refit lets it go on
    return peak


def chance_level(labels: np.ndarray) -> float:
    """The accuracy of always answering the most common class."""
    counts = np.bincount(labels)
    return float(counts.max() / counts.sum()) if counts.sum() else 0.0


def wall_time(session: Session) -> float:
    return session.ctx.budget.spent()
