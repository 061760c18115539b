"""Everything a search prepares before its first trial, and shares with every trial.

:func:`prepare` runs the stages in the order the budget needs them: check the options,
choose the starting weights, measure the device, plan, decode the images at the planned
size, open the study, pretrain, fit the reference baselines. Each stage's wall time is
kept for the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import optuna
import torch

from autoft import plugins
from autoft.training.baselines import BaselineResult
from autoft.core.budget import Budget
from autoft.data import DataSplits, Images, ImageTensors
from autoft.errors import AutoftError
from autoft.searching.planning import BUILD_SECONDS, REFIT_SPARE, Plan
from autoft.searching.left_out import LeftOut
from autoft.searching.config import SearchConfig
from autoft.searching.space import SearchSpace

if TYPE_CHECKING:
    from autoft.training.candidates import Candidate
from autoft.training.semisupervised import PseudoLabels, pseudo_labels

Split = tuple[np.ndarray, np.ndarray]  # (train, validation) indices into the labelled pool
PSEUDO_DEFAULT = 0.6  # share of pseudo-labels the default recipe keeps
PSEUDO_RANGE = (0.2, 1.0)


@dataclass(frozen=True)
class SearchContext:
    """What every trial reads, complete before the first trial and never changed after:
    the data, the plan (flips decided), the space (pretraining's ``init`` choices and
    FixMatch included), the reference models and the plugins. ``pool`` is every labelled
    image the trials may use (train and validation splits together); ``splits`` index into
    it: one train/validation pair, or k folds (repeated). A ``--jobs`` worker gets it as it
    is, less the images, which it reads again from the decode cache."""

    config: SearchConfig
    registry: plugins.Registry
    device: torch.device
    data: DataSplits
    pool: ImageTensors
    splits: tuple[Split, ...]
    plan: Plan
    space: SearchSpace
    strategies: Mapping[str, Any]
    n_groups: int
    weights: str | None
    out: Path
    study_name: str
    storage_url: str
    budget: Budget
    data_source: str | None = None
    unlabelled: torch.Tensor | None = None
    unlabelled_skipped: tuple[tuple[str, str], ...] = ()  # (source, reason) of unreadable ones
    candidates: tuple[Candidate, ...] = ()  # the simple models, scored on ``splits``; shipped when they win
    embedder_weights: Mapping[str, str | None] = field(default_factory=dict)  # name -> the weights whose features label the unlabelled images
    jobs: int = 1  # trials at once (--jobs); this process runs trials as worker ``worker``
    worker: int = 0

    @property
    def cross_validated(self) -> bool:
        return self.plan.folds is not None

    @property
    def sign(self) -> float:
        return metric_sign(self)

    @property
    def baselines(self) -> tuple[BaselineResult, ...]:
        """The simple models as the summary and the leaderboard quote them."""
        return tuple(c.reference for c in self.candidates)

    def trial_dir(self, number: int) -> Path:
        return self.out / "trials" / str(number)


def metric_sign(ctx: SearchContext) -> float:
    """1 when the search's metric is better higher, -1 when lower (a loss): scores times it are maximised."""
    return 1.0 if ctx.registry.metric(ctx.config.metric).greater_is_better else -1.0


@dataclass
class SearchState:
    """What changes while a search runs: the study, the stages' wall times, the fits'
    measured speed, notes for the summary, and results computed once and kept."""

    study: optuna.Study
    timings: dict[str, float] = field(default_factory=dict)
    fits: list[tuple[float, int]] = field(default_factory=list)  # (seconds, steps) of every fit so far
    notes: list[str] = field(default_factory=list)  # said in the summary: a worker that stopped early
    on_event: Callable[[Any], None] | None = None
    embedders: dict[str, Callable[[Images], np.ndarray]] = field(default_factory=dict)
    pseudo: dict[int, PseudoLabels] = field(default_factory=dict)
    predictions: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # completed trials' (pool indices, probabilities), read once
    left_out: LeftOut = field(default_factory=LeftOut)  # choices whose plugin failed
    ensemble_seconds: float = 0.0  # kept back for the further members of the ensemble chosen so far (finishing.ensemble_reserve)


