"""The budget planner: sizes from the data, steps from throughput, folds from the split's size."""

import numpy as np
import pytest
from PIL import Image

from autoft.planning import (
    BudgetTooSmall,
    DataShape,
    Overrides,
    Throughput,
    candidate_sizes,
    duration,
    make_plan,
    median_short_side,
)

TINY = DataShape(labelled=100, val=20, smallest_class=10, smallest_val_class=2)
LARGE = DataShape(labelled=20_000, val=4_000, smallest_class=1_000, smallest_val_class=200)
RATES = {32: Throughput(32, train=500.0, evaluate=2000.0)}


def test_candidate_sizes_follow_the_images_not_the_backbone():
    assert candidate_sizes(25, native=224, pretrained=False) == [32]  # at least 32, a multiple of 8
    assert candidate_sizes(61, native=224, pretrained=False) == [64]
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


@pytest.mark.parametrize("budget", [60, 120, 360, 1800])
def test_a_plan_fits_its_budget(budget):
    plan = make_plan(TINY, RATES, budget)
    assert plan.estimated_seconds() <= budget
    assert plan.steps >= 40


def test_small_validation_splits_are_cross_validated_and_say_why():
    plan = make_plan(TINY, RATES, 360)
    assert plan.folds and plan.folds >= 2
    assert "validation split would hold 20 images" in plan.line()
    assert make_plan(TINY, RATES, 360, Overrides(no_cv=True)).folds is None
    assert make_plan(TINY, RATES, 360, Overrides(cv=4)).folds == 4
    assert make_plan(LARGE, {224: Throughput(224, 300.0, 1000.0)}, 3600).folds is None


def test_tiny_data_gets_hundreds_of_steps_not_a_few_epochs():
    plan = make_plan(TINY, RATES, None)
    assert plan.steps >= 400  # 80 training images repeat: far more than 10 epochs of 2 steps
    assert plan.batch_size < 64  # and an epoch is more than one batch


def test_more_budget_buys_longer_trials_or_more_of_them():
    short, long = make_plan(TINY, RATES, 120), make_plan(TINY, RATES, 1800)
    assert long.steps * (long.folds or 1) * long.expected_trials > short.steps * (short.folds or 1) * short.expected_trials


def test_flags_override_each_choice():
    plan = make_plan(TINY, RATES, 360, Overrides(epochs=3, trials=5, batch_size=8, image_size=32))
    assert plan.steps == 3 * 10 and plan.evaluations == 3  # 80 images / 8 a batch = 10 steps an epoch
    assert plan.trials == 5 and plan.batch_size == 8


def test_pretraining_gets_a_share_of_the_budget():
    shape = DataShape(labelled=100, val=20, smallest_class=10, smallest_val_class=2, unlabelled=1500)
    plan = make_plan(shape, RATES, 360)
    assert plan.pretrain_epochs >= 1
    assert 0.1 * 360 <= plan.pretrain_seconds <= 0.25 * 360
    assert make_plan(shape, RATES, 360, Overrides(pretrain_epochs=3)).pretrain_epochs == 3


def test_a_budget_too_small_names_the_least_that_works():
    with pytest.raises(BudgetTooSmall) as caught:
        make_plan(LARGE, {224: Throughput(224, 30.0, 100.0)}, 10)
    least = caught.value.least
    assert least > 10
    make_plan(LARGE, {224: Throughput(224, 30.0, 100.0)}, least)  # and that one does fit
    assert duration(least) in str(caught.value)


def test_when_the_data_size_cannot_fit_a_smaller_size_is_planned():
    plan = make_plan(LARGE, {224: Throughput(224, 30.0, 100.0)}, 600)
    assert plan.image_size < 224


def test_durations_read_as_durations():
    assert duration(95) == "1m35s" and duration(3600) == "1h" and duration(7) == "7s" and duration(360) == "6m"
