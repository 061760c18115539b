"""The one way autoft fits a recipe: :func:`fit` takes a :class:`FitRequest` and returns :class:`Fitted`.

``autoft train``, every trial and fold of a search, the refit on every labelled image and
each ensemble member go through it: it builds the backbone (the same seed, so the same
initial weights for the same recipe), runs the :class:`~autoft.training.trainer.Trainer` on the
data view it is given for the steps and within the budget it is given, and hands back the
trained backbone, whose :meth:`Fitted.save` writes the checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from autoft import plugins
from autoft.model.backbones import build_backbone
from autoft.core.budget import Budget
from autoft.model.checkpoints import save_checkpoint
from autoft.data import DataSplits
from autoft.core.events import Event
from autoft.model.recipe import Recipe
from autoft.core.runtime import as_device, seed_everything
from autoft.specs import Backbone
from autoft.training.probe_head import probe_head
from autoft.training.trainer import FitResult, Trainer, TrainerConfig


@dataclass
class FitRequest:
    """One fit: a backbone by name, built fresh with ``weights``, trained on ``data`` with
    ``recipe`` for what ``trainer`` says (steps or epochs, batch, device, metric, state file),
    within ``budget``. ``source`` names where the images came from, for the checkpoint."""

    backbone: str
    data: DataSplits
    recipe: Recipe | dict[str, Any]
    trainer: TrainerConfig
    registry: plugins.Registry
    weights: str | None = None
    budget: Budget | None = None
    source: str | None = None
    on_event: Callable[[Event], None] | None = None
    unlabelled: torch.Tensor | None = None
    callbacks: tuple[Any, ...] = field(default_factory=tuple)

    @property
    def params(self) -> dict[str, Any]:
        return self.recipe.params() if isinstance(self.recipe, Recipe) else dict(self.recipe)


@dataclass
class Fitted:
    """A trained backbone (holding the weights of its best evaluation) and how the fit went."""

    request: FitRequest
    backbone: Backbone
    result: FitResult
    seconds: float

    @property
    def steps(self) -> int:
        return int(self.result.history[-1]["step"])

    @property
    def resumed(self) -> bool:
        return any(r.get("resumed") for r in self.result.history)

    @property
    def best_step(self) -> int:
        return int(self.result.history[self.result.best_epoch - 1]["step"])

    @property
    def peaked_at_end(self) -> bool:
        """Still improving when the fit ended; never said of a fit that kept its last weights, which chose no peak."""
        return self.request.trainer.keep == "best" and self.result.best_epoch == len(self.result.history)

    def save(self, path: Path, params: dict[str, Any] | None = None) -> Path:
        """``model.pt``: the weights and what rebuilding and preprocessing them need."""
        request = self.request
        return save_checkpoint(
            path, backbone_name=request.backbone, backbone=self.backbone, classes=request.data.classes, image_size=request.data.image_size,
            params=request.params if params is None else params, data=request.source, seed=request.trainer.seed,
        )  # fmt: skip


def fit(request: FitRequest) -> Fitted:
    """Build the backbone and train it; raises :class:`~autoft.training.trainer.OutOfTime` when the
    budget ends before the first evaluation, and the Trainer's errors for a failed recipe."""
    config = request.trainer
    if request.budget is not None:
        config = replace(config, deadline=request.budget.deadline)
    seed_everything(config.seed)  # the same initial weights for every fit of a recipe: differences come from the recipe
    params = request.params
    backbone = build_backbone(request.backbone, num_classes=request.data.num_classes, dropout=float(params.get("dropout", 0.0)),
                              weights=request.weights, registry=request.registry)  # fmt: skip
    if params.get("head_init") == "probe":  # from pretrained weights: fine-tuning starts from the linear probe (LP-FT)
        probe_head(backbone, request.data.train, request.data.train.labels.numpy(), request.data.num_classes, as_device(config.device), config.seed)
    started = time.monotonic()
    trainer = Trainer(backbone, request.data, request.recipe, config, registry=request.registry, on_event=request.on_event,
                      callbacks=request.callbacks, unlabelled=request.unlabelled)  # fmt: skip
    result = trainer.fit()
    return Fitted(request=request, backbone=backbone, result=result, seconds=time.monotonic() - started)
