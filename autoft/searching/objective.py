"""One trial: build a fresh backbone, fine-tune it on the data decoded once, report.

The same objective serves the search (an Optuna trial) and the retraining of a best
trial (``optuna.trial.FixedTrial``), so both run one code path.
"""

from __future__ import annotations

import gc
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
import torch

from autoft.data import DataSplits, ImageTensors
from autoft.errors import AutoftError
from autoft.io import write_json
from autoft.searching.space import SearchSpace
from autoft.searching.storage import process_identity
from autoft.backbones import build_backbone
from autoft.checkpoints import CHECKPOINT_NAME, save_checkpoint
from autoft.events import BatchEnd, EpochEnd
from autoft.metrics import is_better
from autoft.runtime import seed_everything
from autoft.trainer import OutOfTime, Trainer, TrainerConfig

Event = dict[str, Any]
STATE_NAME = "state.pt"  # the training state after the last finished epoch, for resuming


@dataclass
class SearchSetup:
    """What every trial of one search shares; data is decoded once, before the first trial."""

    backbone: str
    data: DataSplits
    out: Path
    space: SearchSpace
    strategies: dict[str, Any]  # name -> Strategy instance
    n_groups: int
    epochs: int
    metric: str = "accuracy"
    batch_size: int = 64
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    cv: int | None = None
    deadline: float | None = None  # time.monotonic() after which training stops
    data_source: str | None = None
    weights: str | None = None  # where every trial starts, unless a searched `init` says otherwise
    folds: list[tuple[np.ndarray, np.ndarray]] | None = None  # train/val indices into train+val, for --cv
    registry: Any = None
    on_event: Callable[[Event], None] | None = None

    def emit(self, kind: str, **fields: Any) -> None:
        if self.on_event is not None:
            self.on_event({"kind": kind, **fields})

    def trial_dir(self, number: int) -> Path:
        return self.out / "trials" / str(number)


