"""One trial: fine-tune a fresh backbone on each split of the labelled pool, and score it.

With a single train/validation split, a trial reports its validation metric at every
evaluation point (the pruner's rungs) and keeps its best weights under ``trials/<n>/``.
With k folds, it reports one score per fold (the Wilcoxon pruner compares folds) and
keeps its out-of-fold predictions instead of weights. Either way it saves the
predictions it made for images it did not train on, for ensemble selection, and the
step at which it peaked, for the refit.

The same objective serves the search (an Optuna trial) and the retraining of a trial
(``optuna.trial.FixedTrial``), so both run one code path.

A full disk ends the search rather than the trial (every later one would meet it too):
the trial is failed, to be run again by the next run, where the storage can still be
written, and left RUNNING for the next run to recover where it cannot; the search stops
with one :class:`~autoft.core.io.DiskFull` error naming the disk (:func:`stop_on_full_disk`).
"""

from __future__ import annotations

import gc
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import optuna
import torch

from autoft.core.budget import Budget
from autoft.model.checkpoints import CHECKPOINT_NAME, discard_training_state
from autoft.core.events import BatchEnd, EpochEnd, FoldEnd, TrialEvent, TrialStart
from autoft.core.io import DiskFull, atomic_path, disk_full_error, file_lock
from autoft.lifecycle import PluginError
from autoft.training.fitting import FitRequest, Fitted, fit
from autoft.searching.plan_search import NOISY_VAL
from autoft.searching.records import TrialRecord
from autoft.searching.session import Session
from autoft.searching.storage import is_surplus, process_identity, resume_point, retry_chains, storage_folder
from autoft.training.trainer import STATE_INTERVAL, OutOfTime, TrainerConfig

STATE_NAME = "state.pt"  # the training state after the last finished evaluation, for resuming
PREDICTIONS_NAME = "predictions.npy"  # probabilities for the images the trial did not train on
CLEANUP_LOCK = ".cleanup.lock"  # in the search's folder: held to delete trial folders or to take one over


def free_memory(device: torch.device) -> None:
    """Give back the GPU memory a finished trial held before the next one allocates. (On a
    CPU, Python's own collector suffices: a full collection costs ~0.4 s a trial there.)"""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


