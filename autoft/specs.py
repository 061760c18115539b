"""The plain-data contracts between autoft and its plugins.

A plugin registers *specs*: dataclasses with a name, a description and a factory.
Describing a plugin never builds a model or reads data; only calling the factory does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, NamedTuple, Protocol, Sequence, Union

if TYPE_CHECKING:
    import numpy as np
    import optuna
    import torch
    from PIL import Image

# ---------------------------------------------------------------------------
# Backbones


class ParamGroup(NamedTuple):
    """A named, ordered slice of a model's parameters (``stem``, ``stage1`` ... ``head``)."""

    name: str
    params: tuple[str, ...]


@dataclass
class Backbone:
    """A classifier built by a backbone source, with what autoft needs to fine-tune it.

    ``groups`` run from input to output and cover every parameter exactly once; the
    last group is the classifier head. Freeze depth ``k`` means the first ``k`` groups
    are frozen. ``embed`` maps normalised images to pooled features (the input of the
    head); pretraining methods train through it.
    """

    model: "torch.nn.Module"
    groups: list[ParamGroup]
    num_features: int
    embed: Callable[["torch.Tensor"], "torch.Tensor"]
    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @property
    def head(self) -> ParamGroup:
        return self.groups[-1]


@dataclass(frozen=True)
class BackboneSpec:
    """A source of backbones, such as timm or torchvision.

    ``factory(model_name, num_classes=, dropout=, weights=)`` builds a :class:`Backbone`.
    ``weights`` is ``None`` (random initialisation) or a pretrained tag the source can
    fetch; weight *files* are loaded by autoft itself after the factory returns.
    ``list_models()`` names the models it offers (used for suggestions), and
    ``has_model(name)`` says whether it can build one.
    """

    name: str
    description: str
    factory: Callable[..., Backbone]
    list_models: Callable[[], Iterable[str]]
    has_model: Callable[[str], bool]


# ---------------------------------------------------------------------------
# Datasets

ImageSource = Union[str, Path, "Image.Image", "np.ndarray"]


@dataclass
class LabelledImages:
    """What a dataset plugin returns: images with integer labels and class names.

    ``samples`` are file paths, PIL images or ``HxW``/``HxWxC`` uint8 arrays. ``splits``
    gives ``"train"``, ``"val"`` or ``"test"`` per sample for pre-split sources, or is
    ``None`` and autoft splits train/validation itself (stratified, seeded).
    ``image_size`` is a preferred training size for sources of small images, and
    ``hflip`` says whether horizontal flips keep labels true.
    """

    samples: Sequence[ImageSource]
    labels: Sequence[int]
    classes: list[str]
    splits: Sequence[str] | None = None
    image_size: int | None = None
    hflip: bool = True


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset format. ``factory(source)`` loads what the user typed as :class:`LabelledImages`.

    Users select a format explicitly as ``NAME:SOURCE`` (``csv:labels.csv``,
    ``sample:digits``); otherwise the first spec whose ``detect(source)`` is true loads it.
    """

    name: str
    description: str
    factory: Callable[[str], LabelledImages]
    detect: Callable[[str], bool] | None = None


# ---------------------------------------------------------------------------
# Strategies


@dataclass
class TrainPlan:
    """How a strategy trains a model: optimizer groups and an optional extra loss.

    Each optimizer group is a dict with ``params`` and optionally ``lr_scale`` (multiplies
    the trial's learning rate). Parameters in no group must have ``requires_grad`` off;
    BatchNorm layers whose parameters are all frozen keep their running statistics.
    """

    param_groups: list[dict[str, Any]]
    extra_loss: Callable[[], "torch.Tensor"] | None = None


class Strategy(Protocol):
    def default_params(self, n_groups: int) -> dict[str, Any]:
        """A known-good value for each parameter ``suggest`` declares."""

    def suggest(self, trial: "optuna.Trial", n_groups: int) -> dict[str, Any]:
        """Declare this strategy's hyperparameters on ``trial`` (an Optuna trial or ``FixedTrial``)."""

    def apply(self, backbone: Backbone, params: dict[str, Any]) -> TrainPlan:
        """Set ``requires_grad`` on ``backbone.model`` and say how to optimise it."""


@dataclass(frozen=True)
class StrategySpec:
    name: str
    description: str
    factory: Callable[[], Strategy]


# ---------------------------------------------------------------------------
# Pretraining methods


class Pretrainer(Protocol):
    """A self-supervised pretraining method. The host owns everything else: the images,
    batching, the optimiser (AdamW over the backbone's and the method's parameters), the
    learning-rate schedule, mixed precision, checkpoints and evaluation.
    """

    def setup(self, backbone: Backbone, image_size: int) -> "torch.nn.Module | None":
        """Build the method's own modules (projection head, decoder, augmentation) for
        square images of ``image_size``. Called once, before training. The host moves the
        returned module to the training device, puts it in train mode and trains its
        parameters with the backbone's; it is never saved in checkpoints.
        """

    def loss(self, backbone: Backbone, images: "torch.Tensor") -> "torch.Tensor":
        """A scalar loss for one batch.

        ``images`` are un-augmented float pixels in [0, 1], ``(N, 3, S, S)`` with ``N >= 2``,
        on the training device. Augment them (per sample, as tensors), normalise with
        ``backbone.mean`` and ``backbone.std``, and train through ``backbone.embed`` (pooled
        features), so that one method serves every backbone.
        """


@dataclass(frozen=True)
class PretrainerSpec:
    """A pretraining method, registered through ``autoft_register_pretrainers``.

    ``factory()`` builds a fresh :class:`Pretrainer` for one pretraining run.
    """

    name: str
    description: str
    factory: Callable[[], Pretrainer]
