"""Simple models as torch modules, so that they ship like a fine-tuned backbone.

A search compares trials with simple models (logistic regression on downscaled pixels, a
linear probe on a backbone's pooled features, a student of label spreading). When one of
them wins, it is shipped: its checkpoint, ONNX export, ``autoft predict`` and ``autoft serve``
are the backbones' own, because its fitted scikit-learn model is rebuilt here as a module
with the same contract (float NCHW pixels in [0, 1], normalised by the checkpoint's mean and
std, -> logits). Each module holds only tensors, so a checkpoint of one still loads with
``torch.load(weights_only=True)``.

A checkpoint names its kind in ``candidate`` (see :func:`build_candidate`); a checkpoint
without that key is an ordinary backbone's.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from autoft.errors import AutoftError
from autoft.specs import Backbone, ParamGroup

PIXELS = "pixels"  # logistic regression on downscaled pixels
PROBE = "probe"  # a linear head on a backbone's L2-normalised pooled features
NEIGHBOURS = "neighbours"  # k nearest neighbours among labelled and label-spread images, in a space of downscaled pixels
KINDS = (PIXELS, PROBE, NEIGHBOURS)
IDENTITY_MEAN = (0.0, 0.0, 0.0)  # pixel models read [0, 1] pixels as they come
IDENTITY_STD = (1.0, 1.0, 1.0)
ABSENT_CLASS_LOGIT = -1e4  # a class the fit never saw: probability 0, as scikit-learn gives it


def average_pool_matrix(size: int, side: int) -> torch.Tensor:
    """``(side, size)`` matrix ``P`` with ``P @ X @ P.T`` equal to
    ``adaptive_avg_pool2d(X, side)`` for a ``size`` x ``size`` image ``X``: each output row
    averages PyTorch's window ``[floor(i * size / side), ceil((i + 1) * size / side))``. A
    matrix product exports to ONNX at any ratio of sizes, where adaptive pooling does not."""
    if size <= side:
        return torch.eye(size)
    matrix = torch.zeros(side, size, dtype=torch.float64)
    for i in range(side):
        start, end = (i * size) // side, -((-(i + 1) * size) // side)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix.float()


class PixelLinear(torch.nn.Module):
    """Downscaled pixels -> one linear layer: logistic regression on pixels.

    The downscaling is :func:`autoft.training.semisupervised.downscaled_pixels`' (averaged to
    ``side`` when the images are larger), and every standardisation of the features is
    folded into ``linear``, so the module is the fitted model and nothing else.
    """

    def __init__(self, image_size: int, side: int, num_classes: int):
        super().__init__()
        self.image_size, self.side = int(image_size), min(int(side), int(image_size))
        # Derived from the sizes, so not saved: a checkpoint holds the fitted weights only.
        self.register_buffer("pool", average_pool_matrix(self.image_size, self.side), persistent=False)
        self.linear = torch.nn.Linear(3 * self.side * self.side, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.pool, x), self.pool.t()).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


class PixelNeighbours(torch.nn.Module):
    """Downscaled pixels -> the labels of their ``k`` nearest reference images, one vote each:
    scikit-learn's ``KNeighborsClassifier`` after the pixel space's offset, scale and
    normalisation and a PCA projection, as one graph of matrix products, a top-k and a gather.
    Its logits are the log of the vote shares (an absent class: :data:`ABSENT_CLASS_LOGIT`), so
    its softmax is scikit-learn's probabilities.

    Every step runs in float64, and votes are not weighted by distance: which reference is the
    10th nearest and which the 11th must not depend on rounding, and float32 rounds differently
    in PyTorch and onnxruntime. On 100 labelled gray scenes with 4,291 references, float32 put
    another neighbour in for one of 256 verification images of an ensemble's k-NN member, and
    the export failed its verification; inverse-distance weights did the same for an image that
    is itself a reference, at a distance of zero up to rounding."""

    def __init__(self, image_size: int, side: int, num_classes: int, *, references: int, components: int, neighbours: int, normalise: bool):
        super().__init__()
        self.image_size, self.side = int(image_size), min(int(side), int(image_size))
        self.neighbours, self.normalise = int(neighbours), bool(normalise)
        self.register_buffer("pool", average_pool_matrix(self.image_size, self.side).double(), persistent=False)
        width, double = 3 * self.side * self.side, torch.float64
        self.register_buffer("offset", torch.zeros(width, dtype=double))
        self.register_buffer("scale", torch.ones(width, dtype=double))
        self.register_buffer("centre", torch.zeros(width, dtype=double))  # the PCA's mean
        self.register_buffer("components", torch.zeros(components, width, dtype=double))
        self.register_buffer("references", torch.zeros(references, components, dtype=double))
        self.register_buffer("votes", torch.zeros(references, num_classes))  # one-hot labels of the references
        # Equal distances (duplicate images: 512 of 4,391 references on gray scenes) go to the
        # earlier reference, the same in every runtime: TopK breaks ties its own way.
        self.register_buffer("tie_break", torch.arange(references, dtype=double) * 1e-9, persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        pixels = torch.matmul(torch.matmul(self.pool, x.double()), self.pool.t()).flatten(1)
        pixels = (pixels - self.offset) / self.scale
        if self.normalise:
            pixels = pixels / (pixels.norm(dim=1, keepdim=True) + 1e-12)
        return torch.matmul(pixels - self.centre, self.components.t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x)
        squared = (z * z).sum(1, keepdim=True) - 2 * z @ self.references.t() + (self.references * self.references).sum(1)
        _, nearest = torch.topk(squared + self.tie_break, self.neighbours, dim=1, largest=False)
        shares = self.votes[nearest].mean(1)
        return torch.where(shares > 0, torch.log(shares.clamp_min(1e-30)), torch.full_like(shares, ABSENT_CLASS_LOGIT)).float()


class ProbeNet(torch.nn.Module):
    """A backbone's pooled features, L2-normalised as :func:`autoft.training.pretraining.embed_all`
    gives them to the probe, then the probe's linear head (its scaler folded in)."""

    def __init__(self, body: torch.nn.Module, embed: Callable[[torch.Tensor], torch.Tensor], num_features: int, num_classes: int):
        super().__init__()
        self.body = body
        self._embed = embed  # a function of ``body``: the backbone's own pooled features
        self.head = torch.nn.Linear(num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self._embed(x).float(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def pixel_backbone(image_size: int, side: int, num_classes: int) -> Backbone:
    model = PixelLinear(image_size, side, num_classes)
    return Backbone(
        model=model, groups=[ParamGroup("head", ("linear.weight", "linear.bias"))], num_features=model.linear.in_features,
        embed=model.features, input_size=int(image_size), mean=IDENTITY_MEAN, std=IDENTITY_STD,
    )  # fmt: skip


def neighbours_backbone(image_size: int, side: int, num_classes: int, **shape: Any) -> Backbone:
    """An empty :class:`PixelNeighbours`; ``shape`` is its ``references``, ``components``,
    ``neighbours`` and ``normalise``, as its checkpoint's ``candidate`` record keeps them."""
    model = PixelNeighbours(image_size, side, num_classes, **shape)
    return Backbone(model=model, groups=[], num_features=model.components.shape[0], embed=model.features, input_size=int(image_size), mean=IDENTITY_MEAN, std=IDENTITY_STD)


def probe_backbone(backbone: Backbone, num_classes: int) -> Backbone:
    """``backbone`` (already holding its weights) with the probe's head on its normalised features."""
    model = ProbeNet(backbone.model, backbone.embed, backbone.num_features, num_classes)
    body = tuple(f"body.{name}" for name, _ in backbone.model.named_parameters())
    return Backbone(
        model=model, groups=[ParamGroup("body", body), ParamGroup("head", ("head.weight", "head.bias"))], num_features=backbone.num_features,
        embed=model.features, input_size=backbone.input_size, mean=backbone.mean, std=backbone.std,
    )  # fmt: skip


def build_candidate(meta: dict[str, Any], registry=None) -> Backbone:
    """The empty module of a candidate checkpoint (``meta["candidate"]`` names its kind),
    ready for its state dict."""
    spec = meta["candidate"]
    kind = spec.get("kind") if isinstance(spec, dict) else None
    num_classes = len(meta["classes"])
    if kind == PIXELS:
        return pixel_backbone(int(meta["image_size"]), int(spec["side"]), num_classes)
    if kind == NEIGHBOURS:
        shape = {key: spec[key] for key in ("references", "components", "neighbours", "normalise")}
        return neighbours_backbone(int(meta["image_size"]), int(spec["side"]), num_classes, **shape)
    if kind == PROBE:
        from autoft.model.backbones import build_backbone

        return probe_backbone(build_backbone(meta["backbone"], num_classes=num_classes, registry=registry), num_classes)
    raise AutoftError(f"unknown kind of simple model {kind!r} in this checkpoint (known: {', '.join(KINDS)}); was it saved by a newer autoft?")


def fold_linear(
    linear: torch.nn.Linear, model, num_classes: int, offset: np.ndarray | None = None, scale: np.ndarray | None = None
) -> None:
    """Set ``linear`` to a fitted ``StandardScaler`` + ``LogisticRegression`` pipeline's logits.

    The pipeline reads ``(x - offset) / scale`` of the layer's input ``x`` (a
    standardisation done before it, as :func:`autoft.training.semisupervised.pixel_features` does);
    both standardisations are affine, so they fold into the layer's weights and bias,
    computed in float64. Two classes give one decision function ``z``: logits ``[0, z]``
    have the same softmax. Classes absent from the fit get probability 0.
    """
    scaler, regression = model[0], model[-1]
    coef = np.atleast_2d(regression.coef_).astype(np.float64)
    intercept = np.atleast_1d(regression.intercept_).astype(np.float64)
    if coef.shape[0] == 1:  # binary: scikit-learn's probabilities are [1 - sigmoid(z), sigmoid(z)]
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, intercept[0]])
    width = coef.shape[1]
    offset = np.zeros(width) if offset is None else np.asarray(offset, np.float64)
    scale = np.ones(width) if scale is None else np.asarray(scale, np.float64)
    total_scale = scale * np.asarray(scaler.scale_ if scaler.scale_ is not None else np.ones(width), np.float64)
    mean = np.zeros(width) if scaler.mean_ is None else np.asarray(scaler.mean_, np.float64)  # None: a pass-through scaler
    total_offset = offset + scale * mean  # x - total_offset = scale * (f - mean)
    weight = coef / total_scale
    bias = intercept - weight @ total_offset
    full_weight = np.zeros((num_classes, width))
    full_bias = np.full(num_classes, ABSENT_CLASS_LOGIT)
    full_weight[regression.classes_], full_bias[regression.classes_] = weight, bias
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(full_weight))
        linear.bias.copy_(torch.from_numpy(full_bias))
