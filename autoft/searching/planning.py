"""The budget planner: turn ``--timeout`` into stages bought in order, and their shapes.

A search that loses to logistic regression on pixels, or refuses a budget logistic
regression fits in, is worse than no search. So the time is spent in this order, and each
stage is bought only from what the ones before it leave:

1. the simple models (seconds: logistic regression on pixels, a linear probe): always,
   unless the budget cannot even decode the images and fit logistic regression
   (:class:`BudgetTooSmall`);
2. the known-good default recipe, trained once at full strength (:data:`GOOD_STEPS`, or
   :data:`FIXED_EPOCHS` passes when they are fewer steps, or :data:`TARGET_EPOCHS` passes over large data) at the images' own size on one split;
   squeezed to fewer steps, no fewer than :data:`MIN_STEPS`, when the budget is short (it
   ships only if it beats the simple models on the same splits);
3. the final refit on every labelled image;
4. the search, when at least :data:`SEARCH_MIN` trials at the default's length fit; and
   within it, in this order, pretraining on unlabelled images, pseudo-labels, then
   cross-validation (:data:`CV_EQUIVALENTS` trials of k fits, :data:`CV_FEW` when one split
   would validate on fewer than :data:`NOISY_VAL` images) and its repeats. A search on one
   split that small is not bought: it would choose among its trials by noise.

:meth:`Plan.line` says what was bought and what was skipped. Throughput comes from
:mod:`autoft.searching.calibration`. Every choice can be forced by the flag that names it; a forced
choice is taken as given and the rest is planned around it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from autoft.searching.calibration import MIN_SIZE, SizeProbe, Throughput, calibrate, candidate_sizes, median_rate, median_short_side, own_size, short_side  # noqa: F401  (re-exported)
from autoft.errors import AutoftError
from autoft.searching.plan import SIMPLE_MODELS, Plan, bucket  # noqa: F401  (re-exported)
from autoft.searching.plan_search import (  # noqa: F401  (re-exported)
    BUILD_SECONDS, CV_EQUIVALENTS, CV_FEW, NOISY_VAL, PRETRAIN_MAX_EPOCHS, PRETRAIN_MIN_EPOCHS, PRETRAIN_SHARE, PSEUDO_SHARE, SEARCH_MIN, SPREAD_SECONDS,
    buy_scoring, buy_pretraining, buy_pseudo_labels, choose_scoring,
)  # fmt: skip
from autoft.core.text import duration

GOOD_STEPS = 400  # what a fixed recipe needs on a small dataset: the default fit's length ...
FIXED_EPOCHS = 30  # ... or fewer: the fixed recipe's 30 epochs, when they are fewer steps (a hundred images)
ENOUGH_STEPS = 150  # the default fit's least length at full strength (from scratch, fewer mostly lose to logistic regression) ...
MIN_STEPS = 40  # ... and the least it is cut to when time is short: a candidate like the others, it ships only if it wins
TARGET_EPOCHS = 15  # on large data, about this many passes over it ...
DEFAULT_SHARE = 0.5  # ... within at most this share of the budget (never below GOOD_STEPS)
EVALUATIONS = 8  # evaluation points of a fit: the pruner's rungs
CV_MIN_VAL = 300  # a validation split smaller than this is noise to choose on
CV_MIN_PER_CLASS = 30
MARGIN = 0.03  # of the budget, kept for the last trial's bookkeeping
MARGIN_FREE = 1 - MARGIN
# The end, kept back from every stage (:func:`finish_seconds`): the export, its verification, the report.
FINISH_SECONDS = 5.0  # its fixed part on a 2-core machine at a full core: the exporter's start, the report (2 s), the files, the exit
EXPORT_MODULE_SECONDS = 0.025  # torch.onnx tracing one module of the model (one thread, alone: resnet18's 94 in 3.0 s, lite0's 273 in 7.4 s)
VERIFY_IMAGES = 256  # validation images the ONNX export is checked on, by PyTorch and onnxruntime
TYPICAL_MODULES = 100  # a model's modules, when the caller did not count them
MIN_SHARE = 0.25  # the least share of its cores the end is priced at
REFIT_SPARE = 1.2  # a refit is bought, and its time kept back, with a fifth to spare
# The simple models' cost, measured with scikit-learn on a 2-core CPU shared with other work:
DECODE_SECONDS = 2e-3  # an image file opened, decoded and resized ...
DECODE_PIXEL_SECONDS = 2e-8  # ... and per pixel of the file
LOGISTIC_SECONDS = 2e-7  # lbfgs logistic regression, per training image x feature x class
LOGISTIC_FIXED = 0.3
# From pretrained weights the default recipe is LP-FT, whose head trains alone for its first
# lpft_probe_share (0.3) of the steps: such a step costs about a forward pass (lite0 at 128 px,
# batch 16, 2 CPU cores: 0.072 s, against 0.35 s for a step that trains every layer).
# Priced as full steps, photos-8's default fit was planned at 1m20s; the whole run took 73 s.
PROBE_STEPS = 0.3
PIXEL_FEATURES = 3 * 16 * 16  # autoft.training.semisupervised.PIXEL_SIZE
PROBE_FEATURES = 512
SHRINK_FLOOR = 64  # images larger than this may train smaller when the default fit cannot hold their size


@dataclass(frozen=True)
class DataShape:
    """What the planner needs to know of the data."""

    labelled: int  # train + validation images (the pool folds are drawn from)
    val: int  # images a single split would validate on
    smallest_class: int  # images of the rarest class, over train + validation
    smallest_val_class: int  # ... in the single validation split
    unlabelled: int = 0
    extra_train: int = 0  # images a trial may add to its training set (pseudo-labels)
    classes: int = 2
    undecoded: int = 0  # images still to decode (labelled and unlabelled) when the plan is made
    source_side: int | None = None  # the image files' median short side, for the cost of decoding them


@dataclass(frozen=True)
class Overrides:
    """Choices forced by flags; ``None`` leaves them to the planner."""

    image_size: int | None = None
    epochs: int | None = None
    trials: int | None = None
    pretrain_epochs: int | None = None
    cv: int | None = None
    no_cv: bool = False
    batch_size: int | None = None


class BudgetTooSmall(AutoftError):
    """Not even the simple models fit; ``least`` is the smallest budget (seconds from now) that holds them."""

    def __init__(self, budget: float, least: float):
        self.budget, self.least = budget, least
        super().__init__(
            f"--timeout {duration(budget)} cannot hold even the smallest plan (decoding the images, logistic regression on their pixels) "
            f"on this device; give it at least {duration(least)}"
        )


# ---------------------------------------------------------------------------
# The simple models' cost


def _logistic_seconds(train: int, features: int, classes: int) -> float:
    return LOGISTIC_FIXED + LOGISTIC_SECONDS * train * features * max(2, classes)


def _decode_seconds(data: DataShape) -> float:
    return data.undecoded * (DECODE_SECONDS + DECODE_PIXEL_SECONDS * (data.source_side or 64) ** 2)


def export_seconds(rate: Throughput, modules: int = TYPICAL_MODULES, images: int = VERIFY_IMAGES) -> float:
    """One model's export and its verification on ``images``, at the share of the cores calibration measured:
    the end's Python runs on one thread, slowed by whatever else the machine runs (the README's
    quick start beside three busy processes: half a core, its end 13 s against a fixed 10 s kept)."""
    return (EXPORT_MODULE_SECONDS * modules + 2 * min(images, VERIFY_IMAGES) / rate.evaluate) / max(rate.cpu_share, MIN_SHARE)


def finish_seconds(rate: Throughput, modules: int = TYPICAL_MODULES, images: int = VERIFY_IMAGES) -> float:
    """What the end keeps back: its fixed part and one model's :func:`export_seconds`."""
    return FINISH_SECONDS / max(rate.cpu_share, MIN_SHARE) + export_seconds(rate, modules, images)


