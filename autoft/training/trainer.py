"""The fine-tuning loop: a :class:`Trainer` with one method per phase.

``autoft train`` runs one Trainer; ``autoft search`` runs one per trial on data decoded
once. Strategies and regularisers take part through the lifecycle in
:mod:`autoft.lifecycle`. Training length is epochs (passes over the training images) or
a number of optimizer steps with an evaluation every ``eval_every`` steps; either way an
"epoch" below is one evaluation period. A run stops after the current batch at its
``deadline``, on :meth:`Trainer.stop` or on Ctrl-C (:mod:`autoft.core.runtime`), and keeps its
best finished epoch.
"""

from __future__ import annotations

import math
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from autoft import plugins
from autoft.model.backbones import freeze_batchnorm
from autoft.model.checkpoints import load_training_state, save_training_state
from autoft.data import DataSplits, Normalize, to_float
from autoft.errors import AutoftError
from autoft.core.events import BatchEnd, EpochEnd, Event, TrainEnd, TrainStart
from autoft.lifecycle import PluginCallback, PluginError, TrainContext, apply_strategy, optimizer_group, optimizer_groups, plugin_label
from autoft.model.metrics import evaluate, is_better, metric_specs
from autoft.model.recipe import NO_REGULARIZER, Recipe
from autoft.core.runtime import as_device, autocast, cosine_with_warmup, layout, seed_everything, stop_requested
from autoft.specs import Backbone

from autoft.training.trainer_parts import (  # noqa: F401 - a run's configuration, result and ways of ending
    DIVERGENCE_FACTOR, SPIKE_FACTOR, STATE_INTERVAL, BatchStream, Diverged, FitResult, Interrupted, OutOfTime, TrainerConfig, build_augmentation,
)


