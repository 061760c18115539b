"""The budget planner: turn ``--timeout`` into image size, training length, folds and trials.

Before any trial, a short calibration times a few training batches of the backbone on
the device at each candidate image size. From that throughput, the dataset's size and
the time left, :func:`make_plan` chooses

- the image size: the images' median short side (a multiple of 8, at least 32, at most
  the backbone's native size); a larger one only with pretrained weights and time to spare;
- the training length of a trial in optimizer *steps*, so that a trial on 80 images still
  gets the hundreds of steps it needs (the data repeat), and how often it is evaluated;
- k-fold cross-validation when a validation split would be too small to choose on;
- the pretraining stage's epochs, and time kept back for the final refit;
- so that about :data:`TRIAL_EQUIVALENTS` full-length trials fit in the rest.

Every choice can be forced by the flag that names it; a choice the flags force is taken
as given and the rest is planned around it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from autoft.errors import AutoftError

MIN_SIZE = 32
TRIAL_EQUIVALENTS = 10  # full-length trials the search budget must hold
MIN_STEPS = 40  # below this a trial learns nothing worth ranking
GOOD_STEPS = 400  # what a small dataset needs: more is spent only while epochs are few
ENOUGH_STEPS = 150  # fewer than this, and fewer folds or trial-equivalents are tried first
TARGET_EPOCHS = 15  # ... and for larger ones, about this many passes over the data
EVALUATIONS = 8  # evaluation points of a trial: the pruner's rungs
PRETRAIN_SHARE = 0.2  # of the time left, for the pretraining stage
REFIT_SHARE = 0.15  # of what pretraining leaves, kept for the final refit on every labelled image
PRETRAIN_MAX_EPOCHS = 50
CV_MIN_VAL = 300  # a validation split smaller than this is noise to choose on
CV_MIN_PER_CLASS = 30
MARGIN = 0.03  # of the budget, kept for the report and the last trial's bookkeeping
BUILD_SECONDS = 0.5  # building a backbone and its optimizer, per fit


@dataclass(frozen=True)
class Throughput:
    """Images a second on this device at one image size, measured."""

    size: int
    train: float
    evaluate: float


@dataclass(frozen=True)
class DataShape:
    """What the planner needs to know of the data."""

    labelled: int  # train + validation images (the pool folds are drawn from)
    val: int  # images a single split would validate on
    smallest_class: int  # images of the rarest class, over train + validation
    smallest_val_class: int  # ... in the single validation split
    unlabelled: int = 0
    extra_train: int = 0  # images a trial may add to its training set (pseudo-labels)


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


@dataclass
class Plan:
    image_size: int
    batch_size: int
    steps: int  # optimizer steps of one fit
    evaluations: int  # evaluation points of one fit (the pruner's resource)
    folds: int | None  # k of k-fold cross-validation, None for one split
    repeats: int  # repetitions of the k folds with other shuffles
    trials: int | None  # a cap, when the user gave one
    expected_trials: int  # full-length trials expected to fit
    pretrain_epochs: int
    fit_seconds: float  # one fit, estimated
    pretrain_seconds: float
    refit_seconds: float  # kept back for the final refit
    budget: float | None  # the seconds the plan was made for, None without --timeout
    reasons: list[str] = field(default_factory=list)
    wanted_steps: int = 0  # what the data would want, before the budget
    step_seconds: float = 0.0
    jobs: int = 1  # trials run at once (``--jobs``), each at the throughput measured for one
    flips: bool = True  # whether augmentation may flip images horizontally (the data decide: see autoft.baselines)

    @property
    def trial_seconds(self) -> float:
        return self.fit_seconds * (self.folds or 1) * self.repeats

    @property
    def eval_every(self) -> int:
        return max(1, self.steps // self.evaluations)

    def estimated_seconds(self) -> float:
        return self.pretrain_seconds + self.expected_trials * self.trial_seconds / self.jobs + self.refit_seconds

    def line(self) -> str:
        """``plan: 32 px, 400 steps a trial (...), 5-fold CV (...), ~24 trials, pretraining 15 epochs (1m10s), within 6m``."""
        parts = [f"{self.image_size} px", f"{self.steps} steps of {self.batch_size} a fit, {self.evaluations} evaluations"]
        if self.folds:
            parts.append(f"{self.folds}-fold CV" + (f" x{self.repeats}" if self.repeats > 1 else ""))
        parts.append(f"~{self.expected_trials} trials" if self.trials is None else f"{self.trials} trials")
        if self.jobs > 1:
            parts[-1] += f", {self.jobs} at a time"
        if self.pretrain_epochs:
            parts.append(f"pretraining {self.pretrain_epochs} epochs ({duration(self.pretrain_seconds)})")
        tail = f"within {duration(self.budget)}" if self.budget is not None else f"about {duration(self.estimated_seconds())} in all"
        why = f" ({'; '.join(self.reasons)})" if self.reasons else ""
        return "plan: " + ", ".join(parts) + f", {tail}{why}"

    def as_dict(self) -> dict:
        return {**asdict(self), "eval_every": self.eval_every, "line": self.line()}


def duration(seconds: float | None) -> str:
    """``95`` -> ``1m35s``; ``3600`` -> ``1h``."""
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs or not (hours or minutes) else "")
    return text


# ---------------------------------------------------------------------------
# The data's own size


def short_side(sample) -> int | None:
    """The shorter side of one image without decoding it (a header read for files)."""
    import numpy as np
    from PIL import Image

    try:
        if isinstance(sample, np.ndarray):
            return int(min(sample.shape[:2]))
        if isinstance(sample, Image.Image):
            return int(min(sample.size))
        with Image.open(sample) as image:
            return int(min(image.size))
    except Exception:  # unreadable: decoding reports it later
        return None


def median_short_side(samples: Sequence, limit: int = 256, seed: int = 0) -> int | None:
    import random

    chosen = list(samples) if len(samples) <= limit else random.Random(seed).sample(list(samples), limit)
    sides = sorted(s for s in map(short_side, chosen) if s)
    return sides[len(sides) // 2] if sides else None


def candidate_sizes(median_side: int | None, native: int, pretrained: bool) -> list[int]:
    """The data's own size, then (pretrained weights only) larger ones up to the native size."""
    if median_side is None:
        return [native]
    base = min(native, max(MIN_SIZE, 8 * round(median_side / 8)))
    sizes = [base]
    if pretrained:
        sizes += [s for s in (2 * base, native) if base < s <= native and s not in sizes]
    return sizes


