"""What a :class:`~autoft.training.trainer.Trainer` run is configured with and gives back, how it
ends early, and the two things it draws each step: a batch of indices and an augmentation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from autoft.data import train_augmentation
from autoft.errors import AutoftError
from autoft.model.recipe import Recipe


# A train loss this many times chance level (ln of the class count, at least 1) is a diverged run;
# so is one that rose past SPIKE_FACTOR times it and ends with validation accuracy at chance.
DIVERGENCE_FACTOR = 5.0
SPIKE_FACTOR = 2.0
STATE_INTERVAL = 30.0  # seconds between writes of the resumable state


class OutOfTime(Exception):
    """The deadline passed before the first epoch finished: there is nothing to keep."""


class Interrupted(KeyboardInterrupt):
    """A stop was requested before the first epoch finished."""


class Diverged(AutoftError, FloatingPointError):
    """The loss became non-finite or exploded: the recipe (usually its learning rate) failed.
    A search fails the trial (a verdict on its parameters); ``autoft train`` says it in one line."""


@dataclass
class TrainerConfig:
    """How long and where a run trains. ``steps`` (total optimizer steps, repeating the data
    as needed) overrides ``epochs``; ``eval_every`` steps make one evaluation period
    (default: one pass over the data). ``deadline`` is a ``time.monotonic()`` value.
    ``state_file`` makes the run resumable: its state is written there at most every
    ``state_interval`` seconds (0: after every epoch), and a run that finds one resumes."""

    epochs: int = 10
    steps: int | None = None
    eval_every: int | None = None
    batch_size: int = 64
    device: torch.device | str = "auto"
    seed: int = 0
    metric: str = "accuracy"
    deadline: float | None = None
    state_file: Path | None = None
    state_interval: float = STATE_INTERVAL
    should_stop: Callable[[], bool] | None = None  # polled before every batch
    keep: str = "best"  # the weights kept: "best" evaluated, or "last" (a validation set too small to choose among evaluations without flattering the one chosen)


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int
    val: dict[str, Any]  # loss, metrics, predictions and probabilities of the kept weights
    stopped: str | None = None  # "deadline" or "interrupted" when the run ended early


class BatchStream:
    """Batches of shuffled indices, pass after pass; a last batch of one is skipped
    (BatchNorm cannot train on it)."""

    def __init__(self, size: int, batch_size: int, generator: torch.Generator):
        self.size, self.batch_size, self.generator = size, batch_size, generator
        self.order: torch.Tensor | None = None
        self.position = 0

    @property
    def steps_per_pass(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        return full + (1 if rest > 1 or self.size == 1 else 0)

    def next(self) -> torch.Tensor:
        while True:
            if self.order is None or self.position >= self.size:
                self.order, self.position = torch.randperm(self.size, generator=self.generator), 0
            index = self.order[self.position : self.position + self.batch_size]
            self.position += self.batch_size
            if len(index) >= 2 or self.size == 1:
                return index

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order, self.position = state["order"], state["position"]


def build_augmentation(recipe: Recipe, image_size: int, hflip: bool) -> torch.nn.Module:
    """The recipe's policy: crop (or shift) and flip, then kornia's RandAugment or TrivialAugment; or nothing."""
    if recipe.augment == "none":
        return torch.nn.Identity()
    if recipe.augment == "shift":
        return train_augmentation(image_size, hflip, shift=True)
    crop_flip = train_augmentation(image_size, hflip)
    if recipe.augment == "crop-flip":
        return crop_flip
    from kornia.augmentation.auto import RandAugment, TrivialAugment

    policy = RandAugment(n=2, m=recipe.augment_magnitude) if recipe.augment == "randaugment" else TrivialAugment()
    return torch.nn.Sequential(crop_flip, policy)
