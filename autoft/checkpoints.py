"""The files training writes: the model checkpoint (``model.pt``) and the resumable
training state (``state.pt``).

Both are read with ``torch.load(weights_only=True)``: tensors, numbers, strings and
containers of them, never arbitrary objects, so a file planted in a run folder cannot
run code.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autoft import plugins
from autoft.backbones import build_backbone
from autoft.data import Normalize
from autoft.errors import AutoftError
from autoft.io import atomic_path
from autoft.specs import Backbone

CHECKPOINT_NAME = "model.pt"
CHECKPOINT_FORMAT = 1
STATE_FORMAT = 2  # the training state's layout; another layout is not resumed


def save_checkpoint(
    path: Path,
    *,
    backbone_name: str,
    backbone: Backbone,
    classes: list[str],
    image_size: int,
    params: dict[str, Any],
    data: str | None = None,
    seed: int = 0,
) -> Path:
    """Weights plus what rebuilding and preprocessing need, written atomically.

    ``data`` and ``seed`` record where the images came from, so that export can verify
    and calibrate on the same validation split later.
    """
    from autoft import __version__

    payload = {
        "format": CHECKPOINT_FORMAT,
        "autoft_version": __version__,
        "backbone": backbone_name,
        "classes": list(classes),
        "image_size": int(image_size),
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "params": dict(params),
        "data": data,
        "seed": seed,
        "state_dict": {k: v.detach().cpu() for k, v in backbone.model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


@dataclass
class LoadedModel:
    backbone: Backbone
    meta: dict[str, Any]  # the checkpoint without its state dict

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    def network(self) -> torch.nn.Module:
        """The classifier with normalisation inside: float NCHW pixels in [0, 1] -> logits."""
        return torch.nn.Sequential(Normalize(self.meta["mean"], self.meta["std"]), self.backbone.model).eval()


def find_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint file, a train output folder, or a search folder (its ``best/``)."""
    path = Path(path).expanduser()
    for candidate in (path, path / CHECKPOINT_NAME, path / "best" / CHECKPOINT_NAME):
        if candidate.is_file():
            return candidate
    raise AutoftError(f"no autoft checkpoint at {path} (looked for {CHECKPOINT_NAME} and best/{CHECKPOINT_NAME})")


def load_checkpoint(path: str | Path, registry: plugins.Registry | None = None) -> LoadedModel:
    file = find_checkpoint(path)
    payload = _safe_load(file, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise AutoftError(f"{file} is not an autoft checkpoint")
    state = payload.pop("state_dict")
    backbone = build_backbone(
        payload["backbone"], num_classes=len(payload["classes"]), dropout=payload["params"].get("dropout", 0.0), registry=registry
    )
    backbone.model.load_state_dict(state)
    backbone.model.eval()
    return LoadedModel(backbone, payload)


# ---------------------------------------------------------------------------
# The resumable training state


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    """Write the loop's state atomically; only plain data, so that it loads with ``weights_only``."""
    with atomic_path(path) as tmp:
        torch.save({"format": STATE_FORMAT, **state}, tmp)


def load_training_state(path: Path) -> dict[str, Any] | None:
    """The state saved by :func:`save_training_state`, or None when ``path`` holds another
    layout (an older autoft's): that run starts over. A file that is not plain data is refused."""
    state = _safe_load(path, "training state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        return None
    return state


def _safe_load(file: Path, what: str) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # an object that is not plain data: never build it
        lines = [line.strip() for line in str(exc).splitlines() if "Unsupported global" in line or "Unsupported operand" in line]
        found = lines[0].removeprefix("WeightsUnpickler error: ") if lines else str(exc).splitlines()[0]
        raise AutoftError(f"cannot read {what} {file}: it holds code, not only tensors and plain data ({found[:200]}); refused unread") from None
    except Exception as exc:  # a truncated or foreign file
        raise AutoftError(f"cannot read {what} {file}: {type(exc).__name__}: {str(exc).strip()[:300]}") from None
