"""One fine-tuning run, ``autoft train``: check the recipe, load the data, fit, score, save.

The fit itself is :func:`autoft.training.fitting.fit`, as for every trial of a search; this module
adds what a single run needs around it: checks before any image is decoded, the test split's
metrics, and ``model.pt``, ``metrics.json`` and ``labels.json`` in ``out``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from autoft import plugins
from autoft.model.backbones import build_backbone, describe_backbone
from autoft.model.checkpoints import CHECKPOINT_NAME
from autoft.data import DataSplits, Normalize
from autoft.data.decoding import load_data
from autoft.errors import AutoftError
from autoft.core.events import Event, with_shorthands
from autoft.core.io import write_json
from autoft.model.metrics import metric_specs, test_metrics
from autoft.model.recipe import PRETRAINED_DEFAULTS, resolve_recipe
from autoft.training.fitting import FitRequest, Fitted, fit as fit_request
from autoft.core.runtime import as_device, resolve_device
from autoft.specs import Backbone
from autoft.training.trainer import TrainerConfig


def resolve_params(strategy_name: str, n_groups: int, given: dict[str, Any], registry: plugins.Registry | None = None) -> dict[str, Any]:
    """``given`` completed with every default and checked, as a flat dict (see :func:`autoft.model.recipe.resolve_recipe`);
    by default against the installed plugins."""
    return resolve_recipe({**given, "strategy": strategy_name}, n_groups, registry or plugins.registry()).params()


@dataclass
class TrainResult:
    out: Path | None
    checkpoint: Path | None
    metrics: dict[str, Any]
    params: dict[str, Any]
    classes: list[str]
    history: list[dict[str, float]] = field(default_factory=list)
    backbone: Backbone | None = None
    stopped: str | None = None  # "deadline" or "interrupted" when training ended early


@dataclass
class TrainJob:
    """Everything one ``autoft train`` run needs. ``params`` holds recipe values given by the
    user (base and plugin parameters; missing ones take their defaults)."""

    backbone: str
    data: str | DataSplits
    out: Path | None = None
    params: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    image_size: int | None = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    on_event: Callable[[Event], None] | None = None
    registry: plugins.Registry | None = None


def train(
    backbone: str,
    data: str | Path | DataSplits,
    out: str | Path | None = None,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float | None = None,
    freeze_depth: int | None = None,
    dropout: float | None = None,
    weight_decay: float | None = None,
    strategy: str = "freeze",
    weights: str | None = None,
    image_size: int | None = None,
    device: str = "auto",
    seed: int = 0,
    metric: str = "accuracy",
    extra_params: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    on_event: Callable[[Event], None] | None = None,
    deadline: float | None = None,
) -> TrainResult:
    """One fine-tuning run. Writes ``model.pt``, ``metrics.json`` and ``labels.json`` to ``out``.

    A thin wrapper over :class:`TrainJob` and :func:`run_train`. Recipe parameters beyond
    the named ones (``label_smoothing``, ``augment``, ``regularizer``, a strategy's own)
    go in ``extra_params``. ``on_event`` receives :mod:`autoft.core.events`; ``on_epoch`` (each
    epoch's record) and ``on_batch`` (step, steps) are shorthands for it.
    """
    given = {"lr": lr, "dropout": dropout, "weight_decay": weight_decay, "freeze_depth": freeze_depth, "strategy": strategy, **(extra_params or {})}
    config = TrainerConfig(epochs=epochs, batch_size=batch_size, device=device, seed=seed, metric=metric, deadline=deadline)
    job = TrainJob(
        backbone=backbone, data=str(data) if isinstance(data, Path) else data, out=Path(out) if out is not None else None,
        params=given, weights=weights, image_size=image_size, trainer=config, on_event=with_shorthands(on_event, on_epoch, on_batch),
    )  # fmt: skip
    return run_train(job)


# ---------------------------------------------------------------------------
# prepare, fit, finish


def run_train(job: TrainJob) -> TrainResult:
    request = prepare_train(job)
    return finish_train(job, fit_request(request))


def prepare_train(job: TrainJob) -> FitRequest:
    """Check names and the recipe before decoding any image; decode; say what to fit."""
    registry = job.registry or plugins.registry()
    if job.trainer.steps is None and job.trainer.epochs < 1:
        raise AutoftError("--epochs must be at least 1")
    metric_specs(job.trainer.metric, registry)  # an unknown metric fails before any work
    info = describe_backbone(job.backbone, registry)  # a bad backbone name fails here
    given = {**PRETRAINED_DEFAULTS, **job.params} if job.weights else job.params  # the search's defaults from pretrained weights (the probe as the head's start)
    recipe = resolve_recipe(given, info.num_groups, registry)
    device = resolve_device(job.trainer.device) if isinstance(job.trainer.device, str) else job.trainer.device
    data = job.data
    if isinstance(data, str):
        data = load_data(data, image_size=job.image_size, default_size=info.input_size, seed=job.trainer.seed, registry=registry)
    build_backbone(job.backbone, num_classes=data.num_classes, weights=job.weights, registry=registry)  # a bad weights file fails before training
    return FitRequest(
        backbone=job.backbone, data=data, recipe=recipe, trainer=replace(job.trainer, device=device), registry=registry, weights=job.weights,
        source=job.data if isinstance(job.data, str) else None, on_event=job.on_event,
    )  # fmt: skip


def finish_train(job: TrainJob, fitted: Fitted) -> TrainResult:
    """Score the kept weights on the test split; write the checkpoint, metrics and labels."""
    request, result, model = fitted.request, fitted.result, fitted.backbone
    data, config, device = request.data, request.trainer, as_device(request.trainer.device)
    params = request.params
    if job.weights:
        params["weights"] = job.weights
    net = torch.nn.Sequential(Normalize(model.mean, model.std), model.model).to(device)
    metrics: dict[str, Any] = {
        "backbone": job.backbone,
        "metric": config.metric,
        "best_epoch": result.best_epoch,
        **{f"val_{k}": v for k, v in result.val.items() if isinstance(v, float)},
        **test_metrics(net, data, device, config.batch_size * 2, metric_specs(config.metric, request.registry)),
        "num_train": len(data.train),
        "num_val": len(data.val),
        "num_test": len(data.test) if data.test is not None else 0,
        "skipped_images": len(data.skipped),
        "params": params,
        "epochs": result.history,
        **({"stopped": result.stopped} if result.stopped else {}),
    }
    checkpoint = None
    if job.out is not None:
        checkpoint = fitted.save(job.out / CHECKPOINT_NAME, params)
        write_json(job.out / "metrics.json", metrics)
        write_json(job.out / "labels.json", data.classes)
    return TrainResult(out=job.out, checkpoint=checkpoint, metrics=metrics, params=params, classes=data.classes, history=result.history, backbone=model, stopped=result.stopped)
