"""Built-in pretraining methods: SimCLR-style contrastive learning and (masked) autoencoders.

Both train through ``Backbone.embed`` (the pooled features before the classifier), so
they work unchanged for CNNs and vision transformers. Augmentation runs per sample on
the training device with kornia.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from autoft import hookimpl
from autoft.data import Normalize
from autoft.specs import Backbone, PretrainerSpec


def contrastive_augmentation(image_size: int) -> torch.nn.Module:
    """SimCLR's view pipeline (Chen et al., 2020), with a blur kernel sized for small images."""
    import kornia.augmentation as K

    kernel = max(3, (image_size // 10) | 1)  # odd, about a tenth of the image as in SimCLR
    return torch.nn.Sequential(
        K.RandomResizedCrop((image_size, image_size), scale=(0.2, 1.0)),
        K.RandomHorizontalFlip(),
        K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((kernel, kernel), (0.1, 2.0), p=0.5),
    )


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The normalised-temperature cross-entropy: each view must pick its twin among ``2N - 1`` others."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = len(z1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))  # a view is not its own positive
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, targets)


class SimCLR:
    """Two augmented views per image; a projection head; NT-Xent on the projections."""

    def __init__(self, temperature: float = 0.2, projection_dim: int = 128):
        self.temperature = temperature
        self.projection_dim = projection_dim

    def setup(self, backbone: Backbone, image_size: int) -> torch.nn.Module:
        width = backbone.num_features
        self.modules = torch.nn.ModuleDict(
            {
                "augment": contrastive_augmentation(image_size),
                "normalize": Normalize(backbone.mean, backbone.std),
                "projector": torch.nn.Sequential(
                    torch.nn.Linear(width, width),
                    torch.nn.BatchNorm1d(width),
                    torch.nn.ReLU(inplace=True),
                    torch.nn.Linear(width, self.projection_dim),
                ),
            }
        )
        return self.modules

    def loss(self, backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
        m = self.modules
        views = torch.cat([m["augment"](images), m["augment"](images)])
        z = m["projector"](backbone.embed(m["normalize"](views)))
        z1, z2 = z.chunk(2)
        return nt_xent(z1, z2, self.temperature)


class ConvDecoder(torch.nn.Module):
    """A light decoder from pooled features to an image: a 4x4 grid, upsampled by two until
    it covers the image, then resized to it exactly (sizes need not be powers of two)."""

    def __init__(self, num_features: int, image_size: int, width: int = 64):
        super().__init__()
        self.image_size = image_size
        steps = max(0, math.ceil(math.log2(image_size / 4)))
        self.width = width
        self.project = torch.nn.Linear(num_features, width * 16)
        layers: list[torch.nn.Module] = []
        channels = width
        for _ in range(steps):
            out = max(16, channels // 2)
            layers += [
                torch.nn.Upsample(scale_factor=2, mode="nearest"),
                torch.nn.Conv2d(channels, out, 3, padding=1),
                torch.nn.BatchNorm2d(out),
                torch.nn.GELU(),
            ]
            channels = out
        layers.append(torch.nn.Conv2d(channels, 3, 3, padding=1))
        self.body = torch.nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        grid = self.project(features).view(-1, self.width, 4, 4)
        out = self.body(grid)
        if out.shape[-1] != self.image_size:
            out = F.interpolate(out, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return out


def random_patch_mask(images: torch.Tensor, ratio: float, grid: int = 8) -> torch.Tensor:
    """A ``(N, 1, S, S)`` mask, 1 where a patch of a ``grid x grid`` layout is hidden."""
    n, _, h, w = images.shape
    cells = torch.rand(n, 1, grid, grid, device=images.device) < ratio
    return F.interpolate(cells.float(), size=(h, w), mode="nearest")


class Autoencoder:
    """Reconstruct each image from the backbone's pooled features through a light decoder.

    With ``mask_ratio > 0``, random patches are hidden from the encoder (MAE-style) and the
    whole image must still be reconstructed; the loss is the mean squared error in
    normalised pixel space, with hidden patches weighted as much as all visible ones.
    """

    def __init__(self, mask_ratio: float = 0.0):
        self.mask_ratio = mask_ratio

    def setup(self, backbone: Backbone, image_size: int) -> torch.nn.Module:
        import kornia.augmentation as K

        self.modules = torch.nn.ModuleDict(
            {
                "augment": torch.nn.Sequential(
                    K.RandomResizedCrop((image_size, image_size), scale=(0.6, 1.0)), K.RandomHorizontalFlip()
                ),
                "normalize": Normalize(backbone.mean, backbone.std),
                "decoder": ConvDecoder(backbone.num_features, image_size),
            }
        )
        return self.modules

    def loss(self, backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
        m = self.modules
        target = m["normalize"](m["augment"](images))
        if self.mask_ratio <= 0:
            return F.mse_loss(m["decoder"](backbone.embed(target)).float(), target)
        mask = random_patch_mask(target, self.mask_ratio)
        reconstruction = m["decoder"](backbone.embed(target * (1 - mask))).float()
        error = (reconstruction - target) ** 2
        hidden = (error * mask).sum() / (mask.sum() * 3).clamp(min=1)
        visible = (error * (1 - mask)).sum() / ((1 - mask).sum() * 3).clamp(min=1)
        return hidden + visible


@hookimpl
def autoft_register_pretrainers(register):
    register(PretrainerSpec("simclr", "SimCLR: contrastive NT-Xent loss between two augmented views of each image", SimCLR))
    register(PretrainerSpec("autoencoder", "Reconstruct whole images from pooled features through a light conv decoder", Autoencoder))
    register(
        PretrainerSpec(
            "masked-autoencoder",
            "Reconstruct images with 60% of their patches hidden from the backbone (MAE-style, any backbone)",
            lambda: Autoencoder(mask_ratio=0.6),
        )
    )