# ---------------------------------------------------------------------------
# Calibration


def calibrate(make_model: Callable[[], "object"], sizes: Sequence[int], batch_size: int, device, num_classes: int, seconds: float = 1.0) -> dict[int, Throughput]:
    """Time a few training steps and one evaluation batch at each size: seconds, not minutes."""
    import torch

    model = make_model().to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    results = {}
    for size in sizes:
        x = torch.rand(batch_size, 3, size, size, device=device)
        y = torch.randint(0, num_classes, (batch_size,), device=device)
        model.train()

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        step()  # the first step pays for allocation and kernel selection
        train = _rate(step, batch_size, seconds, device)
        model.eval()
        with torch.inference_mode():
            evaluate = _rate(lambda: model(x), batch_size, seconds / 4, device)
        results[size] = Throughput(size, train, evaluate)
        if train * seconds < batch_size:  # this size is already slow: larger ones only more so
            break
    return results


def _rate(step: Callable[[], object], batch_size: int, seconds: float, device) -> float:
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    started, count = time.perf_counter(), 0
    while count < 2 or (time.perf_counter() - started < seconds and count < 20):
        step()
        sync()
        count += 1
    return batch_size * count / (time.perf_counter() - started)


# ---------------------------------------------------------------------------
# The plan


def choose_folds(data: DataShape, overrides: Overrides) -> tuple[int | None, int, str | None]:
    """(k, repeats, why) for the trials' scoring."""
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