def floor_seconds(data: DataShape) -> float:
    """The least any plan needs: decoding what is left to decode, logistic regression on one split's pixels."""
    return _decode_seconds(data) + _logistic_seconds(data.labelled - data.val, PIXEL_FEATURES, data.classes)


def simple_seconds(data: DataShape, rate: Throughput, folds: int | None) -> tuple[float, float, float]:
    """(decoding and logistic regression on pixels, the linear probe: embedding every image once,
    the probe on spread labels: a fit on the labelled and unlabelled images), on each split."""
    splits = folds or 1
    train = data.labelled * (splits - 1) // splits if folds else data.labelled - data.val
    pixels = _decode_seconds(data) + splits * _logistic_seconds(train, PIXEL_FEATURES, data.classes)
    probe = splits * _logistic_seconds(train, PROBE_FEATURES, data.classes) + (data.labelled + data.unlabelled) / rate.evaluate
    return pixels, probe, splits * _logistic_seconds(train + data.unlabelled, PROBE_FEATURES, data.classes) if data.unlabelled else 0.0


# ---------------------------------------------------------------------------
# The plan


def choose_folds(data: DataShape, overrides: Overrides) -> tuple[int | None, int, str | None]:
    """(k, repeats, why) the data would want for the trials' scoring, before the budget."""
    if overrides.cv:
        return overrides.cv, 1, None
    if overrides.no_cv:
        return None, 1, None
    if data.val >= CV_MIN_VAL and data.smallest_val_class >= CV_MIN_PER_CLASS:
        return None, 1, None
    k = min(5, data.smallest_class)
    if k < 2:
        return None, 1, None
    why = f"cross-validated: a validation split would hold {data.val} images" if data.val < CV_MIN_VAL else (
        f"cross-validated: the rarest class would have {data.smallest_val_class} validation images"
    )
    return k, 2 if data.labelled < 100 else 1, why


