"""The budget planner: sizes from the data, stages bought in order, robust calibration."""


import time

import numpy as np
import optuna
import pytest
import torch
from PIL import Image

from autoft.searching.planning import (
    CV_EQUIVALENTS,
    ENOUGH_STEPS,
    MIN_STEPS,
    GOOD_STEPS,
    BudgetTooSmall,
    DataShape,
    Overrides,
    Throughput,
    bucket,
    calibrate,
    candidate_sizes,
    duration,
    export_seconds,
    finish_seconds,
    make_plan,
    median_short_side,
    own_size,
)

TINY = DataShape(labelled=100, val=20, smallest_class=10, smallest_val_class=2, classes=10)
LARGE = DataShape(labelled=20_000, val=4_000, smallest_class=1_000, smallest_val_class=200, classes=10)
RATES = {32: Throughput(32, train=500.0, evaluate=2000.0)}
# The README's quick start (sample:digits, 1,797 images) and the 100 labelled + 1,197 unlabelled digits, not yet decoded.
DIGITS = DataShape(labelled=1797, val=360, smallest_class=174, smallest_val_class=35, classes=10, undecoded=1797, source_side=32)
MID = DataShape(labelled=1200, val=240, smallest_class=120, smallest_val_class=24, classes=10, undecoded=1200, source_side=48)
FEW = DataShape(labelled=100, val=20, smallest_class=10, smallest_val_class=2, unlabelled=1197, extra_train=600, classes=10, undecoded=1297, source_side=32)


def shape_of(plan):
    """What must not change between two runs of one command: the stages, their sizes, the steps' bucket."""
    return (plan.image_size, plan.batch_size, plan.folds, plan.repeats, plan.default_fit, plan.search, plan.pretraining, plan.pseudo_labels, plan.refit,
            bucket(plan.default_steps))  # fmt: skip


def test_candidate_sizes_follow_the_images_not_the_backbone():
    assert candidate_sizes(25, native=224, pretrained=False) == [32]  # at least 32, a multiple of 8
    assert candidate_sizes(61, native=224, pretrained=False) == [64]
    assert candidate_sizes(42, native=224, pretrained=False) == [48]  # rounded up: never below the images' own size
    assert candidate_sizes(500, native=224, pretrained=False) == [224]  # capped by the native size
    assert candidate_sizes(48, native=224, pretrained=True) == [48, 96, 224]  # larger only when pretrained


def test_median_short_side_reads_headers(tmp_path):
    paths = []
    for i, (w, h) in enumerate([(40, 30), (100, 50), (64, 64)]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (w, h)).save(path)
        paths.append(path)
    assert median_short_side(paths) == 50
    assert median_short_side([np.zeros((20, 30, 3), np.uint8)]) == 20


@pytest.mark.parametrize("side", [20, 25, 42, 48, 61])
@pytest.mark.parametrize("budget", [20, 60, 120, 600])
def test_the_size_is_never_below_the_images_own(side, budget):
    size = own_size(side, 224)
    slow = {size: Throughput(size, train=40.0 * (32 / size) ** 2, evaluate=160.0 * (32 / size) ** 2)}  # resnet18 on a busy 2-core CPU
    assert make_plan(TINY, slow, budget).image_size == size >= side


def test_large_images_train_smaller_only_when_their_size_cannot_hold_the_default_fit():
    rates = {224: Throughput(224, 30.0, 100.0)}
    shrunk = make_plan(LARGE, rates, 600)
    assert 64 <= shrunk.image_size < 224 and "not the images' 224" in shrunk.line()
    assert make_plan(LARGE, rates, 36_000).image_size == 224


@pytest.mark.parametrize("budget", [60, 120, 360, 1800])
def test_a_plan_fits_its_budget(budget):
    plan = make_plan(TINY, RATES, budget)
    assert plan.estimated_seconds() <= budget
    assert plan.default_fit and plan.default_steps >= ENOUGH_STEPS


@pytest.mark.parametrize("train_rate", [500.0, 40.0, 12.0, 4.0])
@pytest.mark.parametrize("data, budget", [(DIGITS, 60), (FEW, 120), (TINY, 30)])
def test_no_refusal_while_logistic_regression_fits(data, budget, train_rate):
    """The quick start's 1m and 100 + 1,197 digits at 2m plan something on any device: at
    worst only the simple models, and the line says why."""
    plan = make_plan(data, {32: Throughput(32, train_rate, 4 * train_rate)}, budget, backbone="resnet18")
    assert plan.estimated_seconds() <= budget
    if not plan.default_fit:
        assert plan.line().startswith("plan: only the simple models") and "cannot train resnet18" in plan.line()
        assert not plan.search and not plan.refit and "skipped the default recipe" in plan.line()


