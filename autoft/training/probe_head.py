"""The LP of LP-FT, trained to convergence: a pretrained backbone's head set to the linear probe.

Kumar et al. (2022) fine-tune from a head that already fits the frozen features, so the
first gradient steps do not distort features a random head cannot yet use. A head trained
by SGD for a share of a short budget is far from that probe: from ImageNet weights on 80
photos of 8 classes, the searched LP-FT trials scored 0.84 on cross-validation while
logistic regression on the same features scored 0.94. So, with ``head_init="probe"``, the
head starts as that logistic regression, fitted on the training split's pooled features of
the starting weights (:func:`probe_head`), and fine-tuning starts from there.
"""

from __future__ import annotations

import numpy as np
import torch

from autoft.data import Images
from autoft.specs import Backbone
from autoft.training.pretrain_pool import embed_all

PROBE_IMAGES = 2000  # the most training images embedded: enough for a linear head, seconds on a CPU


def head_linear(backbone: Backbone) -> torch.nn.Linear | None:
    """The head when it is one ``Linear`` layer over the pooled features (timm's classifiers), else None."""
    modules = {name.rpartition(".")[0] for name in backbone.head.params}
    if len(modules) != 1:
        return None
    module = backbone.model.get_submodule(modules.pop())
    return module if isinstance(module, torch.nn.Linear) and module.in_features == backbone.num_features else None


@torch.no_grad()
def pooled_features(backbone: Backbone, images: Images, device: torch.device) -> np.ndarray:
    """What the head reads: pooled features of uint8 images, in eval mode, not normalised; the model's mode is kept."""
    training = backbone.model.training
    try:
        return embed_all(backbone, images, device, batch_size=128, l2=False).numpy()
    finally:
        backbone.model.train(training)


def probe_head(backbone: Backbone, images: Images, labels: np.ndarray, num_classes: int, device: torch.device, seed: int = 0) -> bool:
    """Set the head to logistic regression on ``images``' features (at most :data:`PROBE_IMAGES`
    of them, drawn per class in proportion); False, and nothing changed, when the head is not
    one linear layer or the images hold a single class."""
    from autoft.data import ImageTensors
    from autoft.model.candidate_modules import fold_linear
    from autoft.training.baselines import fit_logistic

    linear = head_linear(backbone)
    if linear is None or len(np.unique(labels)) < 2:
        return False
    chosen = np.arange(len(labels))
    if len(chosen) > PROBE_IMAGES:
        chosen = np.sort(np.random.default_rng(seed).choice(len(labels), PROBE_IMAGES, replace=False))
    subset = images.subset(chosen) if isinstance(images, ImageTensors) else images[torch.as_tensor(chosen)]
    # Centred and scaled by one number, the features' mean spread, not standardised one by one: a
    # feature nearly constant on these images would get its weight divided by its tiny spread, and
    # the first training batches (augmented images) move it far more: the loss of such a head
    # started at 100 times chance. One scale keeps C=1 meaning the same whatever the features' units.
    features = pooled_features(backbone, subset, device).astype(np.float64)
    offset, spread = features.mean(0), float(features.std(0).mean()) or 1.0
    model = fit_logistic((features - offset) / spread, labels[chosen], standardise=False)
    fold_linear(linear, model, num_classes, offset, np.full(features.shape[1], spread))
    return True