def make_plan(data: DataShape, rates: dict[int, Throughput], budget: float | None, overrides: Overrides = Overrides(), *, pretrained: bool = False, jobs: int = 1) -> Plan:
    """The best plan ``budget`` seconds (from now) can buy; an error naming the least that would do.

    ``jobs`` trials run at once, each at the measured throughput (``rates`` measured with
    one job's share of the device): the trials' time holds ``jobs`` times as many fits.

    Sizes are tried largest first; at each, the most folds whose fits still get
    :data:`GOOD_STEPS` / 2 steps, else the most folds that get :data:`MIN_STEPS`. When the
    data's own size cannot fit, smaller sizes are tried: a model at half the size beats none.
    """
    plan = _first_fitting(data, rates, budget, overrides, jobs)
    if plan is None:
        raise BudgetTooSmall(budget or 0.0, _least_budget(data, rates, overrides, jobs))
    return plan


def _first_fitting(data: DataShape, rates: dict[int, Throughput], budget: float | None, overrides: Overrides, jobs: int = 1) -> Plan | None:
    """The first plan that trains enough (:data:`ENOUGH_STEPS`), sizes largest first; failing
    that, the first that trains at all: a well-trained model at a smaller size beats a barely
    trained one at a larger."""
    folds, repeats, why = choose_folds(data, overrides)
    sizes = [overrides.image_size] if overrides.image_size else sorted(rates, reverse=True)
    if not overrides.image_size:
        smallest = min(sizes)
        sizes += [s for s in dict.fromkeys((smallest // 2, smallest // 4, MIN_SIZE)) if MIN_SIZE <= s < smallest]
    options = [
        _plan_at(data, rates.get(size) or _scaled(rates, size), k, repeats if k == folds else 1, budget, overrides, why if k else None, equivalents, jobs)
        for size in sizes
        for equivalents in (TRIAL_EQUIVALENTS, 6, MIN_TRIAL_EQUIVALENTS)
        for k in _fold_options(folds, overrides)
    ]
    good = [p for p in options if p.steps >= min(ENOUGH_STEPS, p.wanted_steps)] or [p for p in options if p.steps >= _min_steps(overrides)]
    return good[0] if good else None


class BudgetTooSmall(AutoftError):
    """No plan fits; ``least`` is the smallest budget (seconds from now) that would hold one."""

    def __init__(self, budget: float, least: float):
        self.budget, self.least = budget, least
        super().__init__(f"--timeout {duration(budget)} cannot hold even the smallest plan on this device; give it at least {duration(least)}")


def _least_budget(data: DataShape, rates: dict[int, Throughput], overrides: Overrides, jobs: int = 1) -> float:
    """Bisect on the budget: plans are arithmetic, so this costs microseconds."""
    low, high = 1.0, 3600.0
    while _first_fitting(data, rates, high, overrides, jobs) is None and high < 1e7:
        low, high = high, high * 4
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (low, middle) if _first_fitting(data, rates, middle, overrides, jobs) else (middle, high)
    return math.ceil(high)


MARGIN_FREE = 1 - MARGIN
MIN_TRIAL_EQUIVALENTS = 3  # fewer than TRIAL_EQUIVALENTS are planned only when no size affords them


def _min_steps(overrides: Overrides) -> int:
    return 1 if overrides.epochs else MIN_STEPS


def _fold_options(folds: int | None, overrides: Overrides) -> list[int | None]:
    if folds is None or overrides.cv:
        return [folds]
    return [k for k in (folds, 3, 2) if k <= folds]


def _scaled(rates: dict[int, Throughput], size: int) -> Throughput:
    """Throughput at an unmeasured size, from the nearest measured one (cost ~ pixels)."""
    near = min(rates, key=lambda s: abs(s - size))
    ratio = (near / size) ** 2
    return Throughput(size, rates[near].train * ratio, rates[near].evaluate * ratio)


def _plan_at(
    data: DataShape, rate: Throughput, folds: int | None, repeats: int, budget: float | None, overrides: Overrides, why: str | None,
    trial_equivalents: int = TRIAL_EQUIVALENTS, jobs: int = 1,
) -> Plan:
    fit_train = (data.labelled * (folds - 1) // folds if folds else data.labelled - data.val) + data.extra_train
    fit_val = data.labelled // folds if folds else data.val
    batch = overrides.batch_size or default_batch_size(fit_train)
    steps_per_epoch = max(1, math.ceil(fit_train / batch))
    wanted = overrides.epochs * steps_per_epoch if overrides.epochs else max(GOOD_STEPS, TARGET_EPOCHS * steps_per_epoch)
    step_seconds = batch / rate.train
    fits = (folds or 1) * repeats
    usable = None if budget is None else budget * MARGIN_FREE
    pretrain_epochs = _pretrain_epochs(data, rate, usable, overrides)
    pretrain_seconds = pretrain_epochs * _pretrain_epoch_seconds(data, rate)
    refit_ratio = (data.labelled + data.extra_train) / max(fit_train, 1)
    evaluations = overrides.epochs or EVALUATIONS
    if usable is None or overrides.epochs:
        steps = wanted
    else:
        # The trial-equivalents, then one refit on every labelled image, share what pretraining leaves.
        # The final refit keeps REFIT_SHARE (trials are short; the model shipped trains longer), the trials share the rest.
        per_fit = (usable - pretrain_seconds) * (1 - REFIT_SHARE) * jobs / (trial_equivalents * fits)
        evaluations = _evaluations(per_fit, fit_val / rate.evaluate)
        steps = min(wanted, int((per_fit - BUILD_SECONDS - evaluations * fit_val / rate.evaluate) / step_seconds))
    fit_seconds = BUILD_SECONDS + evaluations * fit_val / rate.evaluate + max(steps, 0) * step_seconds
    refit_seconds = fit_seconds * refit_ratio if usable is None else max(fit_seconds * refit_ratio, REFIT_SHARE * (usable - pretrain_seconds))
    if usable is None:
        expected = overrides.trials or 20
    else:
        expected = max(0, round(jobs * (usable - pretrain_seconds - refit_seconds) / (fit_seconds * fits)))
        expected = min(expected, overrides.trials) if overrides.trials else expected
    return Plan(
        image_size=rate.size, batch_size=batch, steps=max(steps, 0), evaluations=max(1, min(evaluations, max(steps, 1))), folds=folds, repeats=repeats,
        trials=overrides.trials, expected_trials=expected, pretrain_epochs=pretrain_epochs, fit_seconds=fit_seconds, pretrain_seconds=pretrain_seconds,
        refit_seconds=refit_seconds, budget=budget, reasons=[why] if why else [], wanted_steps=wanted, step_seconds=step_seconds, jobs=jobs,
    )


def _evaluations(fit_seconds: float, one_evaluation: float) -> int:
    """:data:`EVALUATIONS`, fewer when validating would take more than a fifth of a fit."""
    return int(max(2, min(EVALUATIONS, 0.2 * fit_seconds / max(one_evaluation, 1e-9))))


def _pretrain_epoch_seconds(data: DataShape, rate: Throughput) -> float:
    return 2.2 * (data.unlabelled + data.labelled) / rate.train  # two augmented views an image


def _pretrain_epochs(data: DataShape, rate: Throughput, usable: float | None, overrides: Overrides) -> int:
    if not data.unlabelled:
        return 0
    if overrides.pretrain_epochs is not None:
        return overrides.pretrain_epochs
    if usable is None:
        return PRETRAIN_MAX_EPOCHS
    return min(PRETRAIN_MAX_EPOCHS, int(PRETRAIN_SHARE * usable / _pretrain_epoch_seconds(data, rate)))
