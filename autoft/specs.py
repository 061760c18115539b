"""The plain-data contracts between autoft and its plugins.

A plugin registers *specs*: dataclasses with a name, a description and a factory.
Describing a plugin never builds a model or reads data; only calling the factory does.

Strategies and regularisers see the training loop through a lifecycle (API version
:data:`STRATEGY_API`): see :class:`TrainCallback` and :class:`autoft.lifecycle.TrainContext`.

**API versions.** Each kind of plugin has an API version (:data:`API_VERSIONS`), raised when
what autoft asks of that kind changes; :data:`PLUGIN_API_VERSION` is the highest of them. A
spec's ``api_version`` says which version its plugin was written for, and a distribution
pins the autoft that offers it (``Requires-Dist: autoft>=0.2`` for API 2).
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

    from autoft.lifecycle import TrainContext

# kind -> the version of its API that this autoft offers (strategies 2: the lifecycle, autoft 0.2)
API_VERSIONS: dict[str, int] = {"backbones": 1, "datasets": 1, "strategies": 2, "pretrainers": 1, "regularizers": 2, "metrics": 1, "weights": 1}
PLUGIN_API_VERSION = max(API_VERSIONS.values())
STRATEGY_API = API_VERSIONS["strategies"]  # the version of the strategy and regulariser API described here

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
class BackboneInfo:
    """What autoft needs to know about a model before building it, like timm's pretrained configs."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_groups: int


@dataclass(frozen=True)
class PretrainedWeights:
    """Whether a source's pretrained weights for a model are at hand (cached, or downloadable
    now), and where the source reads them from: ``--weights auto``'s line names it either way.
    ``download`` says that getting them means downloading them to ``location`` first."""

    available: bool
    location: str
    download: bool = False


@dataclass(frozen=True)
class BackboneSpec:
    """A source of backbones, such as timm or torchvision.

    ``factory(model_name, num_classes=, dropout=, weights=)`` builds a :class:`Backbone`.
    ``weights`` is ``None`` (random initialisation) or a pretrained tag the source can
    fetch; weight *files* are loaded by autoft itself after the factory returns.
    ``list_models()`` names the models it offers (used for suggestions), and
    ``has_model(name)`` says whether it can build one. ``describe(name)``, optional,
    returns a :class:`BackboneInfo` without building the model; without it autoft builds
    the model once to learn the same. ``pretrained(name)``, optional, returns
    :class:`PretrainedWeights`: what ``--weights auto`` asks before choosing pretrained
    weights over random ones.
    """

    name: str
    description: str
    factory: Callable[..., Backbone]
    list_models: Callable[[], Iterable[str]]
    has_model: Callable[[str], bool]
    describe: Callable[[str], BackboneInfo] | None = None
    pretrained: Callable[[str], PretrainedWeights] | None = None
    api_version: int = API_VERSIONS["backbones"]


@dataclass(frozen=True)
class WeightsSpec:
    """A source of pretrained weights for backbones that a backbone source builds: an
    installed package, a local model zoo, a company's artifact store.

    ``backbones`` names the backbones it has weights for, as ``--backbone`` takes them
    (``tf_efficientnet_lite0``, ``acme:tinynet``); ``tags`` names variants besides the
    default one. ``load(backbone, tag)`` returns a state dict in the built backbone's own
    key names and shapes (``tag`` is ``None`` for the default); autoft checks it tensor by
    tensor before loading; the classifier may be left out or have another width.
    ``where(backbone)``, optional, returns :class:`PretrainedWeights`: whether the weights
    are at hand now and where they come from, for the line ``--weights auto`` prints.
    ``trained_on`` names the data they were trained on (``ImageNet``), for that line too.
    """

    name: str
    description: str
    backbones: tuple[str, ...]
    load: Callable[[str, "str | None"], "dict[str, torch.Tensor]"]
    where: Callable[[str], PretrainedWeights] | None = None
    tags: tuple[str, ...] = ()
    trained_on: str = ""
    api_version: int = API_VERSIONS["weights"]


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
    api_version: int = API_VERSIONS["datasets"]


# ---------------------------------------------------------------------------
# Strategies and regularisers


@dataclass
class TrainPlan:
    """Which parameters a strategy trains first: optimizer groups.

    Each optimizer group is a dict with ``params`` and optionally ``lr_scale`` (multiplies
    the trial's learning rate) and ``weight_decay``. Parameters in no group must have
    ``requires_grad`` off; BatchNorm layers whose parameters are all frozen keep their
    running statistics. ``extra_loss`` is API version 1's loss term, kept for strategies
    written for it (deprecated: implement ``loss_term`` instead).
    """

    param_groups: list[dict[str, Any]]
    extra_loss: Callable[[], "torch.Tensor"] | None = None


