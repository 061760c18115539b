"""Built-in regularisers, combined with any strategy: mixup, cutmix and BSS.

Each is a training-loop callback written against the public lifecycle
(:class:`autoft.specs.TrainCallback`); it reads its searched parameters from ``ctx.params``.
"""

from __future__ import annotations

import torch

from autoft import hookimpl
from autoft.specs import RegularizerSpec


def _mixing_weight(alpha: float) -> float:
    # Drawn from torch's global generator, which the loop seeds and saves for resuming.
    return float(torch.distributions.Beta(alpha, alpha).sample())


class Mixup:
    """mixup (Zhang et al., 2018): train on convex blends of image pairs and of their targets."""

    def default_params(self):
        return {"mixup_alpha": 0.2}

    def suggest(self, trial):
        return {"mixup_alpha": trial.suggest_float("mixup_alpha", 0.05, 1.0, log=True)}

    def transform_batch(self, ctx, images, targets):
        weight = _mixing_weight(ctx.params["mixup_alpha"])
        partner = torch.randperm(len(images), device=images.device)
        return weight * images + (1 - weight) * images[partner], weight * targets + (1 - weight) * targets[partner]


class CutMix:
    """CutMix (Yun et al., 2019): paste a box of another image; targets mix by the box's area."""

    def default_params(self):
        return {"cutmix_alpha": 1.0}

    def suggest(self, trial):
        return {"cutmix_alpha": trial.suggest_float("cutmix_alpha", 0.1, 2.0, log=True)}

    def transform_batch(self, ctx, images, targets):
        weight = _mixing_weight(ctx.params["cutmix_alpha"])
        size = images.shape[-1]
        side = int(size * (1 - weight) ** 0.5)
        top, left = (int(v) for v in torch.randint(0, size - side + 1, (2,)))
        partner = torch.randperm(len(images), device=images.device)
        mixed = images.clone()
        mixed[..., top : top + side, left : left + side] = images[partner, :, top : top + side, left : left + side]
        kept = 1 - side * side / (size * size)  # the share of each image that is still its own
        return mixed, kept * targets + (1 - kept) * targets[partner]


class BatchSpectralShrinkage:
    """BSS (Chen et al., 2019): penalise the smallest singular values of the batch's pooled
    features, which carry what does not transfer from the pretraining task."""

    SMALLEST = 1  # k in the paper

    def default_params(self):
        return {"bss_weight": 1e-3}

    def suggest(self, trial):
        return {"bss_weight": trial.suggest_float("bss_weight", 1e-4, 1e-1, log=True)}

    def loss_term(self, ctx, logits, targets, features):
        singular = torch.linalg.svdvals(features.float())
        return ctx.params["bss_weight"] * singular[-self.SMALLEST :].pow(2).sum()


@hookimpl
def autoft_register_regularizers(register):
    register(RegularizerSpec("mixup", "mixup: blend image pairs and their labels (alpha searched)", Mixup))
    register(RegularizerSpec("cutmix", "CutMix: paste a box of another image, labels mixed by area (alpha searched)", CutMix))
    register(RegularizerSpec("bss", "Batch spectral shrinkage of the pooled features (weight searched)", BatchSpectralShrinkage))
