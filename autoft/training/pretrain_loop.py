"""The loop of a pretraining stage: the method's loss over the pool, within the stage's budget,
saving a checkpoint at the planned points; see :mod:`autoft.training.pretraining`."""

from __future__ import annotations

import time
from contextlib import closing
from typing import TYPE_CHECKING, Any, Callable

import torch

from autoft.data import to_float
from autoft.errors import AutoftError
from autoft.core.io import write_json
from autoft.model.backbones import build_backbone
from autoft.core.budget import Budget
from autoft.core.events import BatchEnd, EpochEnd, Event
from autoft.core.runtime import autocast, cosine_with_warmup, seed_everything, stop_requested
from autoft.training.trainer import OutOfTime

from autoft.training.pretrain_pool import METRICS_NAME, checkpoint_epochs, evaluation_split, knn_accuracy, save_pretrained, stage_seconds

if TYPE_CHECKING:
    from autoft.training.pretraining import PretrainJob


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
        self.budget = config.budget or Budget()
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
            "time_budget": stage_seconds(config.budget),
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
        if self.budget.hard_expired() or (self.trained and self.budget.expired()):
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
        seconds = stage_seconds(self.config.budget)
        if seconds is not None and not last:
            elapsed = time.perf_counter() - self.started
            if epoch == 1:
                # The first epoch tells how many fit; the schedule and checkpoints follow the new plan.
                fits = max(1, int(seconds / max(elapsed, 1e-9)))
                if fits < self.config.epochs:
                    self.planned_epochs = fits
                    self.saves = checkpoint_epochs(fits, self.config.checkpoints)
            elif elapsed + record["seconds"] > seconds and epoch < self.planned_epochs:
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