@dataclass
class Session:
    """One search: its frozen :class:`SearchContext` and its :class:`SearchState`, with the
    questions both answer together (how long a fit takes, what a trial may still spend)."""

    ctx: SearchContext
    state: SearchState

    def fit_seconds(self) -> float:
        """A full fit's wall time: the plan's estimate until fits have run, then the median
        fit's pace, slower or faster. Calibration misses per-step overheads (augmentation,
        evaluation), and it prices steps it cannot see: LP-FT's probe steps, a frozen depth.
        Holding to the plan when fits ran faster kept back time the search then left unspent
        (photos-8 from ImageNet: a second ensemble member was not refit at the plan's 0.31 s a
        step, while the first member's refit had run its 212 steps in 17 s)."""
        plan, fits = self.ctx.plan, self.state.fits
        if not fits:
            return plan.fit_seconds
        per_step = sorted(seconds / max(steps, 1) for seconds, steps in fits)[len(fits) // 2]
        return BUILD_SECONDS + per_step * plan.steps

    def seconds_per_step(self) -> float:
        return self.fit_seconds() / max(self.ctx.plan.steps, 1)

    def refit_reserve(self) -> float:
        """Time kept back for the refit on every labelled image, with a fifth to spare; none
        when the plan bought no refit (it still runs if the trials leave it the time)."""
        plan = self.ctx.plan
        if not (self.ctx.config.refit and plan.refit):
            return 0.0
        return REFIT_SPARE * self.fit_seconds() * plan.refit_seconds / max(plan.fit_seconds, 1e-9)

    def work_budget(self) -> Budget:
        """What training may spend: the search's budget less the end's reserve (export, its verification, the report)."""
        return self.ctx.budget.reserve("finish", self.ctx.plan.finish_seconds)

    def trials_budget(self) -> Budget:
        """What trials may spend: :meth:`work_budget` less the refits' reserves, as measured
        now: the best trial's, and the further members' of the ensemble chosen so far."""
        return self.work_budget().reserve("refit", self.refit_reserve()).reserve("ensemble", self.state.ensemble_seconds)

    def time_for_a_trial(self) -> bool:
        """Whether the trials' budget leaves another trial time to say something: half a fit on
        each of its folds. The trials stop when it does not, and do not start again."""
        plan, left = self.ctx.plan, self.trials_budget().left()
        return left is None or left >= 0.5 * self.fit_seconds() * (plan.folds or 1) * plan.repeats

    def exhausted(self) -> bool:
        """Whether every strategy, or every regulariser, was left out: no trial is left to run."""
        return self.state.left_out.exhausted(self.ctx.space.strategies, self.ctx.space.regularizers)

    def emit(self, event: Any) -> None:
        if self.state.on_event is not None:
            self.state.on_event(event)

    def timed(self, stage: str):
        return _Timer(self.state.timings, stage)

    @property
    def study(self) -> optuna.Study:
        return self.state.study

    # -- the data of one fit -------------------------------------------------

    def suggest_pseudo_labels(self, trial, params: dict[str, Any]) -> dict[str, Any]:
        """``pseudo_fraction``, the share of the surest pseudo-labels a trial trains on,
        declared only by trials that chose ``pseudo_labels=propagate``."""
        if params.get("pseudo_labels") == "propagate":
            from autoft.searching.space import RangedTrial

            low, high = PSEUDO_RANGE
            params["pseudo_fraction"] = RangedTrial(trial, self.ctx.space.overrides).suggest_float("pseudo_fraction", low, high)
        return params

    def fit_data(self, split: int | None, params: dict[str, Any]) -> DataSplits:
        """Train and validation images of split ``split`` (``None``: every labelled image,
        validated on the validation split, for the refit), with the recipe's pseudo-labels."""
        train_index, val_index = self._split(split)
        train = self.ctx.pool.subset(train_index)
        index, labels = self._pseudo_for(split, train_index, params)
        if len(index):
            train = ImageTensors.concat([train, ImageTensors(self.ctx.unlabelled[torch.as_tensor(index)], torch.as_tensor(labels))])
        return DataSplits(train=train, val=self.ctx.pool.subset(val_index), test=None, classes=self.ctx.data.classes, image_size=self.ctx.data.image_size, hflip=self.ctx.data.hflip)

    def fit_size(self, split: int | None, params: dict[str, Any]) -> int:
        """How many images :meth:`fit_data` would train on, without gathering them."""
        train_index, _ = self._split(split)
        return len(train_index) + len(self._pseudo_for(split, train_index, params)[0])

    def _split(self, split: int | None) -> tuple[np.ndarray, np.ndarray]:
        return (np.arange(len(self.ctx.pool)), self.ctx.splits[0][1]) if split is None else self.ctx.splits[split]

    def _pseudo_for(self, split: int | None, train_index: np.ndarray, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(unlabelled indices, labels) of the pseudo-labels the recipe trains on; none unless it chose them."""
        fraction = float(params.get("pseudo_fraction", 0.0)) if params.get("pseudo_labels", "none") == "propagate" else 0.0
        if fraction <= 0 or self.ctx.unlabelled is None:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return self.pseudo(split, train_index).most_confident(fraction)

    def pseudo(self, split: int | None, train_index: np.ndarray) -> PseudoLabels:
        """Pseudo-labels propagated from this split's training labels only; computed once per split."""
        ctx = self.ctx
        return pseudo_labels(self.state.pseudo, ctx.pool, ctx.unlabelled, ctx.data.num_classes, self.state.embedders, ctx.config.seed, split, train_index)


class _Timer:
    def __init__(self, timings: dict[str, float], stage: str):
        self.timings, self.stage = timings, stage

    def __enter__(self) -> None:
        self.started = time.monotonic()

    def __exit__(self, *exc) -> None:
        self.timings[self.stage] = self.timings.get(self.stage, 0.0) + time.monotonic() - self.started


def make_splits(labels: np.ndarray, n_train: int, folds: int | None, repeats: int, seed: int) -> list[Split]:
    """k stratified folds (``repeats`` times, reshuffled) of the pool, or its train/validation split.

    The pool holds the train split's ``n_train`` images first, then the validation split's.
    """
    if folds is None:
        return [(np.arange(n_train), np.arange(n_train, len(labels)))]
    from sklearn.model_selection import RepeatedStratifiedKFold

    smallest = int(np.bincount(labels)[np.bincount(labels) > 0].min())
    if smallest < folds:
        raise AutoftError(f"--cv {folds}: the smallest class has only {smallest} images; use --cv {max(2, smallest)} or fewer folds")
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    return [(np.asarray(a), np.asarray(b)) for a, b in splitter.split(np.zeros(len(labels)), labels)]
