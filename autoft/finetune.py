"""Building blocks for fine-tuning strategies: freezing by group, and L2-SP."""

from __future__ import annotations

import torch

from autoft.specs import Backbone


def parameters(backbone: Backbone, group_names: tuple[str, ...] | None = None) -> list[torch.nn.Parameter]:
    """The parameters of the named groups (all groups when ``None``), in group order."""
    by_name = dict(backbone.model.named_parameters())
    return [by_name[p] for g in backbone.groups if group_names is None or g.name in group_names for p in g.params]


def freeze_first(backbone: Backbone, depth: int) -> list[torch.nn.Parameter]:
    """Freeze exactly the first ``depth`` groups; return the parameters left trainable, in order.

    BatchNorm layers whose parameters are all frozen keep their statistics too: the
    training loop holds them in eval mode (see :func:`autoft.model.backbones.freeze_batchnorm`).
    """
    n = len(backbone.groups)
    if not 0 <= depth <= n:
        raise ValueError(f"freeze depth must be within 0..{n}, got {depth}")
    by_name = dict(backbone.model.named_parameters())
    trainable = []
    for i, group in enumerate(backbone.groups):
        for name in group.params:
            by_name[name].requires_grad_(i >= depth)
            if i >= depth:
                trainable.append(by_name[name])
    return trainable


def l2sp_penalty(params: list[torch.nn.Parameter], alpha: float):
    """L2-SP (Li et al., 2018): ``alpha/2 * ||w - w0||^2`` towards the starting weights ``w0``."""
    start = [p.detach().clone() for p in params]

    def penalty() -> torch.Tensor:
        total = sum(((p - p0.to(p.device)) ** 2).sum() for p, p0 in zip(params, start))
        return 0.5 * alpha * total

    return penalty
