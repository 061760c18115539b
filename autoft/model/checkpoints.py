"""The files training writes: the model checkpoint (``model.pt``) and the resumable
training state (``state.pt``).

Both are read with ``torch.load(weights_only=True)``: tensors, numbers, strings and
containers of them, never arbitrary objects, so a file planted in a run folder cannot
run code.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from autoft import plugins
from autoft.model.backbones import build_backbone, safe_load
from autoft.model.candidate_modules import build_candidate
from autoft.data import Normalize
from autoft.errors import AutoftError
from autoft.core.io import atomic_path
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
    candidate: dict[str, Any] | None = None,
) -> Path:
    """Weights plus what rebuilding and preprocessing need, written atomically.

    ``data`` and ``seed`` record where the images came from, so that export can verify
    and calibrate on the same validation split later. ``candidate`` marks a simple model
    (:mod:`autoft.model.candidate_modules`): plain data naming its kind, from which loading
    rebuilds its module instead of asking a backbone source.
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
    if candidate is not None:
        payload["candidate"] = dict(candidate)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


MEMBER_META = ("backbone", "mean", "std", "candidate")  # what may differ between an ensemble's members


def save_ensemble(path: Path, members: list[Path], weights: list[float]) -> Path:
    """One checkpoint for ``members`` (checkpoints of the same classes and image size: trials
    of one backbone, or simple models beside them), averaged with ``weights``; a single
    member is copied as it is. Each member keeps its own backbone name, normalisation and,
    for a simple model, its ``candidate`` record."""
    payloads = [safe_load(Path(m), "checkpoint") for m in members]
    first = dict(payloads[0])
    if len(payloads) > 1:
        first["members"] = [
            {"params": p["params"], "state_dict": p["state_dict"], "weight": float(w), **{k: p.get(k) for k in MEMBER_META}} for p, w in zip(payloads, weights)
        ]  # fmt: skip
    with atomic_path(path) as tmp:
        torch.save(first, tmp)
    return path


@dataclass
class LoadedModel:
    """A checkpoint's model, or an ensemble's: ``backbone`` is the (first) member, ``members``
    every member's model, ``weights`` their weights and ``norms`` their (mean, std) when there
    are several."""

    backbone: Backbone
    meta: dict[str, Any]  # the checkpoint without its state dicts
    members: list[torch.nn.Module] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    norms: list[tuple[list[float], list[float]]] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    def network(self) -> torch.nn.Module:
        """The classifier with normalisation inside: float NCHW pixels in [0, 1] -> logits
        (for an ensemble, the log of its members' weighted mean probabilities, each member
        normalising the pixels its own way)."""
        if len(self.members) > 1:
            from autoft.model.ensemble import AveragedMembers

            members = [torch.nn.Sequential(Normalize(mean, std), model) for model, (mean, std) in zip(self.members, self.norms)]
            return AveragedMembers(members, self.weights).eval()
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
    payload = safe_load(file, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise AutoftError(f"{file} is not an autoft checkpoint")
    state = payload.pop("state_dict")
    members = payload.pop("members", None) or [{"params": payload["params"], "state_dict": state, "weight": 1.0}]
    metas = [{**payload, **{k: member[k] for k in MEMBER_META if k in member}} for member in members]  # an older ensemble's members share the first's
    backbones = [_build_member(meta, member, registry) for meta, member in zip(metas, members)]
    if len(backbones) == 1:
        return LoadedModel(backbones[0], payload)
    payload["ensemble"] = [{"params": m["params"], "weight": m["weight"], **({"candidate": m["candidate"]} if m.get("candidate") else {})} for m in members]
    norms = [(list(meta["mean"]), list(meta["std"])) for meta in metas]
    return LoadedModel(backbones[0], payload, [b.model for b in backbones], [m["weight"] for m in members], norms)


def _build_member(meta: dict[str, Any], member: dict[str, Any], registry: plugins.Registry | None) -> Backbone:
    if meta.get("candidate") is not None:  # a simple model: its module is rebuilt from the checkpoint alone
        backbone = build_candidate(meta, registry)
    else:
        backbone = build_backbone(meta["backbone"], num_classes=len(meta["classes"]), dropout=member["params"].get("dropout", 0.0), registry=registry)
    backbone.model.load_state_dict(member["state_dict"])
    backbone.model.eval()
    return backbone


# ---------------------------------------------------------------------------
# The resumable training state


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    """Write the loop's state atomically; only plain data, so that it loads with ``weights_only``.
    Its SHA-256 goes beside it (``state.pt.sha256``), written first: a state whose checksum does
    not match (cut short, overwritten, a crash between the two writes) is never resumed."""
    with atomic_path(path) as tmp:
        torch.save({"format": STATE_FORMAT, **state}, tmp)
        digest = _sha256(Path(tmp))
        with atomic_path(_checksum_path(path)) as sum_tmp:
            Path(sum_tmp).write_text(digest + "\n")


def load_training_state(path: Path) -> dict[str, Any] | None:
    """The state saved by :func:`save_training_state`, or None when ``path`` holds another
    layout (an older autoft's): that run starts over. A state that fails its checksum (cut
    short, overwritten, or with none beside it) is deleted unread with a warning, and the run
    starts over too. One that matches its checksum but holds code is refused (an attack, not damage)."""
    problem = _checksum_problem(path)
    if problem is not None:
        warnings.warn(f"{path}: the saved training state is damaged ({problem}); discarded, the fit starts over", stacklevel=2)
        discard_training_state(path)
        return None
    state = safe_load(path, "training state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        return None
    return state


def discard_training_state(path: Path) -> None:
    """Delete a training state and its checksum."""
    Path(path).unlink(missing_ok=True)
    _checksum_path(path).unlink(missing_ok=True)


def _checksum_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".sha256")


def _checksum_problem(path: Path) -> str | None:
    try:
        expected = _checksum_path(path).read_text().strip()
    except OSError:
        return "no checksum beside it"
    actual = _sha256(Path(path))
    return None if actual == expected else f"SHA-256 {actual[:12]}..., its checksum says {expected[:12]}..."


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
