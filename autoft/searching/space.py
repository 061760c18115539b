"""The search space: base ranges, strategy and regulariser parameters, and user overrides.

Every trial declares the base parameters of :data:`autoft.model.recipe.PARAMS` (``lr``,
``dropout``, ``weight_decay``, ``label_smoothing``, ``augment`` and, with RandAugment,
``augment_magnitude``), a ``strategy`` and a ``regularizer``; the chosen strategy and
regulariser then declare their own parameters (conditional on them) through their
``suggest``. The default strategies, ``freeze``, ``l2sp`` and ``lp-ft``: the first two
declare ``freeze_depth`` over the same range (0 up to the number of groups before the
head); L2-SP adds ``l2sp_alpha``, the strength of its pull towards the starting weights;
LP-FT its probe's share of the epochs. The regulariser is ``none``, ``mixup``, ``cutmix``
(their ``*_alpha``) or ``bss`` (``bss_weight``). From pretrained weights every trial also
declares :data:`autoft.model.recipe.PRETRAINED_PARAMS`: ``lr_decay`` (layer-wise learning-rate
decay) and ``bn`` (BatchNorm statistics adapted or kept); from random weights they mean nothing.

Ranges are overridden by name, for base, strategy and regulariser parameters alike::

    lr=1e-5:1e-2:log      a float range, log scale
    freeze_depth=0:2      an int range (both ends integers)
    dropout=0.2           a fixed value
    init=none,a.pt,b.pt   categorical choices

or a JSON file mapping names to such strings, ``{"low":..., "high":..., "log":...}``
objects, or lists of choices.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from autoft.errors import AutoftError
from autoft.model.recipe import NO_REGULARIZER, PARAM_DEFS, PARAMS, PRETRAINED_DEFAULTS, PRETRAINED_DEFS, PRETRAINED_PARAMS, ParamDef, default_params
from autoft.searching.left_out import LeftOut
from autoft.searching.ranges import check_range, load_overrides, parse_range  # noqa: F401  (re-exported)

# Ranges of the base parameters, from the recipe's table.
BASE_RANGES: dict[str, dict[str, Any]] = {p.name: p.search_range for p in PARAMS if p.search_range is not None}
BASE_CHOICES: dict[str, list[Any]] = {p.name: list(p.choices) for p in PARAMS if p.choices is not None}
# From pretrained weights only: layer-wise learning-rate decay and BatchNorm statistics kept or adapted.
PRETRAINED_RANGES: dict[str, dict[str, Any]] = {p.name: p.search_range or {"choices": list(p.choices)} for p in PRETRAINED_PARAMS}
PLUGIN_CHOSEN = ("strategy", "regularizer")  # choices come from --strategy and the installed regularisers
DEFAULT_STRATEGIES = ("freeze", "l2sp", "lp-ft")
DEFAULT_REGULARIZERS = (NO_REGULARIZER, "mixup", "cutmix", "bss")


@dataclass
class SearchSpace:
    """What a trial may choose. ``overrides`` replace ranges by name (base, strategy or
    regulariser parameters); ``choices`` add categorical parameters, such as ``init``
    (starting weights), that the objective reads from the trial's parameters."""

    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    choices: dict[str, list[Any]] = field(default_factory=dict)
    regularizers: tuple[str, ...] = DEFAULT_REGULARIZERS
    pretrained: bool = False  # the starting weights are pretrained: lr_decay and bn are searched too
    regularizer_objects: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # made on first use
    registry: Any = field(default=None, repr=False, compare=False)  # where regularisers come from (None: the installed plugins)

    def __post_init__(self) -> None:
        chosen = self.overrides.get("regularizer", {}).get("choices")
        if chosen:
            self.regularizers = tuple(chosen)

    def _regularizer(self, name: str) -> Any:
        """The regulariser plugin's object, made on first use: ``regularizers`` may grow after the
        space is made (FixMatch joins once unlabelled images are ready)."""
        if name not in self.regularizer_objects:
            from autoft import plugins

            self.regularizer_objects[name] = (self.registry or plugins.registry()).regularizer(name).factory()
        return self.regularizer_objects[name]

    def suggest(self, trial, strategies: dict[str, Any], n_groups: int, left_out: LeftOut | None = None) -> dict[str, Any]:
        """Declare every parameter on ``trial`` (an Optuna trial or FixedTrial); return the values.
        A choice ``left_out`` (its plugin failed) prunes the trial that draws it."""
        usable = (left_out or LeftOut()).check
        ranged = RangedTrial(trial, self.overrides)
        params: dict[str, Any] = {}
        for p in PARAMS:
            if p.name not in PLUGIN_CHOSEN and p.applies(params):
                params[p.name] = _suggest(ranged, p)
        for name, options in self.choices.items():
            params[name] = ranged.suggest_categorical(name, list(options))
        params["strategy"] = usable("strategy", ranged.suggest_categorical("strategy", list(self.strategies)))
        params.update(strategies[params["strategy"]].suggest(ranged, n_groups))
        for p in PRETRAINED_PARAMS if self.pretrained else ():
            if p.name not in params:  # a strategy of its own range (discriminative's lr_decay) keeps it
                params[p.name] = _suggest(ranged, p)
        params["regularizer"] = usable("regularizer", ranged.suggest_categorical("regularizer", list(self.regularizers)))
        if params["regularizer"] != NO_REGULARIZER:
            params.update(self._regularizer(params["regularizer"]).suggest(ranged))
        return params

    def defaults(self, strategy_name: str, strategy, n_groups: int, base: dict[str, Any] | None = None) -> dict[str, Any]:
        """The known-good first trial, keeping only values inside the (possibly overridden) space."""
        pretrained = PRETRAINED_DEFAULTS if self.pretrained else {}
        wanted = {**(base or default_params()), **pretrained, **strategy.default_params(n_groups), "strategy": strategy_name}
        if wanted.get("regularizer") not in self.regularizers:
            wanted["regularizer"] = self.regularizers[0]
        if wanted["regularizer"] != NO_REGULARIZER:
            wanted.update(self._regularizer(wanted["regularizer"]).default_params())
        for name, options in self.choices.items():
            wanted.setdefault(name, options[0])
        kept = {k: v for k, v in wanted.items() if self.contains(k, v)}
        for name in sorted((set(wanted) - set(kept)) & set(self.overrides)):  # the user's range left it out: say so
            warnings.warn(f"--range {name}={_describe(self.overrides[name])} leaves out the default recipe's {name}={wanted[name]!r}; its first trial draws {name} from that range instead", stacklevel=2)
        return kept

    def contains(self, name: str, value: Any) -> bool:
        if name == "strategy":
            return value in self.strategies
        if name == "regularizer":
            return value in self.regularizers
        if name in self.choices:
            return value in self.choices[name]
        spec = self.overrides.get(name) or BASE_RANGES.get(name) or PRETRAINED_RANGES.get(name) or ({"choices": BASE_CHOICES[name]} if name in BASE_CHOICES else None)
        if spec is None:
            return True  # a plugin's parameter within the plugin's own range
        if "choices" in spec:
            return value in spec["choices"]
        return spec["low"] <= value <= spec["high"]

    def check_names(self, n_groups: int, strategies: dict[str, Any]) -> None:
        """An override for a parameter nothing declares is a typo, not a silent no-op; a value
        the parameter cannot take fails here too, before any work, not in the first trial."""
        known = set(self.describe(n_groups, strategies, overrides=False))
        unknown = sorted(set(self.overrides) - known)
        if unknown and unknown[0] in PRETRAINED_DEFS:
            raise AutoftError(f"--range {unknown[0]}: searched only from pretrained weights (--weights); this search starts from random ones")
        if unknown:
            raise AutoftError(f"--range {unknown[0]}: no such parameter in this search; searched: {', '.join(sorted(known))}")
        problem = self.value_problem(n_groups, strategies)
        if problem:
            raise AutoftError(problem)

    def value_problem(self, n_groups: int, strategies: dict[str, Any]) -> str | None:
        """The first override holding a value its parameter cannot take, in words, or None."""
        recorder = self._declared(n_groups, strategies)
        for name, spec in self.overrides.items():
            values = spec["choices"] if "choices" in spec else [spec["low"], spec["high"]]
            for value in values:
                problem = _value_problem(name, value, recorder.kinds.get(name), self)
                if problem:
                    return f"--range {name}: {problem}"
        return None

    def _declared(self, n_groups: int, strategies: dict[str, Any], overrides: dict[str, dict[str, Any]] | None = None) -> _RecordingTrial:
        """What the strategies and regularisers can declare, in every branch of their choices."""
        recorder, used = _RecordingTrial(), overrides or {}
        for name in self.strategies:
            recorder.every_branch(lambda trial, plugin=strategies[name]: plugin.suggest(RangedTrial(trial, used), n_groups))
        for name in self.regularizers:
            if name != NO_REGULARIZER:
                recorder.every_branch(lambda trial, plugin=self._regularizer(name): plugin.suggest(RangedTrial(trial, used)))
        return recorder

    def describe(self, n_groups: int, strategies: dict[str, Any], overrides: bool = True) -> dict[str, str]:
        """Each parameter's range, as text, for the report and ``--help``-like listings."""
        used = self.overrides if overrides else {}
        recorder = self._declared(n_groups, strategies, used)
        described = {}
        base = {**BASE_RANGES, **{k: {"choices": v} for k, v in BASE_CHOICES.items()}, **(PRETRAINED_RANGES if self.pretrained else {})}
        for name, spec in {**base, **used}.items():
            if name in base or name in recorder.seen:
                described[name] = _describe(spec)
        for name, dist in recorder.seen.items():
            described.setdefault(name, str(dist))
        for name, options in self.choices.items():
            described[name] = ", ".join(map(str, options))
        described["strategy"] = ", ".join(self.strategies)
        described["regularizer"] = ", ".join(self.regularizers)
        return described