def test_only_a_budget_that_cannot_decode_and_fit_logistic_regression_is_refused():
    with pytest.raises(BudgetTooSmall) as caught:
        make_plan(DIGITS, RATES, 2)
    least = caught.value.least
    assert 2 < least < 30 and duration(least) in str(caught.value)
    assert not make_plan(DIGITS, RATES, least).default_fit  # and that one plans the simple models


def test_the_plan_degrades_smoothly_as_throughput_drops():
    """From the whole plan to the default fit alone, to fewer default steps, to the simple
    models: each step down keeps what is cheaper, and the default is cut short rather than dropped."""
    plans = [make_plan(MID, {32: Throughput(32, rate, 4 * rate)}, 360) for rate in (2000, 500, 150, 60, 30, 10, 3)]
    bought = [(p.search, p.default_fit) for p in plans]
    assert bought == sorted(bought, reverse=True) and bought[0] == (True, True) and bought[-1] == (False, False)
    steps = [p.default_steps for p in plans if p.default_fit]
    assert steps == sorted(steps, reverse=True) and min(steps) >= MIN_STEPS and steps[0] == GOOD_STEPS and min(steps) < GOOD_STEPS


def test_a_hundred_images_train_the_fixed_recipes_thirty_epochs_not_more():
    """On 80 training images, 400 steps of 16 would be 80 epochs: the default fit is the fixed
    recipe's 30 epochs (150 steps), and the time goes to the search and its folds."""
    plan = make_plan(TINY, RATES, 1800)
    assert plan.wanted_steps == plan.default_steps == 30 * 80 // 16


def test_the_default_fit_is_planned_at_full_strength_before_any_cv():
    for budget in (60, 120, 240, 360, 900, 3600):
        plan = make_plan(TINY, {32: Throughput(32, 150.0, 600.0)}, budget)
        if plan.folds or plan.search or plan.pretraining:
            assert plan.default_fit and plan.default_steps == plan.wanted_steps and plan.refit
    squeezed = make_plan(TINY, {32: Throughput(32, 150.0, 600.0)}, 180)
    assert squeezed.search and squeezed.steps == squeezed.default_steps  # trials as long as the default, not a CV share of it
    assert squeezed.folds == 5 and squeezed.expected_trials == 1  # 20 validation images: the default alone on 5 folds before 2 trials on 3
    fewer = make_plan(TINY, {32: Throughput(32, 150.0, 600.0)}, 120)
    assert fewer.folds == 3 and "skipped 5-fold CV (2 trials need" in fewer.line()  # fewer folds, not none
    noisy = make_plan(FEW, {32: Throughput(32, 150.0, 600.0)}, 95)  # not even the default on 2 folds fits after the pseudo-labels
    assert noisy.default_fit and noisy.refit and not noisy.search and not noisy.folds and not noisy.pretraining and not noisy.pseudo_labels
    assert "skipped the search (one split of 20 images would choose among its trials by noise; the default on 2 folds needs" in noisy.line()
    forced = make_plan(FEW, {32: Throughput(32, 150.0, 600.0)}, 95, Overrides(no_cv=True))  # one split asked for: the search on it
    assert forced.search and not forced.folds
    ample = make_plan(TINY, {32: Throughput(32, 150.0, 600.0)}, 3 * 3600)
    assert ample.folds == 5 and ample.expected_trials >= CV_EQUIVALENTS


def test_the_plan_line_names_what_was_bought_and_skipped():
    rates = {32: Throughput(32, 150.0, 600.0)}
    assert "the default recipe only" in make_plan(FEW, rates, 60).line() and "no search" in make_plan(FEW, rates, 60).line()
    assert "skipped the search (2 trials of 150 steps" in make_plan(TINY, rates, 60).line()
    full = make_plan(FEW, rates, 1800).line()
    assert "a search (150 steps a trial" in full and "pretraining" in full and "pseudo-labels" in full and "refit" in full


def test_noisy_throughput_plans_the_same_shape():
    """Rates measured 3% apart (two medians on a quiet machine) plan the same stages and size at
    most budgets; over a sweep of rates 15% either way the plan changes shape at most once and
    never flips back (every stage is bought on a threshold, so somewhere a boundary lies: it
    must not jitter, and it lies within 3% of a given budget's rate for few budgets)."""
    for data in (FEW, TINY, DIGITS, MID):
        plan_at = lambda noise, budget: shape_of(make_plan(data, {32: Throughput(32, 150.0 * noise, 600.0 * noise)}, budget))  # noqa: E731
        budgets = range(60, 1801, 20)
        same = [len({plan_at(noise, budget) for noise in (0.97, 1.0, 1.03)}) == 1 for budget in budgets]
        assert sum(same) >= 0.8 * len(same), (data, [b for b, ok in zip(budgets, same) if not ok])
        for budget in (120, 360, 1800):
            sweep = [plan_at(noise, budget) for noise in np.linspace(0.85, 1.15, 31)]
            changes = [i for i in range(1, len(sweep)) if sweep[i] != sweep[i - 1]]
        assert len(changes) <= 1, (data, budget, changes)