def default_batch_size(train_images: int) -> int:
    """64, or smaller for tiny sets so that an epoch is still several steps."""
    size = 64
    while size > 16 and train_images < 4 * size:
        size //= 2
    return size


def fit_batch_size(data: DataShape, asked: int | None) -> int:
    """The batch the fits train with: ``--batch-size``, else :func:`default_batch_size` of one split's training images.
    Calibration times steps at it, so the plan prices the steps it buys."""
    return asked or default_batch_size(data.labelled - data.val)


def make_plan(
    data: DataShape, rates: dict[int, Throughput], budget: float | None, overrides: Overrides = Overrides(), *, pretrained: bool = False, jobs: int = 1,
    backbone: str = "the backbone", probe: SizeProbe | None = None, modules: int = TYPICAL_MODULES,
) -> Plan:
    """The stages ``budget`` seconds (from now) buy, in order; :class:`BudgetTooSmall` only when
    not even decoding and logistic regression on pixels fit.

    ``rates`` are measured at the images' own size (the smallest) and, with pretrained weights,
    larger ones: a larger size is affordable when it buys the same stages and a search of
    :data:`CV_EQUIVALENTS` trials. Among the affordable sizes ``probe`` measured, its choice
    wins (:meth:`SizeProbe.choose`); without one, the largest affordable size. Images over
    :data:`SHRINK_FLOOR` px train smaller only when their own size cannot hold the default fit
    at full strength; smaller images never do. ``jobs`` trials run at once, each at the
    measured throughput: the search holds ``jobs`` times as many fits; the default fit and the
    refit run alone. ``modules``, the model's, price its export (:func:`finish_seconds`).
    """
    least = floor_seconds(data)
    if budget is not None and budget * MARGIN_FREE < least:
        raise BudgetTooSmall(budget, math.ceil(least / MARGIN_FREE))

    def at(size: int) -> Plan:
        return _plan_at(data, rates.get(size) or _scaled(rates, size), budget, overrides, pretrained, jobs, backbone, modules)

    if overrides.image_size:
        return _probed(at(overrides.image_size), probe, [overrides.image_size])
    measurable = _affordable(at, rates, same_stages=False)
    chosen = probe.choose([p.image_size for p in measurable]) if probe is not None else None
    if chosen is not None:
        return _probed(next(p for p in measurable if p.image_size == chosen), probe, [chosen])
    affordable = _affordable(at, rates)
    plan = affordable[0]
    if len(affordable) > 1:
        return _probed(affordable[-1], probe, [])
    base = plan.image_size
    if not _full(plan) and base > SHRINK_FLOOR:
        for size in dict.fromkeys((max(SHRINK_FLOOR, 8 * (base // 16)), SHRINK_FLOOR)):
            smaller = at(size)
            if _full(smaller):
                smaller.reasons.append(f"{size} px, not the images' {base}: {duration(budget)} cannot train the default recipe at {base} px")
                return smaller
    return plan


def affordable_sizes(
    data: DataShape, rates: dict[int, Throughput], budget: float | None, overrides: Overrides = Overrides(), *, pretrained: bool = False, jobs: int = 1, modules: int = TYPICAL_MODULES,
) -> list[int]:
    """The images' own size, then the larger ones the budget affords (see :func:`make_plan`): what a size probe measures."""
    if overrides.image_size or (budget is not None and budget * MARGIN_FREE < floor_seconds(data)):
        return [overrides.image_size] if overrides.image_size else [min(rates)]
    return [p.image_size for p in _affordable(lambda size: _plan_at(data, rates[size], budget, overrides, pretrained, jobs, "the backbone", modules), rates, same_stages=False)]


def _affordable(at, rates: dict[int, Throughput], same_stages: bool = True) -> list[Plan]:
    """The plan at the images' own size, then those at larger sizes whose default fit and refit
    are bought at full strength, smallest first; with ``same_stages``, only those that also buy
    the same stages and a search of :data:`CV_EQUIVALENTS` trials (without a probe's reading, a
    larger size must cost nothing else). A size the probe reads better may buy fewer trials: from
    pretrained weights the features' scale is worth more than trials (photos-8, 64-px images:
    lite0's probe read 0.955 on held-out images at 112 px, 0.90 at their own size)."""
    plan = at(min(rates))
    larger = (at(size) for size in sorted(s for s in rates if s > plan.image_size))
    if not same_stages:
        return [plan, *(p for p in larger if _full(p) and p.refit)]
    return [plan, *(p for p in larger if _full(p) and _stages(p) == _stages(plan) and p.search and p.expected_trials >= CV_EQUIVALENTS)]


def _probed(plan: Plan, probe: SizeProbe | None, chosen: list[int]) -> Plan:
    """``plan`` with what the size probe measured, or why it measured nothing, in its line."""
    if probe is not None and probe.skipped:
        plan.skipped.append(f"the size probe ({probe.skipped})")
    elif probe is not None and chosen and chosen[0] in probe.accuracies:
        plan.reasons.append(probe.describe(chosen[0]))
    return plan


def _full(plan: Plan) -> bool:
    """The default fit at full strength: all it wants, or at least :data:`GOOD_STEPS` on large data."""
    return plan.default_fit and plan.default_steps >= min(plan.wanted_steps, GOOD_STEPS)


def _stages(plan: Plan) -> tuple:
    return plan.default_fit, plan.search, plan.folds, plan.repeats, plan.pretraining, plan.pseudo_labels, plan.refit


@dataclass(frozen=True)
class _Fit:
    """The default recipe's fit on one split, at one size."""

    train: int
    batch: int
    wanted: int  # steps at full strength, before the budget
    step_seconds: float
    eval_seconds: float  # one evaluation of the validation split

    def seconds(self, steps: int, evaluations: int) -> float:
        return BUILD_SECONDS + evaluations * self.eval_seconds + steps * self.step_seconds


def _plan_at(data: DataShape, rate: Throughput, budget: float | None, overrides: Overrides, pretrained: bool, jobs: int, backbone: str, modules: int) -> Plan:
    """Buy the stages in order at one size, each from what the ones before it left."""
    folds, repeats, why = choose_folds(data, overrides)
    train = data.labelled - data.val
    batch = fit_batch_size(data, overrides.batch_size)
    per_epoch = max(1, math.ceil(train / batch))
    wanted = overrides.epochs * per_epoch if overrides.epochs else max(ENOUGH_STEPS, min(GOOD_STEPS, FIXED_EPOCHS * per_epoch), TARGET_EPOCHS * per_epoch)
    fit = _Fit(train, batch, wanted, _step_seconds(batch, rate, pretrained), data.val / rate.evaluate)
    pixels, probe, spread = simple_seconds(data, rate, folds)
    finish = finish_seconds(rate, modules, data.val)  # the export is verified on the first split's validation images
    bought_probe = budget is None or pixels + probe <= budget * MARGIN_FREE - finish
    # From pretrained weights only (random features spread labels no better than pixels), within the share pseudo-labels may take.
    bought_spread = bought_probe and pretrained and spread > 0 and (budget is None or spread <= min(PSEUDO_SHARE * budget, budget * MARGIN_FREE - finish - pixels - probe))
    simple = pixels + (probe if bought_probe else 0.0) + (spread if bought_spread else 0.0)
    plan = Plan(
        image_size=rate.size, batch_size=batch, steps=0, evaluations=1, folds=None, repeats=1, trials=overrides.trials, expected_trials=0, pretrain_epochs=0,
        fit_seconds=0.0, pretrain_seconds=0.0, refit_seconds=0.0, budget=budget, wanted_steps=wanted, step_seconds=fit.step_seconds, jobs=jobs,
        default_fit=False, search=False, refit=False, simple_seconds=simple, probe=bought_probe, spread_probe=bought_spread, backbone=backbone, finish_seconds=finish,
        threads=rate.threads, export_seconds=export_seconds(rate, modules, data.val),
    )  # fmt: skip
    if not bought_probe:
        plan.skipped.append(f"the linear probe (embedding {data.labelled + data.unlabelled} images takes {duration(probe)})")
    elif pretrained and spread > 0 and not bought_spread:
        plan.skipped.append(f"the linear probe on spread labels ({folds or 1} fits on {data.unlabelled} more images take {duration(spread)})")
    left = None if budget is None else budget * MARGIN_FREE - finish - simple
    if not _buy_default(plan, fit, left, overrides, pretrained):
        least = min(fit.wanted, MIN_STEPS)  # what the least fit would be: the fields stay usable by code that reads them
        plan.steps, plan.evaluations, plan.fit_seconds = least, 2, fit.seconds(least, 2)
        return plan
    left = None if left is None else left - plan.default_seconds
    plan.refit_seconds = BUILD_SECONDS + plan.default_steps * data.labelled / max(train, 1) * fit.step_seconds  # the refit's steps grow with its data
    # Bought only when the whole of it fits as the search will keep it back (Session.refit_reserve): bought on less,
    # its reserve cut the default fit short (the quick start alone: the default fit 7 of its 8 evaluations, the refit then 10 s).
    plan.refit = left is None or left >= REFIT_SPARE * plan.refit_seconds
    if not plan.refit:
        plan.skipped.append(f"the refit on all {data.labelled} labelled images ({duration(plan.refit_seconds)}, {duration(max(left, 0))} left)")
        return plan
    left = None if left is None else max(0.0, left - REFIT_SPARE * plan.refit_seconds)
    if left is not None and left * jobs < SEARCH_MIN * plan.default_seconds:
        plan.skipped.append(f"the search ({SEARCH_MIN} trials of {plan.steps} steps need {duration(SEARCH_MIN * plan.default_seconds / jobs)}, {duration(max(left, 0))} left)")
        return plan
    plan.search = True
    wanted = (folds, repeats, why)
    noisy = bool(folds) and data.val < NOISY_VAL  # one split this small chooses by noise: folds are worth more than trials
    searchable = left
    left = buy_pretraining(plan, data, rate, left, overrides, pretrained, (CV_FEW * 2 if noisy else SEARCH_MIN) * plan.default_seconds)
    left = buy_pseudo_labels(plan, data, rate, left)
    scoring = choose_scoring(plan, data, rate, left, overrides, wanted, noisy)
    if noisy and scoring.folds is None:  # trials chosen among on a handful of images: the default fit is the better bet
        least = 2 * (plan.default_seconds / jobs + plan.pseudo_seconds)
        plan.skipped.append(f"the search (one split of {data.val} images would choose among its trials by noise; "
                            f"the default on 2 folds needs {duration(least)}, {duration(max(searchable, 0))} left)")  # fmt: skip
        plan.search, plan.pretrain_epochs, plan.pretrain_seconds, plan.pseudo_labels, plan.pseudo_seconds = False, 0, 0.0, False, 0.0
        return plan
    buy_scoring(plan, data, rate, left, overrides, wanted, scoring)
    return plan


def _step_seconds(batch: int, rate: Throughput, pretrained: bool) -> float:
    """A step of the default recipe: every layer trains from random weights; from pretrained
    weights the first :data:`PROBE_STEPS` of them train the head alone (a forward pass)."""
    full = batch / rate.train
    return PROBE_STEPS * batch / rate.evaluate + (1 - PROBE_STEPS) * full if pretrained else full


def _buy_default(plan: Plan, fit: _Fit, left: float | None, overrides: Overrides, pretrained: bool) -> bool:
    """The default recipe at full strength, squeezed to fewer steps (no fewer than
    :data:`MIN_STEPS`) when ``left`` is short."""
    evaluations = overrides.epochs or EVALUATIONS
    steps = fit.wanted
    if left is not None and not overrides.epochs:
        steps = min(steps, max(GOOD_STEPS, bucket(DEFAULT_SHARE * left / fit.step_seconds)))  # large data: half the budget, the search the rest
        if fit.seconds(steps, evaluations) > left:
            evaluations = _evaluations(left, fit.eval_seconds)
            steps = min(steps, bucket((left - BUILD_SECONDS - evaluations * fit.eval_seconds) / fit.step_seconds))
    least = 1 if overrides.epochs else min(fit.wanted, MIN_STEPS)
    if left is not None and fit.seconds(least, 1) > left:
        plan.skipped.append(f"the default recipe ({least} steps of {fit.batch} at {plan.image_size} px need {duration(fit.seconds(least, 1))}, {duration(max(left, 0))} left)")
        return False
    if steps < least:  # the evaluations took the time the least fit needs: it evaluates once
        steps, evaluations = least, 1
    if not overrides.epochs:
        evaluations = min(evaluations, _evaluations(fit.seconds(steps, 0), fit.eval_seconds))
    if steps < fit.wanted:
        plan.reasons.append(f"the default recipe squeezed to {steps} of its {fit.wanted} steps")
    plan.default_fit, plan.default_steps, plan.steps = True, steps, steps
    plan.evaluations = max(1, min(evaluations, steps))
    plan.default_seconds = plan.fit_seconds = fit.seconds(steps, plan.evaluations)
    return True


def _evaluations(fit_seconds: float, one_evaluation: float) -> int:
    """:data:`EVALUATIONS`, fewer when validating would take more than a fifth of a fit."""
    return int(max(2, min(EVALUATIONS, 0.2 * fit_seconds / max(one_evaluation, 1e-9))))


def _scaled(rates: dict[int, Throughput], size: int) -> Throughput:
    """Throughput at an unmeasured size, from the nearest measured one (cost ~ pixels)."""
    near = min(rates, key=lambda s: abs(s - size))
    ratio = (near / size) ** 2
    return Throughput(size, rates[near].train * ratio, rates[near].evaluate * ratio, rates[near].threads)