class RangedTrial:
    """An Optuna trial whose ranges are replaced by the user's overrides, name by name.

    Strategies declare their own parameters; wrapping the trial lets users narrow or fix
    those too without any strategy knowing about overrides.
    """

    def __init__(self, trial, overrides: dict[str, dict[str, Any]]):
        self._trial = trial
        self._overrides = overrides

    def __getattr__(self, name: str):
        return getattr(self._trial, name)

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> float:
        spec = self._overrides.get(name)
        if spec is not None:
            if "choices" in spec:
                return self._trial.suggest_categorical(name, spec["choices"])
            low, high, log = float(spec["low"]), float(spec["high"]), spec.get("log", log)
            step = None if log else step
        return self._trial.suggest_float(name, low, high, step=step, log=log)

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        spec = self._overrides.get(name)
        if spec is not None:
            if "choices" in spec:
                return self._trial.suggest_categorical(name, spec["choices"])
            low, high, log = int(spec["low"]), int(spec["high"]), spec.get("log", log)
        return self._trial.suggest_int(name, low, high, step=step, log=log)

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        spec = self._overrides.get(name)
        if spec is not None and "choices" in spec:
            choices = spec["choices"]
        return self._trial.suggest_categorical(name, list(choices))


class _RecordingTrial:
    """Answers every suggestion with its low end, and remembers what was declared.

    Plugins declare their parameters define-by-run, as Optuna objectives do, so a parameter
    may be declared only in one branch of a categorical choice. :meth:`every_branch` runs a
    plugin's ``suggest`` once per combination of categorical answers, so every parameter it
    can declare is seen, and can be given a ``--range``.
    """

    BRANCHES = 64  # the most runs of one plugin's suggest() when its choices multiply

    def __init__(self):
        self.seen: dict[str, str] = {}
        self.kinds: dict[str, Any] = {}  # name -> float, int, or the list of choices
        self._prefix: list[int] = []  # the answers this run gives to its first categorical choices
        self._taken: list[tuple[int, int]] = []  # (answer, number of choices) of each categorical choice so far

    def every_branch(self, run: Callable[["_RecordingTrial"], Any]) -> None:
        """``run(self)`` once per combination of categorical answers, depth first."""
        pending: list[list[int]] = [[]]
        for _ in range(self.BRANCHES):
            if not pending:
                return
            self._prefix, self._taken = pending.pop(), []
            run(self)
            for depth in range(len(self._prefix), len(self._taken)):  # each choice first met in this run
                answers = [answer for answer, _ in self._taken[:depth]]
                pending.extend(answers + [other] for other in range(self._taken[depth][1] - 1, 0, -1))

    def suggest_float(self, name, low, high, *, step=None, log=False):
        self.seen[name] = _describe({"low": low, "high": high, "log": log})
        self.kinds[name] = float
        return low

    def suggest_int(self, name, low, high, *, step=1, log=False):
        self.seen[name] = _describe({"low": low, "high": high, "log": log})
        self.kinds[name] = int
        return low

    def suggest_categorical(self, name, choices):
        self.seen[name] = ", ".join(map(str, choices))
        self.kinds[name] = list(choices)
        depth = len(self._taken)
        answer = self._prefix[depth] if depth < len(self._prefix) else 0
        self._taken.append((answer, len(choices)))
        return choices[answer]