def test_two_calibrations_of_a_tiny_model_plan_the_same_shape():
    import timm

    def measure():
        torch.manual_seed(0)
        return calibrate(lambda: timm.create_model("test_resnet", num_classes=10), [32], 16, torch.device("cpu"), 10, seconds=0.5)

    first, second = measure(), measure()
    assert all(r[32].evaluate > 0 and r[32].train > 0 for r in (first, second))
    # A day's budget: the shared 2-core test machine's load swings throughput several-fold between runs.
    plans = [make_plan(TINY, rates, 24 * 3600) for rates in (first, second)]
    assert shape_of(plans[0]) == shape_of(plans[1]) and plans[0].search and plans[0].folds == 5


def test_small_validation_splits_are_cross_validated_and_say_why():
    plan = make_plan(TINY, RATES, 3600)
    assert plan.folds and plan.folds >= 2
    assert "validation split would hold 20 images" in plan.line()
    assert make_plan(TINY, RATES, 3600, Overrides(no_cv=True)).folds is None
    assert make_plan(TINY, RATES, 3600, Overrides(cv=4)).folds == 4
    assert make_plan(LARGE, {224: Throughput(224, 300.0, 1000.0)}, 3600).folds is None


def test_tiny_data_gets_the_fixed_recipes_epochs_not_a_few():
    plan = make_plan(TINY, RATES, None)
    assert plan.steps >= ENOUGH_STEPS and plan.default_steps == plan.steps  # 80 training images repeat: 30 epochs of 5 steps, not 10 epochs of 2
    assert plan.batch_size < 64  # and an epoch is more than one batch


def test_more_budget_buys_more_trials():
    short, long = make_plan(TINY, RATES, 120), make_plan(TINY, RATES, 1800)
    assert long.expected_trials * (long.folds or 1) > short.expected_trials * (short.folds or 1)


def test_flags_override_each_choice():
    plan = make_plan(TINY, RATES, 360, Overrides(epochs=3, trials=5, batch_size=8, image_size=32))
    assert plan.steps == plan.default_steps == 3 * 10 and plan.evaluations == 3  # 80 images / 8 a batch = 10 steps an epoch
    assert plan.trials == 5 and plan.batch_size == 8


def test_pretraining_is_bought_from_what_the_default_fit_leaves():
    shape = DataShape(labelled=100, val=20, smallest_class=10, smallest_val_class=2, unlabelled=1500, classes=10)
    plan = make_plan(shape, RATES, 360)
    assert plan.pretrain_epochs >= 1 and plan.default_steps == plan.wanted_steps
    assert plan.pretrain_seconds <= 0.25 * (360 - plan.default_seconds - plan.refit_seconds)
    assert make_plan(shape, RATES, 360, Overrides(pretrain_epochs=3)).pretrain_epochs == 3
    short = make_plan(shape, {32: Throughput(32, 100.0, 400.0)}, 150)
    assert not short.pretraining and "skipped pretraining" in short.line() or not short.search


def test_pretrained_weights_are_not_pretrained_again_unless_asked():
    shape = DataShape(labelled=100, val=20, smallest_class=10, smallest_val_class=2, unlabelled=1500, classes=10)
    assert make_plan(shape, RATES, 360).pretrain_epochs >= 1  # from random weights the same budget buys it
    plan = make_plan(shape, RATES, 360, pretrained=True)
    assert plan.pretrain_epochs == 0 and "skipped pretraining (the weights are pretrained already" in plan.line()
    assert make_plan(shape, RATES, 360, Overrides(pretrain_epochs=2), pretrained=True).pretrain_epochs == 2


def test_the_probe_on_spread_labels_is_bought_from_pretrained_weights_within_the_pseudo_labels_share():
    shape = DataShape(labelled=100, val=20, smallest_class=10, smallest_val_class=2, unlabelled=1500, classes=10)
    plan = make_plan(shape, RATES, 360, pretrained=True)
    assert plan.probe and plan.spread_probe
    assert not make_plan(shape, RATES, 360).spread_probe  # random features spread labels no better than pixels
    assert not make_plan(TINY, RATES, 360, pretrained=True).spread_probe  # no unlabelled images
    # 30,000 unlabelled images: five fits on each would take over a tenth of 6m; the plain probe stays
    many = DataShape(labelled=100, val=20, smallest_class=10, smallest_val_class=2, unlabelled=30_000, classes=10)
    costly = make_plan(many, {32: Throughput(32, train=500.0, evaluate=20_000.0)}, 360, pretrained=True)
    assert costly.probe and not costly.spread_probe and "skipped the linear probe on spread labels (5 fits on 30000 more images take" in costly.line()
    assert make_plan(many, {32: Throughput(32, train=500.0, evaluate=20_000.0)}, None, pretrained=True).spread_probe  # no --timeout


