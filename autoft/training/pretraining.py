"""The pretraining stage: self-supervised training of a backbone on unlabelled images.

A pretraining method (a :class:`~autoft.specs.Pretrainer` plugin) supplies the loss;
this module runs the loop, saves the backbone at several points of the budget (by
default 25%, 50% and 100% of the epochs), and, when labelled images are at hand, scores
every checkpoint by k-NN accuracy on frozen features.

Checkpoints hold the backbone's state dict without its classifier, in a form that
``autoft train --weights PATH`` and :func:`autoft.model.backbones.build_backbone` load.

With ``out=None`` the stage lives in autoft's cache, keyed by backbone, method, images
(a hash of the decoded pixels), image size, budget and starting weights, and a finished
stage is reused. The cache folder is ``$AUTOFT_CACHE_DIR/pretrain``, else
``$XDG_CACHE_HOME/autoft/pretrain``, else ``~/.cache/autoft/pretrain``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from autoft import plugins

from autoft.data import cache
from autoft.data import DataSplits, ImageTensors
from autoft.data.decoding import load_data
from autoft.errors import AutoftError
from autoft.core.io import read_json
from autoft.model.backbones import describe_backbone
from autoft.core.budget import Budget
from autoft.core.events import with_shorthands, Event
from autoft.core.runtime import as_device

from autoft.training.pretrain_pool import (  # noqa: F401 - the pool, features and checkpoints of a stage
    CHECKPOINT_FRACTIONS, METRICS_NAME, PRETRAINED_FORMAT, Pool, PretrainCheckpoint, checkpoint_epochs, embed_all, fingerprint, load_pool,
    stage_budget, stage_seconds,
)
from autoft.training.pretrain_loop import PretrainLoop


# ---------------------------------------------------------------------------
# The stage


@dataclass
class PretrainResult:
    out: Path
    checkpoints: list[PretrainCheckpoint]
    metrics: dict[str, Any]
    cached: bool = False  # True when a finished stage was reused from the cache

    @property
    def history(self) -> list[dict[str, float]]:
        return self.metrics["epochs"]

    @property
    def final(self) -> PretrainCheckpoint:
        return self.checkpoints[-1]


def cache_root() -> Path:
    """Where finished stages are kept: the ``pretrain`` folder of autoft's cache (:mod:`autoft.data.cache`)."""
    return cache.cache_root() / cache.PRETRAIN


def _weights_identity(weights: str | None) -> Any:
    if not weights:
        return None
    path = Path(weights).expanduser()
    if path.is_file():
        stat = path.stat()
        return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    return weights


def read_result(out: Path, cached: bool = False) -> PretrainResult:
    metrics = read_json(out / METRICS_NAME)
    checkpoints = [
        PretrainCheckpoint(c["epoch"], c["fraction"], out / c["path"], c.get("knn_accuracy")) for c in metrics["checkpoints"]
    ]
    return PretrainResult(out=out, checkpoints=checkpoints, metrics=metrics, cached=cached)


@dataclass
class PretrainConfig:
    """How one pretraining stage runs. ``budget`` caps the stage: after the first epoch the
    planned epochs shrink to what fits before its ``end``, and the stage stops after the batch
    that reaches it, one batch at least, so that it always leaves a checkpoint; its
    ``hard_end`` (the whole command's) is checked before every batch, the first too."""

    method: str = "simclr"
    epochs: int = 50
    batch_size: int = 128
    image_size: int | None = None
    weights: str | None = None
    lr: float = 1e-3
    weight_decay: float = 0.05
    checkpoints: Sequence[float] = CHECKPOINT_FRACTIONS
    budget: Budget | None = None
    device: str | torch.device = "auto"
    seed: int = 0


