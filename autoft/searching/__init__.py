"""Hyperparameter search over fine-tuning recipes (``autoft search``), on Optuna.

:func:`search` decodes the data once, runs one :class:`~autoft.searching.objective.Objective`
per trial in an Optuna study (any Optuna storage, resumable, shareable by many workers),
then writes the best model, its ONNX export and an offline ``report.html``.

Extending the search: ``search(pre_search=[hook])`` calls ``hook(setup, study)`` once the
data is decoded and the study is open, inside the time budget (``setup.deadline``). A hook
may add a categorical parameter through ``setup.space.choices`` (for instance ``init``, a
list of starting-weight files or ``"none"``); the objective passes ``params["init"]`` to
:func:`autoft.training.build_backbone` as ``weights=``.
"""

from autoft.searching.objective import Objective, SearchSetup
from autoft.searching.runner import SearchResult, default_study_name, parse_duration, search
from autoft.searching.space import BASE_RANGES, DEFAULT_STRATEGIES, SearchSpace, load_overrides

__all__ = ["search", "SearchResult", "SearchSpace", "SearchSetup", "Objective", "BASE_RANGES", "DEFAULT_STRATEGIES", "default_study_name", "load_overrides", "parse_duration"]
