"""The search's stages, bought from what the default fit and the refit leave: pretraining on
unlabelled images, pseudo-labels, then the trials' scoring (k folds, fewer, or one split) and
how many trials the rest holds. Part of :mod:`autoft.searching.planning`, which re-exports these."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from autoft.core.text import duration
from autoft.searching.calibration import Throughput
from autoft.searching.plan import Plan

if TYPE_CHECKING:
    from autoft.searching.planning import DataShape, Overrides

SEARCH_MIN = 2  # trials at the default's length a search must hold to be bought
CV_EQUIVALENTS = 6  # ... and that many k-fold trials for cross-validation to be bought ...
NOISY_VAL = 100  # ... or, when one split would validate on fewer images than this (it chooses by noise), ...
CV_FEW = 2  # ... this many (the default and one more), or the default alone on k folds before more trials on fewer;
# when not even the default fits on 2 folds, no search: one split that small would choose by noise
PRETRAIN_SHARE = 0.2  # of what the default fit and the refit leave, for pretraining
PRETRAIN_MIN_EPOCHS = 1  # an epoch on a few hundred unlabelled images already helps a from-scratch start
PRETRAIN_MAX_EPOCHS = 50
PSEUDO_SHARE = 0.1  # embedding every image for pseudo-labels may take this share of the search's time
SPREAD_SECONDS = 2.0  # ... and spreading the labels over them, once per split (scikit-learn, 2 busy cores)
BUILD_SECONDS = 0.5  # building a backbone and its optimizer, per fit


def buy_pretraining(plan: Plan, data: DataShape, rate: Throughput, left: float | None, overrides: Overrides, pretrained: bool, keep: float) -> float | None:
    """Epochs of self-supervised pretraining within :data:`PRETRAIN_SHARE` of ``left``, leaving the trials at least ``keep`` seconds."""
    if not data.unlabelled or overrides.pretrain_epochs == 0:
        return left
    if pretrained and overrides.pretrain_epochs is None:
        # Self-supervised training from ImageNet features on a few hundred images mostly unlearns them:
        # on top of pretrained weights it runs only when asked for.
        plan.skipped.append("pretraining (the weights are pretrained already; --pretrain-epochs N asks for it)")
        return left
    epoch = 2.2 * (data.unlabelled + data.labelled) / rate.train  # two augmented views an image
    if overrides.pretrain_epochs is not None:
        epochs = overrides.pretrain_epochs
    elif left is None:
        epochs = PRETRAIN_MAX_EPOCHS
    else:
        epochs = min(PRETRAIN_MAX_EPOCHS, int(PRETRAIN_SHARE * left / epoch), int((left - keep / plan.jobs) / epoch))
        if epochs < PRETRAIN_MIN_EPOCHS:
            plan.skipped.append(f"pretraining ({PRETRAIN_MIN_EPOCHS} epoch on {data.unlabelled + data.labelled} images needs {duration(PRETRAIN_MIN_EPOCHS * epoch)}: "
                                f"over a fifth of the search's {duration(left)}, or more than its trials leave)")  # fmt: skip
            return left
    plan.pretrain_epochs, plan.pretrain_seconds = epochs, epochs * epoch
    return None if left is None else left - plan.pretrain_seconds


def buy_pseudo_labels(plan: Plan, data: DataShape, rate: Throughput, left: float | None) -> float | None:
    """Pseudo-labels, when labelling the unlabelled images once per split is cheap; the splits'
    cost is charged with the folds (:func:`choose_scoring`)."""
    if not data.unlabelled:
        return left
    embed = (data.unlabelled + data.labelled) / rate.evaluate
    plan.pseudo_labels = left is None or embed <= PSEUDO_SHARE * left
    if not plan.pseudo_labels:
        plan.skipped.append(f"pseudo-labels (embedding {data.unlabelled + data.labelled} images takes {duration(embed)}, over a tenth of the search's {duration(left)})")
        return left
    plan.pseudo_seconds = embed + SPREAD_SECONDS
    return left


class Scoring(NamedTuple):
    """How trials are scored: k folds (None: one split) and repeats, what one fit and one trial
    cost, what the splits cost once (their pseudo-labels), and the trials they had to hold."""

    folds: int | None
    repeats: int
    fit_seconds: float
    trial_seconds: float
    once_seconds: float
    need: int


def choose_scoring(plan: Plan, data: DataShape, rate: Throughput, left: float | None, overrides: Overrides, wanted: tuple[int | None, int, str | None], noisy: bool) -> Scoring:
    """The most folds (and repeats) the data want whose trials the search holds enough of
    (:data:`CV_EQUIVALENTS`); else fewer folds; else one split. When one split would be
    ``noisy``, :data:`CV_FEW` trials are enough, and the default recipe alone on k folds comes
    before more trials on fewer: on 20 images, 2 folds train each fit on 10 (textures: every
    trial read 0.35 there, a probe on random features 0.55; the default recipe fitted on all 20
    scored 0.87 on the test images)."""
    k, repeats, _ = wanted
    need = CV_FEW if noisy else CV_EQUIVALENTS
    if k is None or overrides.cv:
        options = [(k, repeats, need)]
    elif noisy:
        options = [(k, repeats, need), (k, 1, need), *((f, 1, 1) for f in dict.fromkeys((k, 3, 2)) if f <= k), (None, 1, need)]
    else:
        options = [(k, repeats, need), (k, 1, need), *((f, 1, need) for f in (3, 2) if f < k), (None, 1, need)]
    for folds, times, trials in dict.fromkeys(options):
        val = data.labelled // folds if folds else data.val
        fit_seconds = BUILD_SECONDS + plan.evaluations * val / rate.evaluate + plan.steps * plan.step_seconds
        scoring = Scoring(folds, times, fit_seconds, fit_seconds * (folds or 1) * times, (folds or 1) * times * plan.pseudo_seconds, need)
        if left is None or folds is None or overrides.cv or (left - scoring.once_seconds) * plan.jobs >= trials * scoring.trial_seconds:
            return scoring
    raise AssertionError("one split is always an option")


def buy_scoring(plan: Plan, data: DataShape, rate: Throughput, left: float | None, overrides: Overrides, wanted: tuple[int | None, int, str | None], chosen: Scoring) -> None:
    """The trials' scoring ``chosen`` by :func:`choose_scoring`, and how many trials ``left`` holds."""
    k, repeats, why = wanted
    plan.folds, plan.repeats, plan.fit_seconds = chosen.folds, chosen.repeats, chosen.fit_seconds
    if chosen.folds and why:
        plan.reasons.append(why)
    if (chosen.folds, chosen.repeats) != (k, repeats):
        wanted_trial = (BUILD_SECONDS + plan.evaluations * data.labelled // k / rate.evaluate + plan.steps * plan.step_seconds) * k * repeats
        plan.skipped.append(f"{k}-fold CV" + (f" x{repeats}" if repeats > 1 else "") + f" ({chosen.need} trials need {duration(chosen.need * wanted_trial / plan.jobs)}, {duration(left)} left)")
    if left is None:
        plan.expected_trials = overrides.trials or 20
    else:
        plan.expected_trials = max(0, int((left - chosen.once_seconds) * plan.jobs / chosen.trial_seconds))
        plan.expected_trials = min(plan.expected_trials, overrides.trials) if overrides.trials else plan.expected_trials