def _value_problem(name: str, value: Any, kind: Any, space: SearchSpace) -> str | None:
    """What is wrong with ``value`` for the parameter ``name`` (declared as ``kind`` by a plugin), or None."""
    definition = PARAM_DEFS.get(name) or PRETRAINED_DEFS.get(name)
    if definition is not None and (definition.type is not str or definition.choices):
        try:
            definition.check(value)
        except AutoftError as exc:
            return str(exc)
        return None
    if name == "regularizer":
        if value != NO_REGULARIZER:
            space._regularizer(str(value))  # an unknown one fails, naming those installed
        return None
    if name == "strategy":
        return None if value in space.strategies else f"strategy={value!r} is not among the searched strategies ({', '.join(space.strategies)}); use --strategy"
    if kind in (float, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name}={value!r} is not a number"
        if kind is int and float(value) != int(value):
            return f"{name}={value!r} must be a whole number"
    elif isinstance(kind, list) and value not in kind:
        return f"{name}={value!r} is not one of {', '.join(map(str, kind))}"
    return None


def _suggest(ranged: "RangedTrial", p: ParamDef) -> Any:
    """Declare one parameter of the recipe's tables over its search range (or its choices)."""
    if p.search_range is None:
        return ranged.suggest_categorical(p.name, list(p.choices))
    if p.type is int:
        return ranged.suggest_int(p.name, int(p.low), int(p.high), log=p.log)
    return ranged.suggest_float(p.name, p.low, p.high, log=p.log)


def _describe(spec: dict[str, Any]) -> str:
    if "choices" in spec:
        return ", ".join(map(str, spec["choices"]))
    if spec["low"] == spec["high"]:
        return f"{spec['low']:g}"
    return f"{spec['low']:g} to {spec['high']:g}" + (" (log)" if spec.get("log") else "")
