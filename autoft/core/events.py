"""Progress events, shared by training, pretraining and the search.

Every long-running call takes ``on_event``, a callable that receives these dataclasses
(``match event: case EpochEnd(): ...``). A callback may raise to stop the run (the search
raises ``optuna.TrialPruned``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Event:
    """Base of every event."""


# -- one training or pretraining run ------------------------------------------


@dataclass(frozen=True)
class TrainStart(Event):
    """A run starts (or resumes at ``first_epoch``): ``epochs`` evaluations over ``steps`` optimizer steps."""

    epochs: int
    steps: int
    steps_per_epoch: int
    first_epoch: int = 1


@dataclass(frozen=True)
class BatchEnd(Event):
    """A batch finished: ``step`` of the epoch's ``steps``; ``global_step`` of the run's ``total_steps``."""

    step: int
    steps: int
    global_step: int = 0
    total_steps: int = 0


@dataclass(frozen=True)
class EpochEnd(Event):
    """An epoch (evaluation period) finished. ``record`` holds its losses and metrics
    (``train_loss``, ``val_loss``, ``val_<metric>`` ... for fine-tuning; ``loss`` and
    ``knn_accuracy`` for pretraining); ``value`` is the selected metric, ``resumed`` is
    true for epochs restored from a saved state rather than trained again."""

    epoch: int
    epochs: int
    record: dict[str, Any]
    value: float | None = None
    resumed: bool = False


@dataclass(frozen=True)
class TrainEnd(Event):
    """The run ended: ``best_epoch`` is the one kept; ``stopped`` says why it ended early
    (``"deadline"``, ``"interrupted"``) or is None."""

    best_epoch: int
    stopped: str | None = None


# -- the search (emitted by autoft.searching) --------------------------------


@dataclass(frozen=True)
class SearchStart(Event):
    study: str
    total: int
    done: int
    queued_again: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class TrialStart(Event):
    number: int
    params: dict[str, Any]


@dataclass(frozen=True)
class TrialEvent(Event):
    """A training event of trial ``number`` (``event`` is a :class:`BatchEnd`, :class:`EpochEnd` ...)."""

    number: int
    event: Event


@dataclass(frozen=True)
class FoldEnd(Event):
    number: int
    fold: int
    folds: int
    value: float


@dataclass(frozen=True)
class TrialEnd(Event):
    number: int
    state: str
    value: float | None
    reason: str | None
    best_value: float | None
    best_number: int | None
    done: int
    total: int


@dataclass(frozen=True)
class Export(Event):
    number: int | None  # the trial shipped; None for a simple model


@dataclass(frozen=True)
class PretrainStart(Event):
    method: str
    images: int


@dataclass(frozen=True)
class PretrainEnd(Event):
    cached: bool
    out: str
    checkpoints: list[tuple[int, float | None]]


OnEvent = Callable[[Event], None]


# -- what the search decided before its trials --------------------------------


@dataclass(frozen=True)
class WeightsNotice(Event):
    """What ``--weights auto`` chose: a weights plugin's, the source's pretrained weights, or
    random ones; ``text`` says which (and for random ones, where it looked and what to do)."""

    text: str


@dataclass(frozen=True)
class PlanMade(Event):
    """The budget planner's choice, as the one line printed before the search and as data."""

    line: str
    plan: dict[str, Any]


@dataclass(frozen=True)
class Refit(Event):
    """Trial ``number``'s recipe trains once more, on ``images`` labelled images, for ``steps``
    steps (from ``seed``, when it is a further fit averaged with the first); or a simple
    ``model`` (``number`` None) fits on them."""

    number: int | None
    steps: int
    images: int
    model: str = ""
    seed: int | None = None


@dataclass(frozen=True)
class WorkerFailed(Event):
    """Worker process ``worker`` of ``--jobs`` stopped with an error; the others go on."""

    worker: int
    reason: str


def with_shorthands(on_event, on_epoch, on_batch) -> Callable[[Event], None] | None:
    """One event handler for the API's ``on_event`` and its shorthands ``on_epoch`` (each
    epoch's record, resumed ones left out) and ``on_batch`` (step, steps)."""
    if on_epoch is None and on_batch is None:
        return on_event

    def handle(event: Event) -> None:
        if on_event is not None:
            on_event(event)
        if on_epoch is not None and isinstance(event, EpochEnd) and not event.resumed:
            on_epoch(event.record)
        if on_batch is not None and isinstance(event, BatchEnd):
            on_batch(event.step, event.steps)

    return handle
