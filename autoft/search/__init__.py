"""Hyperparameter search over fine-tuning recipes (``autoft search``), on Optuna.

:func:`search` decodes the data once, runs one :class:`~autoft.search.objective.Objective`
per trial in an Optuna study (any Optuna storage, resumable, shareable by many workers),
then writes the best model, its ONNX export and an offline ``report.html``.
"""

from autoft.search.objective import Objective, SearchSetup
from autoft.search.runner import SearchResult, default_study_name, parse_duration, search
from autoft.search.space import BASE_RANGES, DEFAULT_STRATEGIES, SearchSpace, load_overrides

__all__ = ["search", "SearchResult", "SearchSpace", "SearchSetup", "Objective", "BASE_RANGES", "DEFAULT_STRATEGIES", "default_study_name", "load_overrides", "parse_duration"]