def pretrain(
    backbone: str,
    data: str | os.PathLike | torch.Tensor | ImageTensors,
    out: str | os.PathLike | None = None,
    *,
    method: str = "simclr",
    epochs: int = 50,
    batch_size: int = 128,
    image_size: int | None = None,
    weights: str | None = None,
    labelled: str | DataSplits | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    checkpoints: Sequence[float] = CHECKPOINT_FRACTIONS,
    time_budget: float | None = None,
    deadline: float | None = None,
    device: str = "auto",
    seed: int = 0,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> PretrainResult:
    """Pretrain ``backbone`` on unlabelled images with ``method``; save checkpoints to ``out``.

    A thin wrapper over :class:`PretrainConfig` and :func:`run_pretraining`.
    ``data`` is a folder of images (flat or one subfolder per class; labels are ignored for
    training), any dataset source (``sample:digits``), a uint8 ``(N, 3, S, S)`` tensor, or
    :class:`~autoft.data.ImageTensors` (a set on disk is read a batch at a time).
    ``labelled`` (a dataset source or :class:`~autoft.data.DataSplits`) scores each
    checkpoint by k-NN accuracy on its validation split; without it a class folder's own
    labels are used (20% held out, as are an ``ImageTensors``' when every image has one), and a flat folder gets no score.
    ``out=None`` keeps the stage in the cache (see the module docstring) and reuses it.
    ``on_event`` receives :mod:`autoft.core.events`; ``on_epoch`` and ``on_batch`` are shorthands.
    """
    config = PretrainConfig(
        method=method, epochs=epochs, batch_size=batch_size, image_size=image_size, weights=weights, lr=lr, weight_decay=weight_decay,
        checkpoints=checkpoints, budget=stage_budget(time_budget, deadline), device=device, seed=seed,
    )  # fmt: skip
    return run_pretraining(backbone, data, out, config, labelled=labelled, on_event=with_shorthands(on_event, on_epoch, on_batch))


@dataclass
class PretrainJob:
    """A checked stage: what :class:`PretrainLoop` runs, and where its result goes."""

    backbone: str
    images: ImageTensors  # what the loop trains on, with the source's labels where it had them (for k-NN only)
    skipped: list[tuple[str, str]]  # (source, reason) of unreadable files
    config: PretrainConfig
    image_size: int
    device: torch.device
    labelled: DataSplits | None
    final: Path  # where the finished stage lives
    work: Path  # where it is written (a partial folder in the cache until it is done)
    registry: plugins.Registry


def run_pretraining(
    backbone: str, data: str | os.PathLike | torch.Tensor | ImageTensors, out: str | os.PathLike | None, config: PretrainConfig, *,
    labelled: str | DataSplits | None = None, on_event: Callable[[Event], None] | None = None,
) -> PretrainResult:  # fmt: skip
    """Prepare (check, decode, find the cache entry), run the loop, then publish the stage."""
    job = prepare_pretraining(backbone, data, out, config, labelled)
    if (job.final / METRICS_NAME).is_file() and job.work != job.final:
        return read_result(job.final, cached=True)
    try:
        stopped = PretrainLoop(job, on_event).run()
    except BaseException:
        if job.work != job.final:
            shutil.rmtree(job.work, ignore_errors=True)
        raise
    return finish_pretraining(job, stopped)


def prepare_pretraining(backbone: str, data, out, config: PretrainConfig, labelled) -> PretrainJob:
    if config.epochs < 1:
        raise AutoftError("--epochs must be at least 1")
    if config.batch_size < 2:
        raise AutoftError("--batch-size must be at least 2 (contrastive methods compare images within a batch)")
    if not config.checkpoints or any(not 0 < f <= 1 for f in config.checkpoints):
        raise AutoftError("checkpoint points must be fractions of the budget in (0, 1]")
    registry = plugins.registry()
    registry.backbone(backbone)  # fail on a bad name before decoding any image
    registry.pretrainer(config.method)
    device = as_device(config.device)
    image_size = config.image_size
    if image_size is None:
        if isinstance(data, torch.Tensor):
            image_size = int(data.shape[-1])
        elif isinstance(data, ImageTensors):
            image_size = data.image_shape[-1]
        elif isinstance(labelled, DataSplits):
            image_size = labelled.image_size
        else:
            image_size = describe_backbone(backbone, registry).input_size
    images, skipped = _load_images(data, image_size, registry)
    if isinstance(labelled, (str, os.PathLike)):
        labelled = load_data(str(labelled), image_size=image_size, seed=config.seed, registry=registry)
    final = work = Path(out).expanduser() if out is not None else None
    if out is None:
        key = _cache_key(backbone, images, image_size, config)
        final = cache_root() / key
        # The folder appears by an atomic rename only once the stage has finished, so a
        # crashed or interrupted stage is never taken as done.
        if not (final / METRICS_NAME).is_file():
            cache.remove_abandoned(cache_root(), key)
        work = cache_root() / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    return PretrainJob(backbone, images, skipped, config, image_size, device, labelled, final, work, registry)


def _load_images(data, image_size: int, registry) -> tuple[ImageTensors, list[tuple[str, str]]]:
    """The images to pretrain on, with their labels where the source has them, and the files skipped."""
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8 or data.dim() != 4 or data.shape[1] != 3 or data.shape[-1] != image_size:
            raise AutoftError(f"image tensors must be uint8 (N, 3, {image_size}, {image_size}), got {data.dtype} {tuple(data.shape)}")
        images, skipped = ImageTensors(data), []
    elif isinstance(data, ImageTensors):
        if data.image_shape != (3, image_size, image_size):
            raise AutoftError(f"images must be (3, {image_size}, {image_size}), got {data.image_shape}")
        images, skipped = data, []
    else:
        pool = load_pool(data, image_size, registry)
        images, skipped = ImageTensors(pool.images, pool.labels), pool.skipped
    if len(images) < 2:
        raise AutoftError(f"need at least 2 images to pretrain, found {len(images)}")
    return images, skipped


def _cache_key(backbone: str, images: ImageTensors, image_size: int, config: PretrainConfig) -> str:
    key_fields = {
        "backbone": backbone, "method": config.method, "images": fingerprint(images), "image_size": image_size,
        "epochs": config.epochs, "time_budget": stage_seconds(config.budget), "batch_size": config.batch_size, "lr": config.lr,
        "weight_decay": config.weight_decay, "checkpoints": sorted(config.checkpoints), "weights": _weights_identity(config.weights),
        "seed": config.seed,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:24]


def finish_pretraining(job: PretrainJob, stopped: str | None) -> PretrainResult:
    """Publish the stage. In the cache, only a stage that ran its plan is kept for reuse."""
    if job.work == job.final:
        return read_result(job.final)
    if stopped == "interrupted":
        shutil.rmtree(job.work, ignore_errors=True)
        raise KeyboardInterrupt
    try:
        job.work.rename(job.final)
    except OSError:  # another process finished the same stage first; theirs is as good
        shutil.rmtree(job.work, ignore_errors=True)
    return read_result(job.final)


