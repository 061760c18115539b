"""Building backbones through their plugins, loading weight files, and describing models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from autoft import plugins
from autoft.errors import AutoftError
from autoft.specs import Backbone, BackboneInfo
from autoft.model.weights import load_plugin_weights, parse_plugin_weights


def build_backbone(name: str, *, num_classes: int, dropout: float = 0.0, weights: str | None = None, registry: plugins.Registry | None = None) -> Backbone:
    """Build backbone ``name`` through its plugin; ``weights`` is none, a file, a source tag,
    or ``plugin:NAME`` (a weights plugin's, see :mod:`autoft.model.weights`)."""
    registry = registry or plugins.registry()
    spec, model_name = registry.backbone(name)
    weights = None if weights in (None, "", "none", "scratch") else str(weights)
    from_plugin = parse_plugin_weights(weights) is not None  # plugin:NAME, a weights plugin's
    weights_file = Path(weights).expanduser() if weights and not from_plugin and _looks_like_path(weights) else None
    if weights_file is not None and not weights_file.is_file():
        raise AutoftError(f"weights file not found: {weights}")
    backbone = spec.factory(model_name, num_classes=num_classes, dropout=dropout, weights=None if weights_file or from_plugin else weights)
    check_groups(backbone, name)
    if weights_file is not None:
        load_weights(backbone.model, weights_file)
    if from_plugin:
        load_plugin_weights(backbone, name, weights, registry)
    return backbone


def describe_backbone(name: str, registry: plugins.Registry | None = None) -> BackboneInfo:
    """Input size, normalisation and number of groups of ``name``, from its source's
    ``describe`` when it has one, else from one throwaway build."""
    registry = registry or plugins.registry()
    spec, model_name = registry.backbone(name)
    if spec.describe is not None:
        info = spec.describe(model_name)
        if not isinstance(info, BackboneInfo):
            raise AutoftError(f"backbone source {spec.name!r}: describe() must return BackboneInfo, got {type(info).__name__}")
        return info
    probe = spec.factory(model_name, num_classes=2, dropout=0.0, weights=None)
    return BackboneInfo(input_size=probe.input_size, mean=tuple(probe.mean), std=tuple(probe.std), num_groups=len(probe.groups))


def _looks_like_path(weights: str) -> bool:
    return Path(weights).expanduser().exists() or any(s in weights for s in ("/", "\\")) or weights.endswith(
        (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
    )


def check_groups(backbone: Backbone, name: str) -> None:
    """The contract: groups cover every parameter exactly once."""
    named = [n for n, _ in backbone.model.named_parameters()]
    grouped = [p for g in backbone.groups for p in g.params]
    if sorted(grouped) != sorted(named):
        missing = set(named) - set(grouped)
        extra = [p for p in grouped if grouped.count(p) > 1 or p not in named]
        raise AutoftError(
            f"backbone {name!r}: its parameter groups must cover every parameter once "
            f"(missing {sorted(missing)[:3]}, duplicated or unknown {sorted(set(extra))[:3]})"
        )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = safe_load(path, "weights")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # an autoft checkpoint, or a Lightning one
    if not isinstance(state, dict):
        raise AutoftError(f"{path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def safe_load(file: Path, what: str) -> Any:
    """``torch.load`` of tensors and plain data only: a file holding other Python objects is
    refused in one line, and nothing in it runs."""
    import pickle

    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # an object that is not plain data: never build it
        lines = [line.strip() for line in str(exc).splitlines() if "Unsupported global" in line or "Unsupported operand" in line]
        found = lines[0].removeprefix("WeightsUnpickler error: ") if lines else "objects other than tensors and plain data"
        raise AutoftError(f"cannot read {what} {file}: it holds code, not only tensors and plain data ({found[:200]}); refused unread") from None
    except Exception as exc:  # a truncated or foreign file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AutoftError(f"cannot read {what} {file}: {type(exc).__name__}: {reason[:300]}") from None


def load_weights(model: torch.nn.Module, path: Path) -> list[str]:
    """Load matching tensors from ``path``; return the model keys left at their initial values.

    Tensors whose shape differs (a classifier for other classes) are skipped, so weights
    from pretraining or another task start the backbone while the head stays fresh.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise AutoftError(f"no tensor in {path} matches this backbone; was it saved from another architecture?")
    model.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))


def freeze_batchnorm(model: torch.nn.Module, every: bool = False) -> None:
    """Keep running statistics of BatchNorm layers whose parameters are all frozen, or, with
    ``every`` (a recipe's ``bn=keep``), of every BatchNorm layer: eval mode normalises with the
    starting weights' statistics, while the affine parameters still train unless frozen."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            own = list(module.parameters(recurse=False))
            if every or (own and not any(p.requires_grad for p in own)):
                module.eval()
