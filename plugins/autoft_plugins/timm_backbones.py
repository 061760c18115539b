"""Backbones from timm: any timm model name (``resnet50``, ``vit_small_patch16_224``, ...)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from autoft import hookimpl
from autoft.errors import AutoftError
from autoft.specs import Backbone, BackboneInfo, BackboneSpec, ParamGroup, PretrainedWeights


@cache
def _model_names() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


def has_model(name: str) -> bool:
    return name.split(".", 1)[0] in _model_names()


def list_models() -> list[str]:
    return sorted(_model_names())


def create(model_name: str, *, num_classes: int, dropout: float = 0.0, weights: str | None = None) -> Backbone:
    import timm

    pretrained = weights is not None
    if pretrained and not _hub_reachable():
        _use_local_cache_only()  # cached weights still load; missing ones fail at once, not after retries
    if weights and weights not in ("pretrained", "imagenet", "default") and "." not in model_name:
        model_name = f"{model_name}.{weights}"  # a timm pretrained tag, e.g. resnet50 + a1_in1k
    try:
        model = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, drop_rate=dropout)
    except RuntimeError as exc:
        if "pretrained" in str(exc).lower() or "tag" in str(exc).lower():
            raise AutoftError(f"timm has no pretrained weights {weights!r} for {model_name}: {exc}") from None
        raise
    except (OSError, ConnectionError, ValueError) as exc:
        if not pretrained:
            raise
        raise AutoftError(
            f"could not fetch pretrained weights for {model_name} ({type(exc).__name__}; offline?); "
            "download them elsewhere and pass --weights PATH (a state dict or .safetensors file)"
        ) from None
    cfg = model.pretrained_cfg
    return Backbone(
        model=model,
        groups=param_groups(model),
        num_features=model.num_features,
        embed=lambda x: model.forward_head(model.forward_features(x), pre_logits=True),
        input_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
    )


def pretrained(model_name: str) -> PretrainedWeights:
    """Where timm reads ``model_name``'s pretrained weights, and whether they are there (or reachable)."""
    import huggingface_hub
    import huggingface_hub.constants
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        return PretrainedWeights(False, f"timm, which has no pretrained weights for {model_name}")
    if cfg.hf_hub_id:
        repo = cfg.hf_hub_id.split("@")[0]
        for filename in filter(None, (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")):
            cached = huggingface_hub.try_to_load_from_cache(repo, filename)
            if isinstance(cached, str):
                return PretrainedWeights(True, cached)
        location = str(Path(huggingface_hub.constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}")
    else:
        import torch

        location = str(Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name)
        if Path(location).is_file():
            return PretrainedWeights(True, location)
    return PretrainedWeights(_hub_reachable(), location, download=True)


def describe(model_name: str) -> BackboneInfo:
    """Input size, normalisation and groups from timm's pretrained config and a build on the
    meta device, which allocates no weights (a ViT-B in 0.2 s instead of 5 s)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, num_classes=2)
    cfg = model.pretrained_cfg
    return BackboneInfo(
        input_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        num_groups=len(param_groups(model)),
    )


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _use_local_cache_only() -> None:
    import os

    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def param_groups(model) -> list[ParamGroup]:
    """timm's coarse ``group_matcher`` groups (stem, stages), with the classifier last as ``head``."""
    from timm.models import group_parameters

    classifier = model.pretrained_cfg.get("classifier") or "head"
    prefixes = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
    names = [n for n, _ in model.named_parameters()]
    head = tuple(n for n in names if n.startswith(prefixes))
    try:
        grouped = group_parameters(model, model.group_matcher(coarse=True))
        ordered = [[n for n in grouped[k] if n not in head] for k in sorted(grouped)]
    except (AttributeError, NotImplementedError):  # no matcher: one group per top-level module
        ordered, last = [], None
        for n in names:
            if n in head:
                continue
            top = n.split(".", 1)[0]
            if top != last:
                ordered.append([])
                last = top
            ordered[-1].append(n)
    ordered = [g for g in ordered if g]
    groups = [ParamGroup("stem" if i == 0 else f"stage{i}", tuple(g)) for i, g in enumerate(ordered)]
    return groups + [ParamGroup("head", head)]


@hookimpl
def autoft_register_backbones(register):
    register(
        BackboneSpec(
            name="timm",
            description="Any timm model by name (resnet50, convnext_tiny, vit_small_patch16_224, ...)",
            factory=create,
            list_models=list_models,
            has_model=has_model,
            pretrained=pretrained,
            describe=describe,
        )
    )
