"""What a search records on each trial, beside Optuna's own state, parameters and values.

:class:`TrialRecord` is the one reader and writer of a trial's user attributes: read one
with ``TrialRecord.of(frozen_trial)``, write fields with ``TrialRecord.write(trial, ...)``
(an Optuna trial that is running) or give ``TrialRecord.attrs(...)`` to
``study.enqueue_trial``. The attribute names stay those earlier versions wrote, so older
studies read the same. Which trial a retry runs again comes from Optuna's public
:class:`~optuna.storages.RetryHeartbeatStaleTrialCallback` readers, never its system keys.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

IDENTITY = ("host", "pid", "pid_started", "threads")  # the process that ran a trial

@dataclass
class TrialRecord:
    """A trial's user attributes, typed. Every field is optional: a trial records them as it goes."""

    recipe: str | None = None  # "default" or "portfolio": enqueued by the search, not sampled
    host: str | None = None  # the process that ran it (see storage.process_identity)
    pid: int | None = None
    pid_started: int | None = None  # the pid's start time, so a recycled pid is not taken for it
    threads: int | None = None  # its share of the cores with --jobs
    crashed: bool = False  # failed by no fault of its parameters (killed, interrupted, a full disk): to run again
    fail_reason: str = ""
    user_error: bool = False  # failed by a mistake in the command (a bad --range value): not counted towards --trials
    surplus: bool = False  # started past --trials by a worker that learnt of the others too late; never trained
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per evaluation
    fold_scores: dict[str, float] = field(default_factory=dict)  # fold -> score, cross-validated trials
    best_step: int | None = None  # the step at which it peaked: what the refit trains
    peaked_at_end: bool = False
    cut_short: str = ""  # why it stopped before its last evaluation or fold (the time budget)
    pruned_after_folds: int | None = None
    resumed_from: dict[str, int] | None = None  # {"trial": attempt, "epoch": e}: the state a retry continued
    retry_of: int | None = None  # the original trial this one runs again (Optuna's retry callback)
    retry_history: list[int] = field(default_factory=list)  # the attempts before this one, oldest first

    @classmethod
    def of(cls, trial: FrozenTrial) -> TrialRecord:
        attrs = trial.user_attrs
        known = {f.name for f in dataclasses.fields(cls)} - {"retry_of", "retry_history"}
        record = cls(**{k: v for k, v in attrs.items() if k in known})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            record.retry_of = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
            record.retry_history = list(RetryHeartbeatStaleTrialCallback.retry_history(trial))
        return record

    @classmethod
    def attrs(cls, **fields: Any) -> dict[str, Any]:
        """User attributes for ``fields``, checked against the record's: for ``enqueue_trial``."""
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)} | ({"retry_of", "retry_history"} & set(fields))
        if unknown:
            raise TypeError(f"TrialRecord has no writable field {', '.join(sorted(unknown))}")
        return fields

    @classmethod
    def write(cls, trial: Any, **fields: Any) -> None:
        """Store ``fields`` on ``trial`` (an ``optuna.Trial`` or ``FixedTrial``)."""
        for key, value in cls.attrs(**fields).items():
            trial.set_user_attr(key, value)

    @classmethod
    def of_running(cls, trial: Any) -> TrialRecord:
        """The record of a trial being run (``optuna.Trial`` or ``FixedTrial``), from its user attributes."""
        return cls(**{k: v for k, v in trial.user_attrs.items() if k in {f.name for f in dataclasses.fields(cls)}})

    @staticmethod
    def inherited(trial: FrozenTrial) -> dict[str, Any]:
        """The user attributes a retry of ``trial`` starts with: all but the identity of the
        process that ran it, so that no worker takes the retry for a trial whose process died
        before the retry's own process writes its identity."""
        return {k: v for k, v in trial.user_attrs.items() if k not in IDENTITY}

    # -- what the record says ------------------------------------------------

    def lost(self, trial: FrozenTrial) -> bool:
        """Failed from outside (its process or machine stopped): Optuna's heartbeat or a
        recovery failed it, so it holds no reason of its own."""
        return trial.state == TrialState.FAIL and not self.fail_reason and not self.surplus

    def reason(self, trial: FrozenTrial) -> str:
        """Why ``trial`` failed, in words."""
        if self.fail_reason:
            return self.fail_reason
        if self.lost(trial):
            where = f"process {self.pid} on {self.host}" if self.pid is not None else "its process"
            return f"{where} stopped while the trial ran (killed, out of memory or its machine lost)"
        return ""

    def to_rerun(self, trial: FrozenTrial) -> bool:
        """Failed by no fault of its parameters, and said so: the study runs it again. (A lost
        trial says nothing, but whoever fails it queues it again at once.)"""
        return trial.state == TrialState.FAIL and self.crashed


def visible(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials a summary, leaderboard or report shows: every one but the surplus ones, which never trained."""
    return [t for t in trials if not TrialRecord.of(t).surplus]


def count_states(trials: list[FrozenTrial]) -> dict[str, int]:
    """Trials by state name (COMPLETE, PRUNED, FAIL...), surplus ones left out."""
    shown = visible(trials)
    return {s.name: sum(t.state == s for t in shown) for s in TrialState if any(t.state == s for t in shown)}
