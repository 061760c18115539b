"""Choices a search leaves out once their plugin failed: mutable state of one search
(:attr:`~autoft.searching.session.SearchState.left_out`), not part of its frozen space."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

PARAMS_OF_KINDS = {"strategies": "strategy", "regularizers": "regularizer"}


@dataclass
class LeftOut:
    """(``"strategy"`` or ``"regularizer"``, name) -> why later trials leave it out."""

    reasons: dict[tuple[str, str], str] = field(default_factory=dict)

    def add(self, error: Any, trial_number: int, worked: Callable[[str, str], bool] = lambda param, name: False) -> bool:
        """After a strategy's or regulariser's plugin failed (a :class:`~autoft.lifecycle.PluginError`
        naming it), later trials leave it out, said in one line, unless ``worked(param, name)``:
        a choice that has completed a trial is not broken, and its failure was its parameters'
        (a freeze depth past the backbone's groups), a verdict on that trial alone. Optuna's
        choices cannot change within a study, so a trial that draws it is pruned before it
        trains. True when it was left out now."""
        param = PARAMS_OF_KINDS.get(getattr(error, "kind", None))
        if param is None or (param, error.name) in self.reasons or worked(param, error.name):
            return False
        self.reasons[(param, error.name)] = f"{param} {error.name!r} failed in trial {trial_number}: {error}"
        warnings.warn(f"{error}; later trials leave {param} {error.name!r} out", stacklevel=2)
        return True

    def exhausted(self, strategies: tuple[str, ...], regularizers: tuple[str, ...]) -> bool:
        """Whether every strategy, or every regulariser, was left out: no trial is left to run."""
        return any(all((param, name) in self.reasons for name in choices) for param, choices in (("strategy", strategies), ("regularizer", regularizers)))

    def check(self, param: str, value: Any) -> Any:
        """``value``, or the trial pruned when that choice was left out."""
        if (param, value) in self.reasons:
            import optuna

            raise optuna.TrialPruned(f"left out: {self.reasons[(param, value)]}")
        return value
