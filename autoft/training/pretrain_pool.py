"""What pretraining works with: the unlabelled pool, pooled features and their k-NN score,
and the checkpoints a stage leaves (the backbone without its classifier)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from autoft import plugins
from autoft.data import UNLABELLED, DataSplits, Images, ImageTensors, Normalize, image_batches, image_files, to_float
from autoft.data.decoding import decode_all, stratified_split, warn_skipped
from autoft.errors import AutoftError
from autoft.core.io import atomic_path
from autoft.core.runtime import blas_alone
from autoft.specs import Backbone
from autoft.core.budget import Budget


CHECKPOINT_FRACTIONS = (0.25, 0.5, 1.0)
PRETRAINED_FORMAT = "autoft-pretrained-backbone/1"
METRICS_NAME = "metrics.json"
KNN_NEIGHBOURS = 20


# ---------------------------------------------------------------------------
# Images


@dataclass
class Pool:
    """Unlabelled images decoded once, with labels when the source had them (used only to evaluate)."""

    images: torch.Tensor  # uint8 (N, 3, S, S)
    labels: torch.Tensor | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)


def load_pool(source: str | os.PathLike, image_size: int, registry: plugins.Registry) -> Pool:
    """Decode a flat folder of images, a class folder (labels kept aside), or any dataset source.

    Unreadable files are skipped with a warning and counted; only a pool with no readable
    image is an error.
    """
    path = Path(source).expanduser()
    labels: list[int] | None = None
    if path.is_dir():
        files = image_files(path)
        class_dirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
        per_class = [image_files(d) for d in class_dirs]
        if not files and sum(bool(f) for f in per_class) >= 2:
            labels = [i for i, f in enumerate(per_class) for _ in f]
        files += [f for class_files in per_class for f in class_files]
        samples: Sequence[Any] = files
        if not samples:
            raise AutoftError(f"no images found in {source}: expected image files in it or in its subfolders")
    else:
        spec, argument = registry.dataset(str(source))
        labelled = spec.factory(argument)
        samples, labels = labelled.samples, list(labelled.labels)
    images, kept, skipped = decode_all(samples, image_size)
    warn_skipped(skipped, len(samples))
    if not kept:
        raise AutoftError(f"no readable images in {source}")
    kept_labels = torch.as_tensor(np.asarray(labels, dtype=np.int64)[kept]) if labels is not None else None
    return Pool(images=images, labels=kept_labels, skipped=skipped)


def fingerprint(images: ImageTensors) -> str:
    """A hash of decoded pixels: the same images at the same size give the same key (a set on disk is read a batch at a time)."""
    digest = hashlib.sha256(str((len(images), *images.image_shape)).encode())
    for batch in image_batches(images, 1024):
        digest.update(batch.contiguous().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# Evaluation


@torch.inference_mode()
def embed_all(backbone: Backbone, images: Images, device: torch.device, batch_size: int = 256, l2: bool = True) -> torch.Tensor:
    """Pooled features of uint8 images (a set on disk is read a batch at a time), L2-normalised
    unless ``l2`` is False (what the head reads), on the CPU. Leaves the model in eval mode."""
    normalize = Normalize(backbone.mean, backbone.std).to(device)
    backbone.model.eval()
    features = []
    for batch in image_batches(images, batch_size):
        pooled = backbone.embed(normalize(to_float(batch, device))).float()
        features.append((torch.nn.functional.normalize(pooled, dim=1) if l2 else pooled).cpu())
    return torch.cat(features)


@blas_alone
def knn_accuracy(backbone: Backbone, train: ImageTensors, test: ImageTensors, device: torch.device, k: int = KNN_NEIGHBOURS) -> float:
    """Accuracy on ``test`` of a cosine k-NN vote over ``train``'s frozen features."""
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=min(k, len(train)), metric="cosine", weights="distance")
    knn.fit(embed_all(backbone, train, device).numpy(), train.labels.numpy())
    predicted = knn.predict(embed_all(backbone, test, device).numpy())
    return float((predicted == test.labels.numpy()).mean())


def evaluation_split(labelled: DataSplits | None, images: ImageTensors, seed: int) -> tuple[ImageTensors, ImageTensors] | None:
    """(k-NN reference, k-NN queries): a labelled split's train and val, or a split of the images' own labels when they all have one."""
    if labelled is not None:
        return labelled.train, labelled.val
    if bool((images.labels == UNLABELLED).any()):
        return None
    keep, held = stratified_split(images.labels.numpy(), 0.2, seed)
    return images.subset(keep), images.subset(held)


# ---------------------------------------------------------------------------
# Checkpoints


@dataclass
class PretrainCheckpoint:
    epoch: int
    fraction: float  # of the planned epochs
    path: Path
    knn_accuracy: float | None = None

    @property
    def label(self) -> str:
        """A short name for the checkpoint, e.g. the value of the search's ``init`` parameter."""
        return f"epoch{self.epoch}"


def save_pretrained(path: Path, backbone: Backbone, *, backbone_name: str, method: str, epoch: int, image_size: int) -> Path:
    """The backbone's weights without its classifier (the fine-tuning task brings its own)."""
    head = set(backbone.head.params)
    state = {k: v.detach().cpu().clone() for k, v in backbone.model.state_dict().items() if k not in head}
    payload = {
        "format": PRETRAINED_FORMAT,
        "backbone": backbone_name,
        "method": method,
        "epoch": epoch,
        "image_size": image_size,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "state_dict": state,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def checkpoint_epochs(epochs: int, fractions: Sequence[float] = CHECKPOINT_FRACTIONS) -> list[int]:
    """The epochs closest to ``fractions`` of the budget, and always the last one."""
    return sorted({min(epochs, max(1, round(f * epochs))) for f in fractions} | {epochs})


# ---------------------------------------------------------------------------
# A stage's time


def stage_budget(time_budget: float | None, deadline: float | None) -> Budget | None:
    """The :class:`~autoft.core.budget.Budget` of ``pretrain``'s ``time_budget`` (seconds from now)
    and ``deadline`` (a hard ``time.monotonic()`` end)."""
    if time_budget is None and deadline is None:
        return None
    return Budget(end=deadline, hard_end=deadline).stage(time_budget)


def stage_seconds(budget: Budget | None) -> float | None:
    """How long a stage may take, as asked (its cache key holds it)."""
    return None if budget is None or budget.end is None else round(budget.end - budget.start, 1)