class Objective:
    """``objective(trial) -> validation metric`` for ``study.optimize``."""

    def __init__(self, session: Session):
        self.session = session

    def __call__(self, trial: optuna.Trial | optuna.trial.FixedTrial) -> float:
        session = self.session
        TrialRecord.write(trial, **process_identity(), threads=torch.get_num_threads())  # threads: with --jobs, this worker's share of the cores
        if TrialRecord.of_running(trial).crashed:  # a retry, given its crashed attempt's attributes by Optuna: its own failure is no crash
            TrialRecord.write(trial, crashed=False, fail_reason="")
        total = session.ctx.config.trials
        if total is not None and hasattr(trial, "study") and is_surplus(trial.number, trial.study.get_trials(deepcopy=False), total):
            # Another worker took the last place: this one never trains. FAIL, marked surplus, so that
            # no count, leaderboard or report takes it for a trial (PRUNED would count as one).
            TrialRecord.write(trial, surplus=True, fail_reason=f"the study already holds its {total} trials")
            trial.study.stop()
            raise Surplus(trial.number)
        try:
            params = session.suggest_pseudo_labels(trial, session.ctx.space.suggest(trial, session.ctx.strategies, session.ctx.n_groups, session.state.left_out))
            session.emit(TrialStart(number=trial.number, params=params))
            if session.ctx.cross_validated:
                return self.cross_validate(trial, params)
            return self.single_split(trial, params)
        except optuna.TrialPruned:
            raise
        except OutOfTime:
            # not a verdict on its parameters: run it again next time
            TrialRecord.write(trial, fail_reason="the time budget ran out before its first evaluation", crashed=True)
            raise
        except KeyboardInterrupt:
            TrialRecord.write(trial, fail_reason="interrupted", crashed=True)
            raise
        except Exception as exc:  # bad hyperparameters, divergence, out of memory: record and go on
            full = disk_full_error(exc, storage_folder(session.ctx.storage_url) or session.ctx.out)
            if full is not None:
                raise StopSearch(self._give_up(trial, full)) from None
            # A mistake in the command's own ranges (checked before any work, unless a hook changed
            # them since) fails every trial alike: none of them is a trial of a recipe, none counts.
            user_error = session.ctx.space.value_problem(session.ctx.n_groups, session.ctx.strategies) is not None
            TrialRecord.write(trial, fail_reason=f"{type(exc).__name__}: {exc}"[:2000], user_error=user_error)
            if isinstance(exc, PluginError) and hasattr(trial, "study") and session.state.left_out.add(exc, trial.number, completed_with(trial.study)):
                if session.exhausted():
                    trial.study.stop()  # every choice's plugin failed: no trial is left to run
            raise
        finally:
            free_memory(session.ctx.device)

    @staticmethod
    def _give_up(trial, error: DiskFull) -> DiskFull:
        """Fail the trial, to be run again (as after a crash), where the storage can still be written."""
        study = getattr(trial, "study", None)
        if study is None:  # a FixedTrial: no storage
            return error
        try:
            TrialRecord.write(trial, fail_reason=str(error), crashed=True)  # not a verdict on its parameters
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except Exception:  # noqa: BLE001 - the storage is on the full disk too: the trial stays RUNNING and the next run recovers it
            pass
        return error

    # -- one fit ---------------------------------------------------------------

    def fit(self, params: dict[str, Any], split: int | None, *, number: int, steps: int | None = None, eval_every: int | None = None,
            budget: Budget | None = None, state_file: Path | None = None, on_epoch=None, seed: int | None = None) -> Fitted:  # fmt: skip
        """Train a fresh backbone on split ``split`` (``None``: every labelled image) within
        ``budget`` (by default what trials may spend now, the refit's reserve kept back), seeded
        by ``seed`` (by default ``--seed``)."""
        session = self.session
        ctx = session.ctx
        plan = ctx.plan

        def on_event(event) -> None:
            if isinstance(event, EpochEnd) and on_epoch is not None:
                on_epoch(event)
            if isinstance(event, (BatchEnd, EpochEnd)):
                session.emit(TrialEvent(number=number, event=event))

        trainer = TrainerConfig(
            steps=steps or plan.steps, eval_every=eval_every or plan.eval_every, batch_size=plan.batch_size, device=ctx.device, seed=ctx.config.seed if seed is None else seed,
            metric=ctx.config.metric, state_file=state_file, state_interval=float(os.environ.get("AUTOFT_STATE_INTERVAL", STATE_INTERVAL)),
            keep=kept_weights(session, split),
        )  # fmt: skip
        request = FitRequest(
            backbone=ctx.config.backbone, data=session.fit_data(split, params), recipe=params, trainer=trainer, registry=ctx.registry,
            weights=params.get("init", ctx.weights), budget=budget or session.trials_budget(), source=ctx.data_source, on_event=on_event,
            unlabelled=ctx.unlabelled,
        )  # fmt: skip
        fitted = fit(request)
        if not fitted.resumed:
            session.state.fits.append((fitted.seconds, fitted.steps))
        return fitted

    # -- one train/validation split ------------------------------------------

    def single_split(self, trial, params: dict[str, Any]) -> float:
        """Fine-tune on the train split, report every evaluation, keep the best weights (the last on a small split: :func:`kept_weights`).

        A trial queued again after a crash continues from the last state saved by its
        crashed attempts (``trials/<attempt>/state.pt``, the newest) instead of starting over:
        it takes that attempt's folder as its own, so no superseded copy is left behind.
        """
        session = self.session
        folder = session.ctx.trial_dir(trial.number)
        origin = take_over_state(trial, session.ctx.trial_dir, session.ctx.out / CLEANUP_LOCK)
        history: list[dict[str, Any]] = []
        metric = session.ctx.config.metric

        anchor = is_default(trial)  # the default recipe at full strength is what every other model must beat: never pruned

        def on_epoch(event: EpochEnd) -> None:
            history.append(dict(event.record))
            TrialRecord.write(trial, history=history)
            trial.report(event.value, event.epoch)
            if event.resumed:
                TrialRecord.write(trial, resumed_from={"trial": origin, "epoch": event.epoch})
            elif not anchor and event.epoch < event.epochs and trial.should_prune():  # a trial that ran all its evaluations is not pruned
                raise optuna.TrialPruned(f"val {metric} {event.value:.4f} at evaluation {event.epoch}")

        state_file = folder / STATE_NAME
        try:
            fitted = self.fit(params, 0, number=trial.number, state_file=state_file, on_epoch=on_epoch)
        except (optuna.TrialPruned, FloatingPointError):
            discard_training_state(state_file)  # a verdict on its parameters: it will not run again
            raise
        self._keep(trial, folder, params, fitted, session.ctx.splits[0][1])
        discard_training_state(state_file)
        return float(fitted.result.val[metric])

    def _keep(self, trial, folder: Path, params, fitted: Fitted, val_index: np.ndarray) -> None:
        session, result = self.session, fitted.result
        if result.stopped == "interrupted":
            raise KeyboardInterrupt
        if result.stopped == "deadline":
            TrialRecord.write(trial, cut_short=f"the time budget ran out after {len(result.history)} of {session.ctx.plan.evaluations} evaluations")
        folder.mkdir(parents=True, exist_ok=True)
        fitted.save(folder / CHECKPOINT_NAME, params)
        save_predictions(folder, val_index, result.val["probabilities"])
        TrialRecord.write(trial, best_step=fitted.best_step, peaked_at_end=fitted.peaked_at_end)

    # -- k-fold cross-validation ---------------------------------------------

    def cross_validate(self, trial, params: dict[str, Any]) -> float:
        """Mean metric over the folds, one fold reported per step; out-of-fold predictions kept.

        Following Optuna's advice for its WilcoxonPruner, a trial it stops returns the
        mean of the folds it scored, and is marked ``pruned_after_folds``; the fold order
        is shuffled per trial so pruning does not favour early folds.
        """
        session = self.session
        splits = session.ctx.splits
        scores: dict[int, float] = {}
        steps: list[int] = []
        at_end: list[bool] = []
        predictions = np.zeros((len(session.ctx.pool), session.ctx.data.num_classes), dtype=np.float32)
        counts = np.zeros(len(session.ctx.pool), dtype=np.int64)
        order = np.random.default_rng(session.ctx.config.seed + trial.number).permutation(len(splits))
        for position, split in enumerate(order):
            try:
                fitted = self.fit(params, int(split), number=trial.number)
            except OutOfTime:
                if not scores:
                    raise
                TrialRecord.write(trial, cut_short=f"the time budget ran out after {len(scores)} of {len(splits)} folds")
                break
            result = fitted.result
            if result.stopped == "interrupted":
                raise KeyboardInterrupt
            value = float(result.val[session.ctx.config.metric])
            scores[int(split)] = value
            steps.append(fitted.best_step)
            at_end.append(fitted.peaked_at_end)
            val_index = splits[split][1]
            predictions[val_index] += result.val["probabilities"].numpy()
            counts[val_index] += 1
            TrialRecord.write(trial, fold_scores={str(k): v for k, v in scores.items()}, best_step=int(np.median(steps)), peaked_at_end=sum(at_end) * 2 > len(at_end))
            trial.report(value, int(split))
            session.emit(FoldEnd(number=trial.number, fold=position + 1, folds=len(splits), value=value))
            if result.stopped == "deadline":
                TrialRecord.write(trial, cut_short=f"the time budget ran out in fold {position + 1} of {len(splits)}")
                break
            if position + 1 < len(splits) and not is_default(trial) and trial.should_prune():
                TrialRecord.write(trial, pruned_after_folds=position + 1)
                return float(np.mean(list(scores.values())))
        if len(scores) == len(splits):
            seen = counts > 0
            save_predictions(session.ctx.trial_dir(trial.number), np.flatnonzero(seen), torch.from_numpy(predictions[seen] / counts[seen, None]))
        return float(np.mean(list(scores.values())))