def free_memory(device: torch.device) -> None:
    """Give back what a finished trial held before the next one allocates."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Objective:
    """``objective(trial) -> validation metric`` for ``study.optimize``."""

    def __init__(self, setup: SearchSetup):
        self.setup = setup

    def __call__(self, trial: optuna.Trial | optuna.trial.FixedTrial) -> float:
        setup = self.setup
        for key, value in process_identity().items():
            trial.set_user_attr(key, value)
        try:
            params = setup.space.suggest(trial, setup.strategies, setup.n_groups)
            setup.emit("trial_start", number=trial.number, params=params)
            if setup.cv:
                return self.cross_validate(trial, params)
            return self.train(trial, params)
        except optuna.TrialPruned:
            raise
        except OutOfTime:
            trial.set_user_attr("fail_reason", "the time budget ran out before its first epoch ended")
            trial.set_user_attr("crashed", True)  # not a verdict on its parameters: run it again next time
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted")
            trial.set_user_attr("crashed", True)
            raise
        except Exception as exc:  # bad hyperparameters, NaN loss, out of memory: record and go on
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}"[:2000])
            raise
        finally:
            free_memory(setup.device)

    # -- one train/validation split ------------------------------------------

    def train(self, trial, params: dict[str, Any]) -> float:
        """Fine-tune on the train split; keep the best epoch's weights under ``trials/<n>/``.

        A trial queued again after a crash continues from the last epoch its crashed
        original finished (``trials/<original>/state.pt``) instead of starting over.
        """
        setup = self.setup
        folder = setup.trial_dir(trial.number)
        shutil.rmtree(folder, ignore_errors=True)  # a retried number never reuses stale files
        origin = retried_from(trial)
        if origin is not None and (setup.trial_dir(origin) / STATE_NAME).is_file():
            shutil.copytree(setup.trial_dir(origin), folder)
        history: list[dict[str, float]] = []
        best: float | None = None
        backbone = self._build(params)
        config = self._trainer_config(state_file=folder / STATE_NAME)
        metric = setup.registry.metric(setup.metric) if setup.registry else None

        def on_event(event) -> None:
            nonlocal best
            if not isinstance(event, EpochEnd):
                self._on_batch(trial.number, event, config)
                return
            record, resumed = dict(event.record), event.resumed
            history.append(record)
            value = record[f"val_{setup.metric}"]
            if metric is None or is_better(metric, value, best):  # the weights the Trainer keeps: the first epoch with the top value
                best = value
                if not resumed:  # a resumed epoch's best weights came with the copied folder
                    save_checkpoint(folder / CHECKPOINT_NAME, backbone_name=setup.backbone, backbone=backbone, classes=setup.data.classes, image_size=setup.data.image_size, params=params, data=setup.data_source, seed=setup.seed)
            trial.set_user_attr("history", history)
            trial.report(value, record["epoch"])
            if resumed:
                trial.set_user_attr("resumed_from", {"trial": origin, "epoch": record["epoch"]})
            setup.emit("epoch", number=trial.number, epoch=record["epoch"], epochs=event.epochs, value=value, record=record)
            config.deadline = setup.deadline  # a hook may have moved the deadline
            if trial.should_prune():
                raise optuna.TrialPruned(f"val {setup.metric} {value:.4f} at epoch {record['epoch']}")

        state_file = folder / STATE_NAME
        try:
            result = Trainer(backbone, setup.data, params, config, registry=setup.registry, on_event=on_event).fit()
        except (optuna.TrialPruned, FloatingPointError, AutoftError):
            state_file.unlink(missing_ok=True)  # a verdict on its parameters: it will not run again
            raise
        finally:
            del backbone
        if result.stopped == "interrupted":
            raise KeyboardInterrupt
        if result.stopped == "deadline":
            trial.set_user_attr("cut_short", f"the time budget ran out after {len(history)} of {setup.epochs} epochs")
            return best
        state_file.unlink(missing_ok=True)
        self._write_confusion(folder, result.val["predictions"], setup.data.val.labels)
        return float(result.val[setup.metric])

    def _trainer_config(self, state_file: Path | None = None) -> TrainerConfig:
        setup = self.setup
        return TrainerConfig(
            epochs=setup.epochs, batch_size=setup.batch_size, device=setup.device, seed=setup.seed, metric=setup.metric,
            deadline=setup.deadline, state_file=state_file, state_interval=0,
        )  # fmt: skip

    def _build(self, params: dict[str, Any]):
        setup = self.setup
        seed_everything(setup.seed)  # the same initial weights in every trial: differences come from the recipe
        return build_backbone(setup.backbone, num_classes=setup.data.num_classes, dropout=params["dropout"], weights=params.get("init", setup.weights), registry=setup.registry)

    def _on_batch(self, number: int, event, config: TrainerConfig) -> None:
        if isinstance(event, BatchEnd):
            self.setup.emit("batch", number=number, step=event.step, steps=event.steps)
            config.deadline = self.setup.deadline

    def _write_confusion(self, folder: Path, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        if folder.is_dir():
            write_json(folder / "confusion.json", confusion(labels, predictions, self.setup.data.num_classes))

    # -- k-fold cross-validation ---------------------------------------------

    def cross_validate(self, trial, params: dict[str, Any]) -> float:
        """Mean metric over stratified folds of train+val, one fold reported per step.

        Following Optuna's advice for its WilcoxonPruner, a trial it stops returns the
        mean of the folds it scored, and is marked ``pruned_after_folds``.
        """
        setup = self.setup
        pool = ImageTensors.concat([setup.data.train, setup.data.val])
        folds = setup.folds or stratified_folds(pool.labels.numpy(), setup.cv, setup.seed)
        scores: list[float] = []
        histories: dict[str, list] = {}
        # Optuna's advice: shuffle the order per trial so pruning does not favour early folds.
        order = np.random.default_rng(setup.seed + trial.number).permutation(len(folds))
        for position, fold in enumerate(order):
            train_index, val_index = folds[fold]
            data = DataSplits(train=pool.subset(train_index), val=pool.subset(val_index), test=None, classes=setup.data.classes, image_size=setup.data.image_size, hflip=setup.data.hflip)
            backbone = self._build(params)
            config = self._trainer_config()
            try:
                result = Trainer(backbone, data, params, config, registry=setup.registry, on_event=lambda event: self._on_batch(trial.number, event, config)).fit()
                if result.stopped == "interrupted":
                    raise KeyboardInterrupt
                if result.stopped == "deadline":
                    raise OutOfTime()  # a fold cut short is not a fold's score
            except OutOfTime:
                if not scores:
                    raise
                trial.set_user_attr("cut_short", f"the time budget ran out after {len(scores)} of {setup.cv} folds")
                return float(np.mean(scores))
            finally:
                del backbone
                free_memory(setup.device)
            score = float(result.val[setup.metric])
            scores.append(score)
            histories[str(int(fold))] = result.history
            trial.set_user_attr("fold_history", histories)
            trial.set_user_attr("fold_scores", {str(int(k)): s for k, s in zip(order, scores)})
            trial.report(score, int(fold))
            setup.emit("fold", number=trial.number, fold=position + 1, folds=setup.cv, value=score)
            if position + 1 < len(folds) and trial.should_prune():
                trial.set_user_attr("pruned_after_folds", position + 1)
                return float(np.mean(scores))
        return float(np.mean(scores))


def retried_from(trial) -> int | None:
    """The number of the crashed trial that ``trial`` runs again, if it is such a retry."""
    study = getattr(trial, "study", None)  # a FixedTrial has none
    if study is None:
        return None
    frozen = next((t for t in study.get_trials(deepcopy=False) if t.number == trial.number), None)
    return frozen.system_attrs.get("failed_trial") if frozen else None  # set by Optuna's retry callback


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    smallest = int(np.bincount(labels)[np.bincount(labels) > 0].min())
    if smallest < k:
        raise AutoftError(f"--cv {k}: the smallest class has only {smallest} images; use --cv {max(2, smallest)} or fewer folds")
    return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels))


def confusion(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> list[list[int]]:
    """Rows are true classes, columns predicted ones."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels.numpy(), predictions.numpy(), labels=list(range(num_classes))).tolist()


def read_confusion(folder: Path) -> list[list[int]] | None:
    try:
        return json.loads((folder / "confusion.json").read_text())
    except (OSError, ValueError):
        return None
