"""Pseudo-labels by label propagation, and the two reference baselines."""

import numpy as np
import pytest
import torch

from autoft.training.baselines import pixel_baseline
from autoft.model.ensemble import AveragedMembers, EnsembleChoice, greedy_selection, win_rate
from autoft.data import ImageTensors
from autoft.training.semisupervised import PIXEL_SPACES, pseudo_label, pseudo_labels


def accuracy(labels, probabilities):
    return float((probabilities.argmax(1) == labels).mean())


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images = torch.from_numpy((x.reshape(-1, 1, 8, 8) / 16 * 255).astype(np.uint8)).repeat(1, 3, 1, 1)
    rng = np.random.default_rng(0)
    labelled = np.concatenate([rng.choice(np.flatnonzero(y == c), 10, replace=False) for c in range(10)])
    rest = np.setdiff1d(np.arange(len(y)), labelled)
    return images, y, labelled, rest


def test_the_most_confident_pseudo_labels_are_the_most_accurate(digits):
    images, y, labelled, rest = digits
    pseudo = pseudo_label(images[labelled], y[labelled], images[rest], 10)
    index, labels = pseudo.most_confident(0.5)
    assert len(index) == round(0.5 * len(rest))
    confident_accuracy = (labels == y[rest][index]).mean()
    _, every = pseudo.most_confident(1.0)
    assert confident_accuracy > 0.97
    assert confident_accuracy > (every == y[rest]).mean()
    assert len(pseudo.most_confident(0.0)[0]) == 0


def test_a_better_feature_space_is_chosen_by_held_out_labelled_images(digits):
    images, y, labelled, rest = digits
    truth = np.concatenate([y[labelled], y[rest]])
    cheat = lambda x: np.eye(10)[truth[: len(x)]] + 0.01 * np.random.default_rng(0).normal(size=(len(x), 10))
    noise = lambda x: np.random.default_rng(1).normal(size=(len(x), 10))
    assert pseudo_label(images[labelled], y[labelled], images[rest], 10, embedders={"oracle": cheat}).features == "oracle"
    assert pseudo_label(images[labelled], y[labelled], images[rest], 10, embedders={"noise": noise}).features in PIXEL_SPACES


def test_each_pixel_space_is_measured_and_the_best_spreads(digits):
    """Standardised pixels, pixels by angle, centred pixels by angle: each labels held-out
    labelled images, and the labels are spread in the best; a split spreads in the space
    chosen on every labelled image, without measuring again."""
    images, y, labelled, rest = digits
    pseudo = pseudo_label(images[labelled], y[labelled], images[rest], 10)
    assert set(pseudo.scores) == set(PIXEL_SPACES)
    assert pseudo.features == max(pseudo.scores, key=pseudo.scores.get) and pseudo.score == pseudo.scores[pseudo.features]
    assert len(set(pseudo.scores.values())) > 1  # the spaces differ on digits
    alone = pseudo_label(images[labelled], y[labelled], images[rest], 10, space="pixels")
    assert alone.features == "pixels" and alone.scores == {} and alone.score is None

    pool = ImageTensors(images[labelled], torch.as_tensor(y[labelled]))
    cache = {}
    train = np.arange(0, len(labelled), 2)
    split = pseudo_labels(cache, pool, images[rest], 10, {}, 0, 0, train)
    assert cache[-1].features == pseudo.features and split.features == pseudo.features and split.scores == {}
    expected = pseudo_label(images[labelled][train], y[labelled][train], images[rest], 10, space=pseudo.features)
    np.testing.assert_array_equal(split.labels, expected.labels)


def test_pixel_baseline_scores_every_validation_image_once(digits):
    images, y, labelled, _ = digits
    from sklearn.model_selection import StratifiedKFold

    folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(np.zeros(len(labelled)), y[labelled]))
    result = pixel_baseline(images[labelled], y[labelled], folds, 10, accuracy)
    assert result.probabilities.shape == (len(labelled), 10)
    assert 0.6 < result.value <= 1.0  # far above chance (0.1) on 100 digits


def test_greedy_selection_adds_a_member_only_when_it_helps():
    labels = np.array([0, 0, 1, 1, 0, 1])
    a = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.6, 0.4], [0.6, 0.4]])  # 4/6
    b = np.array([[0.6, 0.4], [0.4, 0.6], [0.1, 0.9], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])  # 5/6
    c = np.full((6, 2), 0.5)
    choice = greedy_selection({0: a, 1: b, 2: c}, labels, accuracy, max_members=3)
    assert choice.single == 1 and choice.single_value == pytest.approx(5 / 6)
    assert choice.value >= choice.single_value
    assert 2 not in choice.weights  # a useless member is never kept
    assert sum(choice.weights.values()) == pytest.approx(1.0)
    assert greedy_selection({0: a, 1: b}, labels, accuracy, max_members=1).weights == {1: 1.0}


def test_a_simple_model_joins_an_ensemble_of_trials_when_it_helps_and_loses_ties_to_a_trial():
    """Selection holds the simple models (named by a string) beside the trials (by number):
    a logistic regression right where the network is wrong makes the ensemble, and on an
    equal score the network is the single model, being what the user asked to train."""
    labels = np.array([0, 0, 1, 1])
    trial = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.6, 0.4]])  # 3/4: wrong on the last, unsure
    pixels = np.array([[0.4, 0.6], [0.6, 0.4], [0.4, 0.6], [0.1, 0.9]])  # 3/4: wrong on the first, unsure
    choice = greedy_selection({4: trial, "pixels": pixels}, labels, accuracy, max_members=3)
    assert choice.single == 4 and choice.single_value == pytest.approx(0.75)
    assert choice.weights == {4: 0.5, "pixels": 0.5} and choice.value == pytest.approx(1.0)
    assert greedy_selection({"pixels": trial, 7: trial, 9: trial}, labels, accuracy, max_members=3).single == 7


@pytest.mark.parametrize("better, worse, sure", [(1, 0, False), (2, 2, False), (6, 0, True), (12, 4, True)])
def test_an_ensemble_is_sure_to_be_better_only_when_the_images_say_so_beyond_one_standard_error(better, worse, sure):
    """80 images; the ensemble is right on ``better`` images where its best single member is
    wrong, and wrong on ``worse`` where it is right. One image more right is a gain of 1.25
    points on these images, and on 63% of their bootstrap resamples (those holding it)."""
    labels = np.zeros(80, dtype=np.int64)
    right, wrong = np.array([0.9, 0.1]), np.array([0.1, 0.9])
    single = np.tile(right, (80, 1))
    ensemble = single.copy()
    single[:better] = wrong
    ensemble[better : better + worse] = wrong
    choice = EnsembleChoice({"a": 0.5, "b": 0.5}, accuracy(labels, ensemble), "single", accuracy(labels, single))
    rate = win_rate({"a": ensemble, "b": ensemble, "single": single}, labels, choice, accuracy)
    assert (rate >= 0.84) is sure, rate
    if (better, worse) == (1, 0):
        assert rate == pytest.approx(1 - (1 - 1 / 80) ** 80, abs=0.08)  # the resamples that hold the one image


def test_averaged_members_output_log_mean_probabilities():
    torch.manual_seed(0)
    members = [torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)]
    net = AveragedMembers(members, [3, 1])
    x = torch.randn(5, 4)
    expected = 0.75 * members[0](x).softmax(1) + 0.25 * members[1](x).softmax(1)
    assert torch.allclose(net(x).softmax(1), expected, atol=1e-6)
