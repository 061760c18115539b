"""The pretraining stage: self-supervised training of a backbone on unlabelled images.

A pretraining method (a :class:`~autoft.specs.Pretrainer` plugin) supplies the loss;
this module runs the loop, saves the backbone at several points of the budget (by
default 25%, 50% and 100% of the epochs), and, when labelled images are at hand, scores
every checkpoint by k-NN accuracy on frozen features.

Checkpoints hold the backbone's state dict without its classifier, in a form that
``autoft train --weights PATH`` and :func:`autoft.training.build_backbone` load.

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
import time
import uuid
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from autoft import cache, plugins
from autoft.data import UNLABELLED, DataSplits, Images, ImageTensors, Normalize, decode_all, image_batches, image_files, load_data, stratified_split, to_float, warn_skipped
from autoft.errors import AutoftError
from autoft.io import atomic_path, read_json, write_json
from autoft.specs import Backbone
from autoft.backbones import build_backbone, describe_backbone
from autoft.events import BatchEnd, EpochEnd, Event
from autoft.runtime import as_device, autocast, cosine_with_warmup, seed_everything, stop_requested
from autoft.trainer import OutOfTime

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


def load_pool(source: str | os.PathLike, image_size: int, registry=None) -> Pool:
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
        registry = registry or plugins.registry()
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
def embed_all(backbone: Backbone, images: Images, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Pooled features of uint8 images (a set on disk is read a batch at a time), L2-normalised, on the CPU."""
    normalize = Normalize(backbone.mean, backbone.std).to(device)
    backbone.model.eval()
    features = []
    for batch in image_batches(images, batch_size):
        x = normalize(to_float(batch, device))
        features.append(torch.nn.functional.normalize(backbone.embed(x).float(), dim=1).cpu())
    return torch.cat(features)


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
    """Where finished stages are kept: the ``pretrain`` folder of autoft's cache (:mod:`autoft.cache`)."""
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
    """How one pretraining stage runs. ``time_budget`` (seconds) caps the stage: after the
    first epoch the planned epochs shrink to what fits, and the stage stops after the batch
    that reaches it, one batch at least, so that it always leaves a checkpoint; ``deadline``
    (a ``time.monotonic()`` value) is a hard end, checked before every batch, the first too."""

    method: str = "simclr"
    epochs: int = 50
    batch_size: int = 128
    image_size: int | None = None
    weights: str | None = None
    lr: float = 1e-3
    weight_decay: float = 0.05
    checkpoints: Sequence[float] = CHECKPOINT_FRACTIONS
    time_budget: float | None = None
    deadline: float | None = None
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
    ``on_event`` receives :mod:`autoft.events`; ``on_epoch`` and ``on_batch`` are shorthands.
    """
    from autoft.training import _event_adapter

    config = PretrainConfig(
        method=method, epochs=epochs, batch_size=batch_size, image_size=image_size, weights=weights, lr=lr, weight_decay=weight_decay,
        checkpoints=checkpoints, time_budget=time_budget, deadline=deadline, device=device, seed=seed,
    )  # fmt: skip
    return run_pretraining(backbone, data, out, config, labelled=labelled, on_event=_event_adapter(on_event, on_epoch, on_batch))


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
        "epochs": config.epochs, "time_budget": config.time_budget, "batch_size": config.batch_size, "lr": config.lr,
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


class PretrainLoop:
    """The pretraining loop, one method per phase. It stops after the batch that reaches its
    deadline or a stop request, and saves the weights it has then as its last checkpoint."""

    def __init__(self, job: PretrainJob, on_event: Callable[[Event], None] | None = None):
        self.job, self.config, self.on_event = job, job.config, on_event
        self.device = job.device

    def run(self) -> str | None:
        """Train; return why the stage ended early ("deadline", "interrupted"), or None."""
        self._setup()
        stopped, epoch = None, 0
        while epoch < self.planned_epochs and not stopped:
            epoch += 1
            stopped = self._train_epoch(epoch)
        self._finish(epoch, stopped)
        return stopped

    def _setup(self) -> None:
        job, config = self.job, self.config
        self.started = time.perf_counter()
        seed_everything(config.seed)
        # The classifier is never trained nor saved; two classes keep every backbone source happy.
        self.backbone = build_backbone(job.backbone, num_classes=2, weights=config.weights, registry=job.registry)
        self.method = job.registry.pretrainer(config.method).factory()
        extra = self.method.setup(self.backbone, job.image_size)
        self.modules = torch.nn.ModuleList([self.backbone.model] + ([extra] if extra is not None else [])).to(self.device)
        head = set(self.backbone.head.params)
        trainable = [p for n, p in self.backbone.model.named_parameters() if n not in head]
        if extra is not None:
            trainable += list(extra.parameters())
        for p in trainable:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.batch_size = min(config.batch_size, len(job.images))
        self.steps_per_epoch = len(job.images) // self.batch_size  # full batches only: contrastive losses need company
        self.planned_epochs = config.epochs  # a time budget may shorten the plan after the first epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.evaluation = evaluation_split(job.labelled, job.images, config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.budget_end = None if config.time_budget is None else time.monotonic() + config.time_budget
        self.deadline = config.deadline
        self.trained = False  # a batch has trained: from then on the time budget can end the stage
        job.work.mkdir(parents=True, exist_ok=True)
        self.saves = checkpoint_epochs(config.epochs, config.checkpoints)
        self.metrics = self._start_metrics()
        self.modules.train()

    def _lr_factor(self, step: int) -> float:
        total = self.planned_epochs * self.steps_per_epoch
        return cosine_with_warmup(total, min(self.steps_per_epoch, total // 10 + 1))(step)

    def _start_metrics(self) -> dict[str, Any]:
        job, config = self.job, self.config
        return {
            "backbone": job.backbone,
            "method": config.method,
            "weights": config.weights,
            "image_size": job.image_size,
            "batch_size": self.batch_size,
            "lr": config.lr,
            "weight_decay": config.weight_decay,
            "seed": config.seed,
            "num_images": len(job.images),
            "skipped_images": len(job.skipped),
            "skipped": [{"source": s, "reason": r} for s, r in job.skipped[:100]],
            "planned_epochs": config.epochs,
            "time_budget": config.time_budget,
            "knn_accuracy_at_start": self._score(),
            "epochs": [],
            "checkpoints": [],
        }

    def _score(self) -> float | None:
        if self.evaluation is None:
            return None
        accuracy = knn_accuracy(self.backbone, *self.evaluation, self.device)
        self.modules.train()
        return accuracy

    def _stop_reason(self) -> str | None:
        if stop_requested():
            return "interrupted"
        now = time.monotonic()
        if self.deadline is not None and now > self.deadline:
            return "deadline"
        if self.trained and self.budget_end is not None and now > self.budget_end:
            return "deadline"
        return None

    def _train_epoch(self, epoch: int) -> str | None:
        epoch_started = time.perf_counter()
        pool = self.job.images
        order = torch.randperm(len(pool), generator=self.generator)
        batches = [order[step * self.batch_size : (step + 1) * self.batch_size] for step in range(self.steps_per_epoch)]
        total, done, stopped = 0.0, 0, None
        with closing(pool.read_batches(batches, pin_memory=pool.on_disk and self.device.type == "cuda")) as reader:
            for step, (batch, _) in enumerate(reader):
                stopped = self._stop_reason()
                if stopped:
                    break
                images = to_float(batch, self.device)
                with autocast(self.device):
                    loss = self.method.loss(self.backbone, images)
                if not torch.isfinite(loss):
                    raise AutoftError(f"pretraining loss is {loss.item()} at epoch {epoch}; try a lower --lr")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                total += loss.item()
                done += 1
                self.trained = True
                self._emit(BatchEnd(step=step + 1, steps=self.steps_per_epoch))
        if done == 0:
            return stopped  # nothing trained in this epoch: it does not count
        record = {"epoch": epoch, "loss": total / done, "seconds": time.perf_counter() - epoch_started}
        if stopped:
            record["stopped"] = stopped
        self._end_epoch(epoch, record, last=bool(stopped))
        return stopped

    def _end_epoch(self, epoch: int, record: dict[str, Any], last: bool) -> None:
        self.metrics["epochs"].append(record)
        if self.config.time_budget is not None and not last:
            elapsed = time.perf_counter() - self.started
            if epoch == 1:
                # The first epoch tells how many fit; the schedule and checkpoints follow the new plan.
                fits = max(1, int(self.config.time_budget / max(elapsed, 1e-9)))
                if fits < self.config.epochs:
                    self.planned_epochs = fits
                    self.saves = checkpoint_epochs(fits, self.config.checkpoints)
            elif elapsed + record["seconds"] > self.config.time_budget and epoch < self.planned_epochs:
                self.planned_epochs = epoch  # the next epoch would overrun: this one is the last
        if last or epoch >= self.planned_epochs:
            self.planned_epochs = epoch
            self.saves.append(epoch)
        if epoch in self.saves:
            self._save(epoch, record)
        self._emit(EpochEnd(epoch=epoch, epochs=self.planned_epochs, record=record, value=record.get("knn_accuracy")))

    def _save(self, epoch: int, record: dict[str, Any]) -> None:
        job = self.job
        path = save_pretrained(
            job.work / f"backbone-epoch{epoch}.pt", self.backbone, backbone_name=job.backbone, method=self.config.method, epoch=epoch, image_size=job.image_size
        )
        checkpoint = {"epoch": epoch, "fraction": round(epoch / self.planned_epochs, 4), "path": path.name, "knn_accuracy": self._score()}
        self.metrics["checkpoints"].append(checkpoint)
        record["knn_accuracy"] = checkpoint["knn_accuracy"]

    def _finish(self, epoch: int, stopped: str | None) -> None:
        if not self.metrics["checkpoints"]:
            raise OutOfTime("pretraining was stopped before its first batch ended")
        trained = self.metrics["epochs"][-1]["epoch"]
        self.metrics["epochs_run"] = trained
        if stopped:
            self.metrics["stopped"] = stopped
        self.metrics["seconds"] = time.perf_counter() - self.started
        write_json(self.job.work / METRICS_NAME, self.metrics)

    def _emit(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)


# ---------------------------------------------------------------------------
# The stage inside a search

# Without --pretrain-epochs, a search with --timeout gives the pretraining stage this
# share of its budget, and plans this many epochs as the ceiling.
SEARCH_BUDGET_SHARE = 0.3
SEARCH_DEFAULT_EPOCHS = 50


def search_stage(
    unlabelled: str | os.PathLike | torch.Tensor,
    *,
    method: str = "simclr",
    epochs: int | None = None,
    timeout: float | None = None,
    weights: str | None = None,
    batch_size: int = 128,
) -> Callable[[Any, Any], PretrainResult]:
    """A ``pre_search`` hook: pretrain once (cached), then search ``init`` over the checkpoints.

    The pool is ``unlabelled`` plus the search's labelled training images; labels never
    enter the loss, but the search's validation split scores each checkpoint by k-NN.
    Without ``epochs``, the stage gets :data:`SEARCH_BUDGET_SHARE` of ``timeout`` (when
    there is one) and at most :data:`SEARCH_DEFAULT_EPOCHS` epochs. ``init`` then takes
    the path of every checkpoint, the longest-trained first (the default first trial
    takes the first choice), and ``weights`` (or ``"scratch"``).
    """

    def hook(setup, study) -> PretrainResult:
        data: DataSplits = setup.data
        pool = Pool(unlabelled) if isinstance(unlabelled, torch.Tensor) else load_pool(unlabelled, data.image_size, setup.registry)
        extra = pool.images
        if tuple(extra.shape[1:]) != data.train.image_shape:
            raise AutoftError(f"unlabelled images are {tuple(extra.shape[1:])}, the labelled ones {data.train.image_shape}")
        setup.emit("pretrain_start", method=method, images=len(extra) + len(data.train))
        result = pretrain(
            setup.backbone,
            ImageTensors.concat([ImageTensors(extra), data.train]),  # the labelled images stay on disk if they are
            None,
            method=method,
            epochs=epochs or SEARCH_DEFAULT_EPOCHS,
            time_budget=None if epochs is not None or timeout is None else SEARCH_BUDGET_SHARE * timeout,
            batch_size=batch_size,
            weights=weights,
            labelled=data,
            deadline=setup.deadline,
            device=str(setup.device),
            seed=setup.seed,
        )
        setup.space.choices["init"] = [str(c.path) for c in reversed(result.checkpoints)] + [weights or "scratch"]
        setup.emit("pretrain_end", cached=result.cached, out=str(result.out), checkpoints=[(c.epoch, c.knn_accuracy) for c in result.checkpoints])
        skipped = {"skipped_images": len(pool.skipped), "skipped": [{"source": s, "reason": r} for s, r in pool.skipped[:100]]}
        write_json(setup.out / "pretrain.json", {**result.metrics, **skipped, "cache": str(result.out), "cached": result.cached})
        return result

    return hook