def kept_weights(session: Session, split: int | None) -> str:
    """Which weights a fit keeps (:class:`~autoft.training.trainer.TrainerConfig` ``keep``): its best
    evaluation's on a validation split of :data:`~autoft.searching.plan_search.NOISY_VAL` images or
    more; else its last. The best of eight evaluations on 4 images is a flattering score and a
    step chosen by chance: on textures (20 labelled, 5 folds of 4) every trial read 0.85 that
    way, the refit trained the 36 steps the median fold peaked at, and scored 0.775 on the test
    images; keeping the last weights, the trials read 0.70 to 0.80 and the refit, trained the
    trial's whole length, 0.855. The refit (``split`` None) keeps its last weights: its
    validation images are in its training set."""
    if split is None or len(session.ctx.splits[split][1]) < NOISY_VAL:
        return "last"
    return "best"


def completed_with(study: optuna.Study) -> Callable[[str, str], bool]:
    """``worked(param, value)``: whether a completed trial of ``study`` chose ``value`` for ``param``."""
    return lambda param, value: any(t.params.get(param) == value for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def is_default(trial) -> bool:
    """Whether ``trial`` is the default recipe's fit: the first of a fresh study, never pruned.
    Under cross-validation it is scored on the same folds as every other trial: a score on one
    fold against others' means would let its noise win the selection."""
    return trial.user_attrs.get("recipe") == "default"


def save_predictions(folder: Path, index: np.ndarray, probabilities: torch.Tensor) -> None:
    """Probabilities for pool images ``index`` (which the trial did not train on), written atomically."""
    table = np.zeros((len(index), probabilities.shape[1] + 1), dtype=np.float32)
    table[:, 0] = index
    table[:, 1:] = probabilities.float().numpy()
    save_array(folder / PREDICTIONS_NAME, table)


def save_array(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.asarray(array, dtype=np.float32), allow_pickle=False)


def load_predictions(folder: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(pool indices, probabilities) a trial saved, or None."""
    try:
        table = np.load(folder / PREDICTIONS_NAME, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return table[:, 0].astype(np.int64), table[:, 1:]


def take_over_state(trial, trial_dir: Callable[[int], Path], lock: Path) -> int | None:
    """Give ``trial`` a clean folder, or the folder of the crashed attempt it resumes from
    (moved, not copied: no superseded copy is left, and a nearly full disk is not asked for
    another). Under the cleanup lock, so that ``prune_trial_folders`` never deletes a folder
    half taken. Returns the number of the attempt taken over, or None."""
    folder = trial_dir(trial.number)
    with file_lock(lock):
        shutil.rmtree(folder, ignore_errors=True)  # a retried number never reuses stale files
        origin = retried_from(trial, has_state=lambda number: (trial_dir(number) / STATE_NAME).is_file())
        if origin is not None:
            os.rename(trial_dir(origin), folder)
    return origin


def retried_from(trial, has_state: Callable[[int], bool]) -> int | None:
    """The number of the crashed attempt whose state ``trial`` resumes from: following the chain
    of retries (Optuna records only the original) to the newest failed attempt for which
    ``has_state(number)``; None for a first attempt or when none left a state."""
    study = getattr(trial, "study", None)  # a FixedTrial has none
    if study is None:
        return None
    trials = study.get_trials(deepcopy=False)
    frozen = next((t for t in trials if t.number == trial.number), None)
    root = TrialRecord.of(frozen).retry_of if frozen else None
    if root is None:
        return None
    return resume_point(retry_chains(trials)[root], trial.number, has_state)


class Surplus(Exception):
    """Fails a trial started past ``--trials``: it never trains, and is stored marked surplus."""

    def __init__(self, number: int):
        super().__init__(f"trial {number} is past the study's total")


class StopSearch(BaseException):
    """Carries an error out of ``study.optimize``, which records and swallows every Exception a trial raises."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


@contextmanager
def stop_on_full_disk(session: Session) -> Iterator[None]:
    """Around ``study.optimize`` and the recovery of trials before it: a full disk, met by a
    trial or by Optuna's own writes to the storage (its ``AssertionError: Should not reach.``
    after SQLite's "database or disk is full"), ends the search with one :class:`~autoft.core.io.DiskFull`."""
    try:
        yield
    except StopSearch as stop:
        raise stop.error from stop.error.__cause__
    except Exception as exc:
        full = disk_full_error(exc, storage_folder(session.ctx.storage_url) or session.ctx.out)
        if full is None:
            raise
        raise full from exc
