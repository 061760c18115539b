"""Ensembles of trials and simple models: greedy selection (Caruana et al., 2004) and one averaging network.

Selection runs on the predictions every trial made for images it did not train on (its
validation split, or its folds' out-of-fold predictions), and on the simple models' for the
same images (fitted on the same splits, as AutoGluon's stack holds its linear models beside
its networks): start from the best single
model, then repeatedly add, with replacement, the model whose addition most improves
the metric of the averaged probabilities. Members picked several times weigh more.
AutoGluon's ``WeightedEnsemble`` does the same.

The ensemble ships as one network whose output is the log of the members' weighted mean
probability, so ``softmax`` of it (what ``predict`` and ``serve`` compute from logits)
is exactly that mean, and it exports, verifies and serves like any single model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

Score = Callable[[np.ndarray, np.ndarray], float]  # (labels, probabilities) -> higher is better
Member = int | str  # a trial's number, or a simple model's name (autoft.training.candidates)

ROUNDS = 25
RESAMPLES = 200  # bootstrap resamples of the selection images (win_rate)


@dataclass
class EnsembleChoice:
    weights: dict[Member, float]  # member -> weight, summing to 1
    value: float  # the metric of the weighted mean on the selection images
    single: Member  # the best single model
    single_value: float

    @property
    def gain(self) -> float:
        return self.value - self.single_value


def _preferred(member: Member) -> tuple[int, int]:
    """Ties go to a trial over a simple model (the network is what the user asked for), then to the earlier trial."""
    return (1, -member) if isinstance(member, int) else (0, 0)


def greedy_selection(predictions: Mapping[Member, np.ndarray], labels: np.ndarray, score: Score, max_members: int, rounds: int = ROUNDS) -> EnsembleChoice:
    """Caruana's forward selection with replacement, at most ``max_members`` distinct members.

    The best prefix of the ``rounds`` additions is kept, so an addition that only adds
    noise is dropped again.
    """
    if not predictions:
        raise ValueError("no predictions to select an ensemble from")
    singles = {number: score(labels, p) for number, p in predictions.items()}
    best_single = max(singles, key=lambda n: (singles[n], *_preferred(n)))
    picked = [best_single]
    total = np.array(predictions[best_single], dtype=np.float64)
    history = [(singles[best_single], 1)]
    for _ in range(rounds - 1):
        allowed = [n for n in predictions if n in picked or len(set(picked)) < max_members]
        scored = {n: score(labels, (total + predictions[n]) / (len(picked) + 1)) for n in allowed}
        chosen = max(scored, key=lambda n: (scored[n], *_preferred(n)))
        picked.append(chosen)
        total += predictions[chosen]
        history.append((scored[chosen], len(picked)))
    value, length = max(history, key=lambda h: (h[0], -h[1]))  # the shortest best prefix
    counts: dict[Member, int] = {}
    for number in picked[:length]:
        counts[number] = counts.get(number, 0) + 1
    return EnsembleChoice({n: c / length for n, c in counts.items()}, float(value), best_single, float(singles[best_single]))


def win_rate(predictions: Mapping[Member, np.ndarray], labels: np.ndarray, choice: EnsembleChoice, score: Score, resamples: int = RESAMPLES, seed: int = 0) -> float:
    """The share of bootstrap resamples of the selection images on which ``choice``'s ensemble
    scores above its best single member (``score``: higher is better). Selection picked the
    ensemble on these very images; this says how sure they are that it is better. An ensemble
    right on one more image of 80 wins the resamples that hold that image, 63% of them."""
    ensemble = sum(weight * np.asarray(predictions[member], np.float64) for member, weight in choice.weights.items())
    return bootstrap_wins(ensemble, np.asarray(predictions[choice.single], np.float64), labels, score, resamples, seed)


def bootstrap_wins(first: np.ndarray, second: np.ndarray, labels: np.ndarray, score: Score, resamples: int = RESAMPLES, seed: int = 0) -> float:
    """The share of bootstrap resamples of the images on which probabilities ``first`` score
    above ``second`` (``score``: higher is better)."""
    import warnings

    rng = np.random.default_rng(seed)
    wins = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a resample may miss a class: the metric is still defined
        for _ in range(resamples):
            rows = rng.integers(0, len(labels), len(labels))
            wins += int(score(labels[rows], first[rows]) > score(labels[rows], second[rows]))
    return wins / resamples


class AveragedMembers(torch.nn.Module):
    """Images -> log of the members' weighted mean class probabilities (each member normalises them its own way)."""

    def __init__(self, members: Sequence[torch.nn.Module], weights: Sequence[float]):
        super().__init__()
        if len(members) != len(weights) or not members:
            raise ValueError("an ensemble needs one weight per member, and at least one member")
        self.members = torch.nn.ModuleList(members)
        self.register_buffer("weights", torch.tensor([float(w) for w in weights]) / float(sum(weights)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = sum(w * m(x).float().softmax(1) for w, m in zip(self.weights, self.members))
        return torch.log(mean.clamp_min(1e-12))
