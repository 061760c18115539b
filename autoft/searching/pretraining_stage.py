"""The pretraining stage of a search: self-supervised training on the unlabelled images, once.

It runs on the unlabelled images plus the labelled pool (labels never enter the loss),
for the epochs the plan gave it, cached across reruns (see :mod:`autoft.training.pretraining`).
Its checkpoints, the longest-trained first, then the search's starting weights, become
the choices of the searched ``init`` parameter, so the search decides whether and how
much pretraining helps. On top of pretrained weights a checkpoint is offered only when its
k-NN accuracy beats the starting weights' (:func:`helpful`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from autoft.core.budget import Budget
from autoft.data import DataSplits, ImageTensors
from autoft.core.events import PretrainEnd, PretrainStart
from autoft.core.io import write_json
from autoft.searching.planning import Plan
from autoft.searching.config import SearchConfig
from autoft.training.pretrain_pool import PretrainCheckpoint


@dataclass(frozen=True)
class StageResult:
    init: tuple[str, ...]  # the searched ``init`` choices: checkpoints, longest-trained first, then the starting weights
    features: str | None  # the longest-trained checkpoint kept, whose features label the unlabelled images; None: none kept
    note: str | None = None  # for the summary: checkpoints left out, and why


def pretraining_stage(
    config: SearchConfig, plan: Plan, pool: ImageTensors, unlabelled: torch.Tensor, labelled: DataSplits, *, weights: str | None,
    device: torch.device, budget: Budget, out: Path, skipped: list[tuple[str, str]], emit: Callable[[Any], None],
) -> StageResult | None:  # fmt: skip
    """Pretrain for the plan's epochs within ``budget``; None when the plan bought no stage."""
    if not plan.pretrain_epochs:
        return None
    from autoft.training.pretraining import PretrainConfig, run_pretraining

    images = ImageTensors.concat([ImageTensors(unlabelled), pool])  # the labelled pool stays on disk if it is
    emit(PretrainStart(method=config.pretrain, images=len(images)))
    stage = PretrainConfig(
        method=config.pretrain, epochs=plan.pretrain_epochs, batch_size=min(128, max(2, len(images) // 4)), weights=weights,
        budget=budget.stage(plan.pretrain_seconds * 1.1) if budget.bounded else None, device=str(device), seed=config.seed,
    )  # fmt: skip
    result = run_pretraining(config.backbone, images, None, stage, labelled=labelled)
    if not result.checkpoints:
        return None
    emit(PretrainEnd(cached=result.cached, out=str(result.out), checkpoints=[(c.epoch, c.knn_accuracy) for c in result.checkpoints]))
    reasons = {"skipped_images": len(skipped), "skipped": [{"source": s, "reason": r} for s, r in skipped[:100]]}
    write_json(out / "pretrain.json", {**result.metrics, **reasons, "cache": str(result.out), "cached": result.cached})
    kept, note = helpful(result.checkpoints, result.metrics.get("knn_accuracy_at_start"), pretrained=weights is not None)
    return StageResult(init=(*(str(c.path) for c in reversed(kept)), weights or "scratch"), features=str(kept[-1].path) if kept else None, note=note)


def helpful(checkpoints: Sequence[PretrainCheckpoint], at_start: float | None, *, pretrained: bool) -> tuple[list[PretrainCheckpoint], str | None]:
    """The checkpoints the search may start from, and a note on those left out. On top of
    pretrained weights, a checkpoint whose features label held-out labelled images (k-NN
    accuracy) no better than the starting weights' is left out: self-supervised training on a
    few hundred images can unlearn what ImageNet taught, and trials from it would be spent on
    finding that out. From random weights every checkpoint stays: the trials measure them."""
    if not pretrained or at_start is None:
        return list(checkpoints), None
    kept = [c for c in checkpoints if c.knn_accuracy is not None and c.knn_accuracy > at_start]
    if len(kept) == len(checkpoints):
        return kept, None
    dropped = ", ".join(f"epoch {c.epoch} ({c.knn_accuracy:.3f})" if c.knn_accuracy is not None else f"epoch {c.epoch} (unmeasured)" for c in checkpoints if c not in kept)
    return kept, f"pretraining checkpoints left out, their k-NN accuracy no better than the starting weights' {at_start:.3f}: {dropped}"
