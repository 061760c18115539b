"""Built-in regularisers, combined with any strategy: mixup, cutmix, BSS and FixMatch.

Each is a training-loop callback written against the public lifecycle
(:class:`autoft.specs.TrainCallback`); it reads its searched parameters from ``ctx.params``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from autoft import hookimpl
from autoft.data import Normalize, to_float, train_augmentation
from autoft.core.runtime import autocast
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


def pseudo_label_loss(strong_logits: torch.Tensor, weak_probabilities: torch.Tensor, threshold: float) -> torch.Tensor:
    """Cross-entropy of strongly augmented views against the weak views' confident predictions;
    images whose top probability is below ``threshold`` contribute nothing."""
    confidence, pseudo_labels = weak_probabilities.max(dim=1)
    confident = (confidence >= threshold).float()
    return (F.cross_entropy(strong_logits, pseudo_labels, reduction="none") * confident).mean()


class FixMatch:
    """FixMatch (Sohn et al., 2020) on the run's unlabelled images (``ctx.unlabelled``): the
    model's confident predictions on weakly augmented views (crop and flip) become labels for
    strongly augmented views (kornia's RandAugment). Without unlabelled images it does nothing."""

    UNLABELLED_PER_LABELLED = 1

    def __init__(self):
        self.views = None

    def default_params(self):
        return {"fixmatch_threshold": 0.95, "fixmatch_weight": 1.0}

    def suggest(self, trial):
        return {
            "fixmatch_threshold": trial.suggest_float("fixmatch_threshold", 0.7, 0.98),
            "fixmatch_weight": trial.suggest_float("fixmatch_weight", 0.1, 3.0, log=True),
        }

    def _build_views(self, ctx) -> None:
        from kornia.augmentation.auto import RandAugment

        size = ctx.unlabelled.shape[-1]
        normalize = Normalize(ctx.backbone.mean, ctx.backbone.std)
        weak = train_augmentation(size, ctx.hflip, scale=(0.8, 1.0))
        strong = torch.nn.Sequential(train_augmentation(size, ctx.hflip), RandAugment(n=2, m=10))
        self.views = (torch.nn.Sequential(weak, normalize).to(ctx.device), torch.nn.Sequential(strong, normalize).to(ctx.device))

    def loss_term(self, ctx, logits, targets, features):
        if ctx.unlabelled is None or len(ctx.unlabelled) == 0:
            return None
        if self.views is None:
            self._build_views(ctx)
        weak, strong = self.views
        index = torch.randint(len(ctx.unlabelled), (len(logits) * self.UNLABELLED_PER_LABELLED,))  # torch's generator: resumable
        images = to_float(ctx.unlabelled[index], ctx.device)
        with torch.no_grad(), autocast(ctx.device):
            weak_probabilities = ctx.model(weak(images)).float().softmax(dim=1)
        with autocast(ctx.device):
            strong_logits = ctx.model(strong(images)).float()
        return ctx.params["fixmatch_weight"] * pseudo_label_loss(strong_logits, weak_probabilities, ctx.params["fixmatch_threshold"])


@hookimpl
def autoft_register_regularizers(register):
    register(RegularizerSpec("mixup", "mixup: blend image pairs and their labels (alpha searched)", Mixup))
    register(RegularizerSpec("cutmix", "CutMix: paste a box of another image, labels mixed by area (alpha searched)", CutMix))
    register(RegularizerSpec("bss", "Batch spectral shrinkage of the pooled features (weight searched)", BatchSpectralShrinkage))
    register(RegularizerSpec("fixmatch", "FixMatch: confident pseudo-labels on unlabelled images (threshold and weight searched)", FixMatch))
