"""torchvision's classification models as an autoft backbone source: ``torchvision:resnet50``.

A third-party plugin in its own distribution: it needs nothing from autoft but the
``autoft_register_backbones`` hook and the :class:`~autoft.specs.Backbone` contract.
"""

from __future__ import annotations

import re
from functools import cache

import torch

from autoft import AutoftError, hookimpl
from autoft.specs import Backbone, BackboneSpec, ParamGroup

SOURCE = "torchvision"

# Tags that mean "the weights torchvision recommends", as for timm.
DEFAULT_TAGS = ("pretrained", "imagenet", "default")

# Sequences of blocks that make one stage each: features.3, layers.7, encoder.layers.encoder_layer_5 ...
STAGE_CONTAINERS = ("features.", "layers.", "trunk_output.", "blocks.", "encoder.layers.")
RESNET_STAGE = re.compile(r"layer\d+")

# These build auxiliary classifiers unless told otherwise; autoft trains one head.
AUX_LOGITS = ("googlenet", "inception_v3")


@cache
def _model_names() -> tuple[str, ...]:
    import torchvision.models

    # module= keeps detection, segmentation and video models out: they are not classifiers.
    return tuple(torchvision.models.list_models(module=torchvision.models))


def list_models() -> list[str]:
    return list(_model_names())


def has_model(name: str) -> bool:
    return name in _model_names()


def resolve_weights(model_name: str, tag: str | None):
    """A weights enum member for ``tag`` (``IMAGENET1K_V2``, ``DEFAULT``, ``pretrained``), or None."""
    if tag is None:
        return None
    import torchvision.models

    enum = torchvision.models.get_model_weights(model_name)
    key = "DEFAULT" if tag.lower() in DEFAULT_TAGS else tag.upper()
    if key not in enum.__members__:
        raise AutoftError(
            f"torchvision has no weights {tag!r} for {model_name}; available: {', '.join(enum.__members__)} "
            "(or pass --weights PATH to a state dict)"
        )
    return enum[key]


def create(model_name: str, *, num_classes: int, dropout: float = 0.0, weights: str | None = None) -> Backbone:
    import torchvision.models

    weights_enum = resolve_weights(model_name, weights)
    kwargs = {"aux_logits": False, "init_weights": False} if model_name in AUX_LOGITS else {}
    try:
        # Built at ImageNet's 1000 classes whatever the weights, then the classifier is
        # replaced: the layout, and so a checkpoint, is the same with and without weights.
        model = torchvision.models.get_model(model_name, weights=weights_enum, **kwargs)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad download a RuntimeError
        if weights_enum is None:
            raise
        raise AutoftError(
            f"could not fetch torchvision weights {weights_enum} for {model_name} ({type(exc).__name__}; offline?); "
            "download them elsewhere and pass --weights PATH (a state dict or .safetensors file)"
        ) from None
    head_path, num_features = replace_classifier(model, num_classes, dropout)
    head_module = model.get_submodule(head_path)
    preferred = weights_enum or torchvision.models.get_model_weights(model_name).DEFAULT
    return Backbone(
        model=model,
        groups=param_groups(model, head_path),
        num_features=num_features,
        embed=lambda x: _head_input(model, head_module, x),
        input_size=int(preferred.transforms.keywords.get("crop_size", 224)),
        # torchvision's classification weights all use ImageNet statistics (Backbone's defaults).
    )


def replace_classifier(model: torch.nn.Module, num_classes: int, dropout: float) -> tuple[str, int]:
    """Swap the last classifier layer for one with ``num_classes`` outputs, behind dropout.

    Returns the path of the new head module and the width of the features it reads.
    """
    path, layer = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-1]
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    if isinstance(layer, torch.nn.Linear):
        width, new = layer.in_features, torch.nn.Linear(layer.in_features, num_classes)
    else:  # SqueezeNet classifies with a 1x1 convolution
        width, new = layer.in_channels, torch.nn.Conv2d(layer.in_channels, num_classes, kernel_size=1)
    siblings = list(parent.named_children())
    position = [n for n, _ in siblings].index(attr)
    before = siblings[position - 1][1] if position > 0 else None
    after = siblings[position + 1] if position + 1 < len(siblings) else None
    if isinstance(layer, torch.nn.Conv2d) and after is not None and isinstance(after[1], torch.nn.ReLU):
        # SqueezeNet clamps its logits at zero; a fresh head whose outputs all start
        # negative would get no gradient at all, so the new head's logits stay unclamped.
        setattr(parent, after[0], torch.nn.Identity())
    if isinstance(before, torch.nn.Dropout):
        before.p = dropout  # the architecture's own dropout becomes the tuned one
        setattr(parent, attr, new)
        return path, width
    setattr(parent, attr, torch.nn.Sequential(torch.nn.Dropout(dropout), new))
    return path, width


def _head_input(model: torch.nn.Module, head: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled features the head reads, captured on the way through the whole model."""
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    features = captured[0]
    if features.ndim == 4:  # a convolutional head reads a feature map
        features = features.mean(dim=(2, 3))
    return features.flatten(1)


def _stage_of(param_name: str) -> str | None:
    for container in STAGE_CONTAINERS:
        if param_name.startswith(container):
            return container + param_name[len(container) :].split(".", 1)[0]
    top = param_name.split(".", 1)[0]
    return top if RESNET_STAGE.fullmatch(top) else None


def param_groups(model: torch.nn.Module, head_path: str) -> list[ParamGroup]:
    """Groups from input to output: ``stem``, then one ``stageN`` per block, then ``head``.

    Everything before the first block (ResNet's conv1 and bn1, ViT's patch projection
    and tokens) is the stem; a model with no block sequence gets one group per top-level
    module; modules between the last block and the head (final norms, VGG's first
    classifier layers) each form one more group.
    """
    names = [n for n, _ in model.named_parameters()]
    head = tuple(n for n in names if n.startswith(head_path + "."))
    body = [n for n in names if n not in head]
    has_stages = any(_stage_of(n) for n in body)
    runs: list[tuple[str, list[str]]] = []
    for name in body:
        stage = _stage_of(name)
        if stage is None and has_stages and not any(s for s, _ in runs if s.startswith("block:")):
            key = "stem"
        elif stage is not None:
            key = f"block:{stage}"
        else:
            key = name.split(".", 1)[0]
        if not runs or runs[-1][0] != key:
            runs.append((key, []))
        runs[-1][1].append(name)
    groups = [ParamGroup("stem" if i == 0 else f"stage{i}", tuple(params)) for i, (_, params) in enumerate(runs)]
    return groups + [ParamGroup("head", head)]


@hookimpl
def autoft_register_backbones(register):
    register(
        BackboneSpec(
            name=SOURCE,
            description="torchvision classification models: torchvision:resnet50, torchvision:convnext_tiny, ...",
            factory=create,
            list_models=list_models,
            has_model=has_model,
        )
    )
