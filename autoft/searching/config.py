"""What a user asks of a search: one dataclass, checked before any image is decoded."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from autoft.data import DataSplits
from autoft.errors import AutoftError

SAMPLERS = ("tpe", "random")
PRUNERS = ("hyperband", "median", "wilcoxon", "none")
DEFAULT_ENSEMBLE = 5  # the most members an ensemble may have


@dataclass
class SearchConfig:
    """The options of ``autoft search``. ``None`` leaves a choice to the budget planner.

    ``trials`` caps the study's total (a rerun resumes up to it); without it a search with
    ``timeout`` goes on while time remains, and one without runs 20. ``epochs`` fixes the
    training length of a trial (else the planner sets it in steps). ``cv`` forces k-fold
    scoring and ``no_cv`` a single validation split (else small data is cross-validated).
    ``refit`` trains the best recipe once more on every labelled image; ``ensemble`` caps
    the members of a greedy ensemble, and the seeds a refit is averaged over (1 turns both off). ``jobs`` trials run at once, as
    worker processes on one study (``"auto"``: one per GPU, one on a CPU). ``weights`` is ``"auto"``
    (pretrained when the backbone's source has them at hand, else random, said out loud),
    ``"scratch"``, a file or a source's pretrained tag. ``started`` is when ``timeout`` began
    to count (a ``time.monotonic()`` value; None: when the search starts): the command passes
    its own start, so that its imports count against ``--timeout`` too.
    """

    backbone: str
    data: str | DataSplits
    out: str | Path | None = None
    trials: int | None = None
    timeout: str | float | None = None
    epochs: int | None = None
    strategies: Sequence[str] = ()
    storage: str | None = None
    study: str | None = None
    sampler: Any = "tpe"
    pruner: Any = None
    metric: str = "accuracy"
    seed: int = 0
    device: str = "auto"
    cv: int | None = None
    no_cv: bool = False
    batch_size: int | None = None
    image_size: int | None = None
    ranges: Sequence[str] = ()
    space_file: str | Path | None = None
    space: Any = None
    export_onnx: bool = True
    weights: str | None = "auto"
    unlabelled: str | Path | torch.Tensor | None = None
    pretrain: str = "simclr"
    pretrain_epochs: int | None = None
    refit: bool = True
    ensemble: int = DEFAULT_ENSEMBLE
    simple_models: bool = True  # a simple model may ship when it beats every trial (see autoft.searching.selection)
    jobs: int | str = 1
    pre_search: Sequence[Callable[[Any], None]] = ()
    on_event: Callable[[Any], None] | None = None
    started: float | None = None
    seconds: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.seconds = parse_duration(self.timeout)

    def check(self) -> None:
        """Every mistake that needs no image decoded, each one clear line."""
        for name in ("trials", "epochs", "pretrain_epochs", "image_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AutoftError(f"--{name.replace('_', '-')} must be at least 1")
        if self.batch_size is not None and self.batch_size < 2:
            raise AutoftError("--batch-size must be at least 2")
        if self.cv is not None and self.cv < 2:
            raise AutoftError("--cv needs at least 2 folds")
        if self.cv is not None and self.no_cv:
            raise AutoftError("--cv and --no-cv contradict each other; give one")
        if self.seconds is not None and self.seconds <= 0:
            raise AutoftError("--timeout must be longer than zero")
        if not (self.jobs == "auto" or (isinstance(self.jobs, int) and self.jobs >= 1)):
            raise AutoftError(f"--jobs {self.jobs!r}: give a number of trials to run at once (at least 1), or auto")
        if self.ensemble < 1:
            raise AutoftError("--ensemble must be at least 1 (1 turns ensembles off)")
        if isinstance(self.sampler, str) and self.sampler not in SAMPLERS:
            raise AutoftError(f"unknown sampler {self.sampler!r}; use {' or '.join(SAMPLERS)}")
        if isinstance(self.pruner, str) and self.pruner not in PRUNERS:
            raise AutoftError(f"unknown pruner {self.pruner!r}; use {', '.join(PRUNERS)}")
        if self.pruner == "wilcoxon" and self.no_cv:
            raise AutoftError("--pruner wilcoxon compares per-fold scores; it cannot work with --no-cv (use --cv K)")
        if self.pruner in ("hyperband", "median") and self.cv:
            raise AutoftError(f"--pruner {self.pruner} compares evaluations, but with --cv a trial reports one score per fold; use --pruner wilcoxon or none")


def parse_duration(text: str | float | int | None) -> float | None:
    """``90s``, ``30m``, ``2h``, ``1h30m`` or plain seconds -> seconds."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    cleaned = text.strip().lower().replace(" ", "")
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd]?)", cleaned)
    if not cleaned or "".join(n + u for n, u in parts) != cleaned or (len(parts) > 1 and not all(u for _, u in parts)):
        raise AutoftError(f"--timeout {text!r}: expected a duration such as 90s, 30m, 2h or 1h30m")
    return sum(float(n) * units[u or "s"] for n, u in parts)


def default_study_name(backbone: str, data: str | DataSplits) -> str:
    """``<backbone>-<dataset>``: ``resnet50-flowers`` for ``--data ~/data/flowers/``."""
    source = data if isinstance(data, str) else "data"
    if ":" in source and not Path(source).expanduser().exists() and not re.match(r"^[A-Za-z]:[\\/]", source):
        source = source.split(":", 1)[1]
    tail = Path(source.rstrip("/\\")).stem or "data"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{backbone}-{tail}").strip("-.") or "search"
