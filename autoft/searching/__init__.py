"""Hyperparameter search over fine-tuning recipes (``autoft search``), on Optuna.

:func:`search` plans the budget, decodes the data once, runs one
:class:`~autoft.searching.objective.Objective` per trial in an Optuna study (any Optuna
storage, resumable, shareable by many workers), then refits the chosen model on every
labelled image and writes it, its ONNX export and an offline ``report.html``.

Everything a trial reads is prepared first and frozen in a
:class:`~autoft.searching.session.SearchContext` (data, plan, space, reference models,
plugins, budget); what changes while trials run is a small
:class:`~autoft.searching.session.SearchState`. ``search(pre_search=[hook])`` calls
``hook(session)`` once both are ready and the study is open, before the first trial.
"""

from autoft.searching.config import SearchConfig, default_study_name, parse_duration
from autoft.searching.objective import Objective
from autoft.searching.runner import SearchResult, run_search, search
from autoft.searching.session import SearchContext, SearchState, Session
from autoft.searching.space import BASE_RANGES, DEFAULT_STRATEGIES, SearchSpace, load_overrides

__all__ = [
    "search", "run_search", "SearchConfig", "SearchResult", "SearchSpace", "Session", "SearchContext", "SearchState", "Objective", "BASE_RANGES",
    "DEFAULT_STRATEGIES", "default_study_name", "load_overrides", "parse_duration",
]  # fmt: skip
