"""Hyperparameter search over fine-tuning recipes (``autoft search``), on Optuna.

:func:`search` plans the budget, decodes the data once, runs one
:class:`~autoft.searching.objective.Objective` per trial in an Optuna study (any Optuna
storage, resumable, shareable by many workers), then refits the chosen model on every
labelled image and writes it, its ONNX export and an offline ``report.html``.

Extending the search: ``search(pre_search=[hook])`` calls ``hook(session)`` once the data
is decoded and the study is open, inside the time budget (``session.deadline``). A hook
may add a categorical parameter through ``session.space.choices`` (for instance ``init``,
a list of starting-weight files or ``"scratch"``); the objective passes ``params["init"]``
to :func:`autoft.backbones.build_backbone` as ``weights=``.
"""

from autoft.searching.config import SearchConfig, default_study_name, parse_duration
from autoft.searching.objective import Objective
from autoft.searching.runner import SearchResult, run_search, search
from autoft.searching.session import Session
from autoft.searching.space import BASE_RANGES, DEFAULT_STRATEGIES, SearchSpace, load_overrides

__all__ = [
    "search", "run_search", "SearchConfig", "SearchResult", "SearchSpace", "Session", "Objective", "BASE_RANGES",
    "DEFAULT_STRATEGIES", "default_study_name", "load_overrides", "parse_duration",
]  # fmt: skip