class Trainer:
    """Fine-tune ``backbone`` in place on ``data`` with ``recipe``; :meth:`fit` keeps the best epoch's weights.

    ``on_event`` receives :mod:`autoft.core.events` (and may raise to stop the run);
    ``callbacks`` are extra lifecycle objects (beside the recipe's strategy and
    regulariser); ``unlabelled`` uint8 images are handed to callbacks as ``ctx.unlabelled``.
    """

    def __init__(
        self, backbone: Backbone, data: DataSplits, recipe: Recipe | dict[str, Any], config: TrainerConfig | None = None, *,
        registry: plugins.Registry, on_event: Callable[[Event], None] | None = None,
        callbacks: Sequence[Any] = (), unlabelled: torch.Tensor | None = None,
    ):  # fmt: skip
        self.backbone, self.data = backbone, data
        self.recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_params(recipe)
        self.config = config or TrainerConfig()
        self.registry = registry
        self.on_event = on_event
        self.device = as_device(self.config.device)
        self.metrics = metric_specs(self.config.metric, self.registry)
        self.extra_callbacks, self.unlabelled = list(callbacks), unlabelled
        self._stop = False

    def stop(self) -> None:
        """Stop after the current batch (safe to call from a signal handler or another thread)."""
        self._stop = True

    def fit(self) -> FitResult:
        self._setup()
        first_epoch = self._restore()
        self._emit(TrainStart(epochs=self.epochs, steps=self.total_steps, steps_per_epoch=self.period, first_epoch=first_epoch))
        stopped = None
        try:
            for epoch in range(first_epoch, self.epochs + 1):
                stopped = self._train_epoch(epoch)
                if stopped:
                    break
                self._end_epoch(epoch)
        finally:
            if self._hook is not None:
                self._hook.remove()
        return self._finish(stopped)

    # -- setup ---------------------------------------------------------------

    def _setup(self) -> None:
        cfg, data, device, model = self.config, self.data, self.device, self.backbone.model
        if len(data.train) < 2:
            raise AutoftError(f"need at least 2 training images, found {len(data.train)}")
        labels = torch.cat([data.train.labels, data.val.labels])
        if int(labels.min()) < 0 or int(labels.max()) >= data.num_classes:
            raise AutoftError(f"labels must index the {data.num_classes} classes, found labels from {int(labels.min())} to {int(labels.max())}")
        unlabelled = self.unlabelled
        if unlabelled is not None and (unlabelled.dtype != torch.uint8 or tuple(unlabelled.shape[1:]) != data.train.image_shape):
            raise AutoftError(f"unlabelled images must be uint8 {data.train.image_shape} like the labelled ones, got {unlabelled.dtype} {tuple(unlabelled.shape[1:])}")
        seed_everything(cfg.seed)
        self.params = self.recipe.params()
        self.callbacks = self._callbacks()
        plan = apply_strategy(self.callbacks[0], self.backbone, self.params, self.registry.strategy(self.recipe.strategy).api_version)
        model.to(device)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        self.net = torch.nn.Sequential(Normalize(self.backbone.mean, self.backbone.std), model).to(device)
        groups = [
            group
            for g in plan.param_groups
            for group in optimizer_groups([p for p in g["params"] if p.requires_grad], self.backbone, self.params, g.get("lr_scale", 1.0), g.get("weight_decay"))
        ]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise AutoftError("the strategy left no parameter to train")
        optimizer = torch.optim.AdamW(groups, fused=device.type == "cuda")
        self.augment = build_augmentation(self.recipe, data.image_size, data.hflip).to(device)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.stream = BatchStream(len(data.train), cfg.batch_size, self.generator)
        self._plan_steps()
        self.ctx = TrainContext(
            backbone=self.backbone, params=self.params, optimizer=optimizer, device=device, num_classes=data.num_classes,
            epochs=self.epochs, steps=self.total_steps, steps_per_epoch=self.period, unlabelled=self.unlabelled, hflip=data.hflip,
        )  # fmt: skip
        self.transformers = [c for c in self.callbacks if "transform_batch" in c.hooks]
        self._place_training_set()
        self.history: list[dict[str, float]] = []
        self.best: tuple[float, int, dict[str, torch.Tensor] | None, dict[str, Any]] | None = None  # value, epoch, weights (None: the current ones), val
        self.global_step, self._last_save = 0, time.monotonic()
        self._hook = self._features_hook()

    def _callbacks(self) -> list[PluginCallback]:
        """The strategy first, then the regulariser, then the caller's callbacks."""
        strategy = self.registry.strategy(self.recipe.strategy).factory()
        found = [PluginCallback(strategy, plugin_label(self.registry, "strategies", self.recipe.strategy), kind="strategies", name=self.recipe.strategy)]
        if self.recipe.regularizer != NO_REGULARIZER:
            regularizer = self.registry.regularizer(self.recipe.regularizer).factory()
            label = plugin_label(self.registry, "regularizers", self.recipe.regularizer)
            found.append(PluginCallback(regularizer, label, kind="regularizers", name=self.recipe.regularizer))
        return found + [PluginCallback(c, type(c).__name__) for c in self.extra_callbacks]

    def _plan_steps(self) -> None:
        cfg = self.config
        if cfg.steps is None and cfg.epochs < 1:
            raise AutoftError("--epochs must be at least 1")
        if (cfg.steps is not None and cfg.steps < 1) or (cfg.eval_every is not None and cfg.eval_every < 1):
            raise AutoftError("the number of steps and the evaluation interval must be at least 1")
        per_pass = self.stream.steps_per_pass
        self.total_steps = cfg.steps or cfg.epochs * per_pass
        self.period = min(cfg.eval_every or per_pass, self.total_steps)
        self.epochs = math.ceil(self.total_steps / self.period)
        self.lr_factor = cosine_with_warmup(self.total_steps, min(self.period, self.total_steps // 10 + 1))

    def _place_training_set(self) -> None:
        """A set in memory is indexed in place; a set on disk is read a batch at a time (see :meth:`_batches`)."""
        train = self.data.train
        self.train_images = None if train.on_disk else train.images
        self.train_labels = train.labels
        # On a GPU the whole uint8 training set usually fits; moving it once beats a copy per batch.
        if self.train_images is not None and self.device.type == "cuda":
            try:
                self.train_images, self.train_labels = self.train_images.to(self.device), self.train_labels.to(self.device)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()  # too big for this GPU: copy it batch by batch instead

    def _features_hook(self):
        """Capture the head's input (the pooled features) during the forward pass, for loss terms."""
        self.loss_callbacks = [c for c in self.callbacks if "loss_term" in c.hooks]
        self._features: torch.Tensor | None = None
        if not self.loss_callbacks:
            return None
        first = self.backbone.head.params[0]
        head = self.backbone.model.get_submodule(first.rpartition(".")[0])

        def keep(module, inputs) -> None:
            self._features = inputs[0] if inputs else None

        return head.register_forward_pre_hook(keep)

    # -- resuming -------------------------------------------------------------

    def _restore(self) -> int:
        """Continue from the state file when there is one; return the first epoch to train."""
        path = self.config.state_file
        state = load_training_state(Path(path)) if path is not None and Path(path).is_file() else None
        if state is None or len(state["callbacks"]) != len(self.callbacks):
            return 1
        model = self.backbone.model
        model.load_state_dict(state["model"])
        by_name = dict(model.named_parameters())
        trainable = set(state["trainable"])
        for name, p in by_name.items():
            p.requires_grad_(name in trainable)
        groups = [optimizer_group([by_name[n] for n in g["names"]], self.params, g["lr_scale"], g["weight_decay"]) for g in state["layout"]]
        self.ctx.optimizer = torch.optim.AdamW(groups, fused=self.device.type == "cuda")
        self.ctx.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.stream.load_state_dict(state["stream"])
        self.global_step = state["global_step"]
        for callback, saved in zip(self.callbacks, state["callbacks"]):
            callback.load_state_dict(saved)
        self.history, self.best = state["history"], state["best"]
        for record in self.history:
            self.ctx.record = record
            self._emit(EpochEnd(epoch=record["epoch"], epochs=self.epochs, record=record, value=record[f"val_{self.config.metric}"], resumed=True))
        return self.history[-1]["epoch"] + 1 if self.history else 1

    def _save_state(self) -> None:
        path = self.config.state_file
        if path is None or time.monotonic() - self._last_save < self.config.state_interval:
            return
        names = {id(p): n for n, p in self.backbone.model.named_parameters()}
        optimizer = self.ctx.optimizer
        state = {
            "model": self.backbone.model.state_dict(),
            "trainable": [n for n, p in self.backbone.model.named_parameters() if p.requires_grad],
            "layout": [{"names": [names[id(p)] for p in g["params"]], "lr_scale": g["lr_scale"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups],
            "optimizer": optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "stream": self.stream.state_dict(),
            "global_step": self.global_step,
            "callbacks": [c.state_dict() for c in self.callbacks],
            "history": self.history,
            "best": self.best,
        }
        save_training_state(Path(path), state)
        self._last_save = time.monotonic()

    # -- one epoch -------------------------------------------------------------

    def _train_epoch(self, epoch: int) -> str | None:
        """Train one evaluation period; return why it stopped early, or None."""
        self._epoch_started = time.perf_counter()
        self.ctx.epoch, self.ctx.step = epoch, self.global_step
        for callback in self.callbacks:
            callback.epoch_hook("on_epoch_start", self.ctx)
        self._adopt_unfrozen()
        self.net.train()
        freeze_batchnorm(self.backbone.model, every=self.params.get("bn") == "keep")
        steps = min(self.period, self.total_steps - self.global_step)
        # Summed on the device (cross-entropy, then each loss term): reading them every step would stall a GPU.
        self._sums = torch.zeros(1 + len(self.loss_callbacks), device=self.device)
        self._first_bad = torch.full_like(self._sums, -1)
        self._seen = 0
        # The period's batches are drawn now so that a set on disk can be read a batch ahead. The
        # stream's state is saved only when a period ends, so a resumed run draws the same ones.
        indices = [self.stream.next() for _ in range(steps)]
        with closing(self._batches(indices)) as batches:
            for step, (images, labels) in enumerate(batches):
                reason = self._stop_reason()
                if reason:
                    return reason
                self._train_step(images, labels)
                self._emit(BatchEnd(step=step + 1, steps=steps, global_step=self.global_step, total_steps=self.total_steps))
        return None

    def _batches(self, indices: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 images and labels of each batch: indexed where the set lies, or read from disk (the next one read ahead)."""
        if self.train_images is None:
            return self.data.train.read_batches(indices, pin_memory=self.device.type == "cuda")
        where = self.train_images.device
        return ((self.train_images[index], self.train_labels[index]) for index in (i.to(where) for i in indices))

    def _adopt_unfrozen(self) -> None:
        """A parameter a callback set trainable without a group still trains, at the base learning rate;
        a group a callback added to the optimizer itself keeps its learning rate under the schedule."""
        for group in self.ctx.optimizer.param_groups:
            if "base_lr" not in group:
                group["base_lr"], group["lr_scale"] = group["lr"], group["lr"] / self.params["lr"]
        grouped = {id(p) for g in self.ctx.optimizer.param_groups for p in g["params"]}
        loose = [p for p in self.backbone.model.parameters() if p.requires_grad and id(p) not in grouped]
        if loose:
            self.ctx.unfreeze(loose)

    def _stop_reason(self) -> str | None:
        cfg = self.config
        if self._stop or stop_requested() or (cfg.should_stop is not None and cfg.should_stop()):
            return "interrupted"
        if cfg.deadline is not None and time.monotonic() > cfg.deadline:
            return "deadline"
        return None

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        device, ctx = self.device, self.ctx
        ctx.step = self.global_step
        images = self.augment(to_float(images, device))
        labels = labels.to(device, non_blocking=True)
        targets = F.one_hot(labels, self.data.num_classes).float() if self.transformers or self.loss_callbacks else None
        for callback in self.transformers:
            images, targets = callback.transform_batch(ctx, images, targets)
        with autocast(device):
            logits = self.net(layout(images, device)).float()
        cross_entropy = F.cross_entropy(logits, targets if self.transformers else labels, label_smoothing=self.recipe.label_smoothing)
        loss, parts = cross_entropy, [cross_entropy.detach()]
        if self.loss_callbacks:
            features = self._pooled_features(images)
            for callback in self.loss_callbacks:
                term = callback.loss_term(ctx, logits, targets, features)
                term = torch.zeros((), device=device) if term is None else term.float()
                loss = loss + term
                parts.append(term.detach())
        optimizer = ctx.optimizer
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        factor = self.lr_factor(self.global_step)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        optimizer.step()
        values = torch.stack(parts)
        self._first_bad = torch.where(~torch.isfinite(values) & (self._first_bad < 0), float(self.global_step), self._first_bad)
        self._sums += values * len(labels)
        self._seen += len(labels)
        self.global_step += 1

    def _pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        features = self._features
        if features is not None and features.ndim == 2 and features.shape[1] == self.backbone.num_features:
            return features.float()
        with autocast(self.device):  # the head's input is not pooled features here: ask embed()
            return self.backbone.embed(self.net[0](layout(images, self.device))).float()

    # -- the end of an epoch ----------------------------------------------------

    def _end_epoch(self, epoch: int) -> None:
        losses = (self._sums / max(self._seen, 1)).tolist()  # one host sync per epoch
        self._check_losses(epoch, losses, self._first_bad.tolist())
        cfg = self.config
        val = evaluate(self.net, self.data.val, self.device, cfg.batch_size * 2, self.metrics, self.registry)
        if not math.isfinite(val["loss"]):  # the last step's update broke the weights after its loss was taken
            raise Diverged(f"diverged: the validation loss is {val['loss']} after epoch {epoch}; the learning rate may be too high")
        record = {
            "epoch": epoch,
            "step": self.global_step,
            "train_loss": sum(losses),
            **({"train_cross_entropy": losses[0]} if self.loss_callbacks else {}),
            "val_loss": val["loss"],
            **{f"val_{m.name}": val[m.name] for m in self.metrics},
            "seconds": time.perf_counter() - self._epoch_started,
        }
        self.history.append(record)
        value = val[cfg.metric]
        if cfg.keep == "last":
            self.best = (value, epoch, None, val)  # None: the weights the run ends with
        elif is_better(self.metrics[0], value, None if self.best is None else self.best[0]):
            weights = {k: v.detach().to("cpu", copy=True) for k, v in self.backbone.model.state_dict().items()}
            self.best = (value, epoch, weights, val)
        self.ctx.record = record
        for callback in self.callbacks:
            callback.epoch_hook("on_epoch_end", self.ctx)
        self._save_state()
        self._emit(EpochEnd(epoch=epoch, epochs=self.epochs, record=record, value=value))

    def _check_losses(self, epoch: int, losses: list[float], first_bad: list[float]) -> None:
        """Blame a non-finite loss term on its plugin when it went bad first; else the recipe diverged."""
        cross_entropy, *terms = losses
        never = math.inf
        ce_bad = first_bad[0] if first_bad[0] >= 0 else never
        for callback, value, bad in zip(self.loss_callbacks, terms, first_bad[1:]):
            if not math.isfinite(value) and 0 <= bad < ce_bad:
                raise PluginError(f"{callback.label}: {callback.named('loss_term')} returned {value} at step {int(bad)} (epoch {epoch}) while the cross-entropy was finite")
        if not math.isfinite(sum(losses)):
            raise Diverged(f"loss is {sum(losses)} in epoch {epoch}; the learning rate may be too high")
        chance = math.log(self.data.num_classes)
        if cross_entropy > DIVERGENCE_FACTOR * max(chance, 1.0):
            raise Diverged(
                f"diverged: train loss {cross_entropy:.3g} in epoch {epoch} is over {DIVERGENCE_FACTOR:g}x chance level "
                f"({chance:.3g}); the learning rate may be too high"
            )

    def _check_chance_level(self) -> None:
        """A loss that spiked and a model no better than always answering the commonest class: diverged."""
        chance = max(math.log(self.data.num_classes), 1.0)
        peak = max(r.get("train_cross_entropy", r["train_loss"]) for r in self.history)  # loss terms are no divergence
        majority = float(torch.bincount(self.data.val.labels).max()) / len(self.data.val)
        accuracy = max(r["val_accuracy"] for r in self.history)
        if peak > SPIKE_FACTOR * chance and accuracy <= majority + 0.02:
            raise Diverged(
                f"diverged: train loss rose to {peak:.3g} ({peak / chance:.1f}x chance level) and the best validation "
                f"accuracy, {accuracy:.3f}, is chance level ({majority:.3f}); the learning rate may be too high"
            )

    def _finish(self, stopped: str | None) -> FitResult:
        if self.best is None:
            if stopped == "deadline":
                raise OutOfTime("the time budget ran out before the first epoch ended")
            raise Interrupted("stopped before the first epoch ended")
        self._check_chance_level()
        value, best_epoch, weights, val = self.best
        if weights is not None:
            self.backbone.model.load_state_dict(weights)
        self._emit(TrainEnd(best_epoch=best_epoch, stopped=stopped))
        return FitResult(history=self.history, best_epoch=best_epoch, val=val, stopped=stopped)

    def _emit(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)
