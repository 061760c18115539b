"""A budget plan as plain data: the stages bought, their shapes, and the line that says so.

Made by :func:`autoft.searching.planning.make_plan`; read by the search, which runs the stages in
order: the simple models, the default fit (``default_fit``, ``default_steps``), the search
(``search``: trials of ``steps`` steps, ``folds``, ``pretrain_epochs``, ``pseudo_labels``),
then the refit (``refit``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from autoft.core.text import duration

SIMPLE_MODELS = "logistic regression on pixels, a linear probe"


@dataclass
class Plan:
    """The stages bought, in the order they run: simple models, the default fit
    (``default_fit``, ``default_steps``), the search (``search``: trials of ``steps`` steps,
    ``folds``, ``pretrain_epochs``, ``pseudo_labels``), the refit (``refit``)."""

    image_size: int
    batch_size: int
    steps: int  # optimizer steps of a search trial's fit, its full fidelity (the default fit's length; the least fit's without one)
    evaluations: int  # evaluation points of one fit (the pruner's resource)
    folds: int | None  # k of the search's k-fold cross-validation, None for one split
    repeats: int  # repetitions of the k folds with other shuffles
    trials: int | None  # a cap, when the user gave one
    expected_trials: int  # full-length trials expected to fit (0: no search)
    pretrain_epochs: int
    fit_seconds: float  # one fit of ``steps``, estimated
    pretrain_seconds: float
    refit_seconds: float  # kept back for the final refit
    budget: float | None  # the seconds the plan was made for, None without --timeout
    reasons: list[str] = field(default_factory=list)
    wanted_steps: int = 0  # what the data would want, before the budget
    step_seconds: float = 0.0
    jobs: int = 1  # trials run at once (``--jobs``), each at the throughput measured for one
    flips: bool = True  # whether augmentation may flip images horizontally (the data decide: see autoft.training.baselines)
    default_fit: bool = True  # the default recipe trained at full strength, the first trial
    default_steps: int = 0
    default_seconds: float = 0.0
    search: bool = True
    pseudo_labels: bool = False
    pseudo_seconds: float = 0.0  # labelling the unlabelled images, once per split
    refit: bool = True  # the chosen recipe trained again on every labelled image
    simple_seconds: float = 0.0  # the simple models, decoding included
    probe: bool = True  # the linear probe on the backbone's features, among the simple models
    spread_probe: bool = False  # ... and the probe on spread labels too (pretrained weights, unlabelled images)
    skipped: list[str] = field(default_factory=list)  # stages not bought, each with why
    finish_seconds: float = 0.0  # kept back from every stage for the export, its verification and the report
    export_seconds: float = 0.0  # ... of which one model's export and verification (an ensemble's further members each add as much)
    backbone: str = "the backbone"
    threads: int = 0  # CPU threads a fit trains with, the fastest measured (autoft.searching.calibration); 0: not chosen (a GPU)

    @property
    def cv(self) -> bool:
        return self.folds is not None

    @property
    def pretraining(self) -> bool:
        return self.pretrain_epochs > 0

    @property
    def trial_seconds(self) -> float:
        return self.fit_seconds * (self.folds or 1) * self.repeats

    @property
    def eval_every(self) -> int:
        return max(1, self.steps // self.evaluations)

    def estimated_seconds(self) -> float:
        trials = self.expected_trials * self.trial_seconds / self.jobs + (self.folds or 1) * self.repeats * self.pseudo_seconds if self.search else 0.0
        return self.simple_seconds + self.default_seconds + self.pretrain_seconds + trials + (self.refit_seconds if self.refit else 0.0) + self.finish_seconds

    def line(self) -> str:
        """``plan: 32 px; simple models, the default recipe (400 steps of 16, 1m05s), a search (...); refit; within 6m (...)``."""
        notes = self.reasons + [f"skipped {s}" for s in self.skipped]
        why = f" ({'; '.join(notes)})" if notes else ""
        if not self.default_fit:
            simple = SIMPLE_MODELS if self.probe else "logistic regression on pixels"
            return f"plan: only the simple models ({simple}): {duration(self.budget)} cannot train {self.backbone}{why}"
        size = f"{self.image_size} px" + (f", {self.threads} CPU thread{'s' if self.threads > 1 else ''}" if self.threads else "")
        parts = [size, f"simple models, the default recipe{'' if self.search else ' only'} ({self.default_steps} steps of {self.batch_size}, {duration(self.default_seconds)})"]
        if self.search:
            search = [f"{self.steps} steps a trial, {self.evaluations} evaluations"]
            if self.folds:
                search.append(f"{self.folds}-fold CV" + (f" x{self.repeats}" if self.repeats > 1 else ""))
            search.append(f"~{self.expected_trials} trials" if self.trials is None else f"{self.trials} trials")
            if self.jobs > 1:
                search[-1] += f", {self.jobs} at a time"
            if self.pretrain_epochs:
                search.append(f"pretraining {self.pretrain_epochs} epochs ({duration(self.pretrain_seconds)})")
            if self.pseudo_labels:
                search.append("pseudo-labels")
            parts.append(f"a search ({', '.join(search)})")
        else:
            parts.append("no search")
        if self.refit:
            parts.append("refit")
        tail = f"within {duration(self.budget)}" if self.budget is not None else f"about {duration(self.estimated_seconds())} in all"
        return "plan: " + "; ".join(parts) + f"; {tail}{why}"

    def as_dict(self) -> dict:
        return {**asdict(self), "eval_every": self.eval_every, "line": self.line(), "cv": self.cv, "pretraining": self.pretraining}


def bucket(steps: float) -> int:
    """Round down to 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 x 10^k: throughput measured 10%
    apart plans the same steps more often than not, and the plan line reads as chosen."""
    if steps < 10:
        return max(0, int(steps))
    scale = 10 ** math.floor(math.log10(steps))
    return int(scale * max(m for m in (1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8) if m * scale <= steps + 1e-9))