def test_steps_fall_in_buckets():
    assert [bucket(s) for s in (7, 42, 119, 160, 399, 400, 451, 999)] == [7, 40, 100, 150, 300, 400, 400, 800]


def test_durations_read_as_durations():
    assert duration(95) == "1m35s" and duration(3600) == "1h" and duration(7) == "7s" and duration(360) == "6m"


def test_from_pretrained_weights_the_default_fit_is_priced_as_lp_ft_trains():
    """LP-FT trains the head alone for its first 30% of steps, at about a forward pass's cost:
    priced as full steps, photos-8's default fit was planned at 1m20s and the whole run took 73 s."""
    scratch, pretrained = make_plan(TINY, RATES, 360), make_plan(TINY, RATES, 360, pretrained=True)
    batch = scratch.batch_size
    assert pretrained.batch_size == batch and scratch.step_seconds == pytest.approx(batch / 500.0)
    assert pretrained.step_seconds == pytest.approx(0.3 * batch / 2000.0 + 0.7 * batch / 500.0)
    assert pretrained.default_steps == scratch.default_steps and pretrained.default_seconds < scratch.default_seconds


@pytest.mark.parametrize("cost, fastest", [(lambda threads: 0.004 * threads, 1), (lambda threads: 0.008 / threads, 4)])
def test_calibration_keeps_the_thread_count_that_trains_fastest(cost, fastest):
    """Fewer threads win where they wait less on each other (a small model, a busy machine);
    more win where the work divides. Halving stops at the first count slower than the best."""
    from autoft.searching.calibration import fastest_threads

    tried = []

    def step():
        tried.append(torch.get_num_threads())
        time.sleep(cost(torch.get_num_threads()))

    before = torch.get_num_threads()
    count, rate = fastest_threads(step, 8, 4, seconds=0.1, windows=3)
    assert count == fastest and rate == pytest.approx(8 / cost(fastest), rel=0.5)
    assert sorted(set(tried), reverse=True) == ([4, 2, 1] if fastest == 1 else [4, 2])
    assert torch.get_num_threads() == before


def test_a_search_trains_with_the_threads_calibration_chose_and_gives_the_callers_back(image_folder, tmp_path, monkeypatch):
    import autoft.searching.calibration as calibration
    from autoft.searching.runner import search
    from autoft.searching.storage import open_storage

    measured = calibration.fastest_threads
    monkeypatch.setattr(calibration, "fastest_threads", lambda step, batch, most, *args: (1, measured(step, batch, 1, *args)[1]))  # as measured where one thread is fastest
    torch.set_num_threads(2)
    result = search("test_resnet", str(image_folder), tmp_path / "run", trials=2, epochs=1, image_size=16, device="cpu", weights="scratch", export_onnx=False, seed=0)
    assert result.plan["threads"] == 1 and "16 px, 1 CPU thread;" in result.plan["line"]
    study = optuna.load_study(study_name=result.study_name, storage=open_storage(result.storage))
    assert [t.user_attrs["threads"] for t in study.trials] == [1, 1]  # every trial trained with it
    assert torch.get_num_threads() == 2  # and the caller's count came back


def test_the_end_is_priced_by_the_models_size_and_the_share_of_the_cores_calibration_measured():
    """The export traces every module, on one thread; beside three busy processes the quick start
    had half a core and its end took 13 s: a fixed 10 s kept for it ran it past --timeout."""
    alone, shared = Throughput(32, 1500.0, 5000.0), Throughput(32, 750.0, 2500.0, threads=1, cpu_share=0.5)
    assert finish_seconds(shared, 100) == pytest.approx(2 * finish_seconds(Throughput(32, 1500.0, 2500.0), 100))
    assert finish_seconds(alone, 273) > finish_seconds(alone, 94) + 4  # lite0 against resnet18
    quiet, busy = make_plan(DIGITS, {32: alone}, 60, modules=71), make_plan(DIGITS, {32: shared}, 60, modules=71)
    assert quiet.finish_seconds == pytest.approx(finish_seconds(alone, 71)) and busy.finish_seconds > 1.9 * quiet.finish_seconds
    assert busy.estimated_seconds() <= 60 and quiet.estimated_seconds() <= 60
    assert busy.export_seconds == pytest.approx(2 * export_seconds(Throughput(32, 750.0, 2500.0), 71))