class TrainCallback(Protocol):
    """The training loop's lifecycle, seen by strategies and regularisers. Every method is
    optional; ``ctx`` is the loop's :class:`~autoft.lifecycle.TrainContext`.

    An "epoch" is one evaluation period: a pass over the training images, or a fixed
    number of optimizer steps when a search plans training in steps.
    """

    def on_epoch_start(self, ctx: "TrainContext") -> None:
        """Before an epoch's first batch: ``ctx.epoch`` of ``ctx.epochs``, ``ctx.step`` of
        ``ctx.steps``. ``ctx.unfreeze(...)`` makes more parameters train from now on."""

    def transform_batch(self, ctx: "TrainContext", images: "torch.Tensor", targets: "torch.Tensor") -> "tuple[torch.Tensor, torch.Tensor]":
        """Augmented float images in [0, 1] ``(N, 3, S, S)`` and soft targets ``(N, C)`` in,
        the same shapes out (mixup, cutmix)."""

    def loss_term(self, ctx: "TrainContext", logits: "torch.Tensor", targets: "torch.Tensor", features: "torch.Tensor") -> "torch.Tensor | None":
        """A scalar added to the cross-entropy: ``logits`` ``(N, C)``, soft ``targets``
        ``(N, C)``, pooled ``features`` ``(N, num_features)`` (the head's input); the
        model is ``ctx.model``."""

    def on_epoch_end(self, ctx: "TrainContext") -> None:
        """After an epoch's evaluation; ``ctx.record`` holds its losses and metrics."""

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs (tensors, numbers, strings, lists and dicts of them); saved
        with the loop's state after each epoch."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, before training resumes."""


class Strategy(Protocol):
    def default_params(self, n_groups: int) -> dict[str, Any]:
        """A known-good value for each parameter ``suggest`` declares."""

    def suggest(self, trial: "optuna.Trial", n_groups: int) -> dict[str, Any]:
        """Declare this strategy's hyperparameters on ``trial`` (an Optuna trial or ``FixedTrial``)."""

    def apply(self, backbone: Backbone, params: dict[str, Any]) -> TrainPlan:
        """Set ``requires_grad`` on ``backbone.model`` and say how to optimise it first.
        A strategy may also implement any :class:`TrainCallback` method."""


@dataclass(frozen=True)
class StrategySpec:
    """A fine-tuning strategy. ``api_version`` is the strategy API the plugin was written
    for: :data:`STRATEGY_API` (2, the default) for the lifecycle; a plugin written for 1
    (``TrainPlan.extra_loss``) says ``api_version=1`` and runs through an adapter, with a
    deprecation warning."""

    name: str
    description: str
    factory: Callable[[], Strategy]
    api_version: int = API_VERSIONS["strategies"]


class Regularizer(Protocol):
    """A training-loop addition that combines with any strategy (mixup, BSS). Besides these
    two methods it implements the :class:`TrainCallback` methods it needs, and reads its
    parameters from ``ctx.params``."""

    def default_params(self) -> dict[str, Any]:
        """A known-good value for each parameter ``suggest`` declares."""

    def suggest(self, trial: "optuna.Trial") -> dict[str, Any]:
        """Declare this regulariser's hyperparameters on ``trial``."""


@dataclass(frozen=True)
class RegularizerSpec:
    """A regulariser, registered through ``autoft_register_regularizers``. ``factory()``
    builds a fresh :class:`Regularizer` for one training run."""

    name: str
    description: str
    factory: Callable[[], Regularizer]
    api_version: int = API_VERSIONS["regularizers"]


# ---------------------------------------------------------------------------
# Metrics


@dataclass(frozen=True)
class MetricSpec:
    """A validation metric, registered through ``autoft_register_metrics``.

    ``compute(labels, probabilities)`` gets int labels ``(N,)`` and class probabilities
    ``(N, C)`` as numpy arrays and returns a float. ``greater_is_better`` says whether
    the search maximises it.
    """

    name: str
    description: str
    compute: Callable[["np.ndarray", "np.ndarray"], float]
    greater_is_better: bool = True
    api_version: int = API_VERSIONS["metrics"]


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
    api_version: int = API_VERSIONS["pretrainers"]
