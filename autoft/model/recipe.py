"""A fine-tuning recipe: one table of parameter definitions, and the dataclass made from it.

:data:`PARAMS` is the only place a base hyperparameter is defined: its default (the
known-good recipe that ``autoft train`` uses and every search tries first), its search
range, the values it may take, and its help text for the CLI. :class:`Recipe` is generated
from it; the search space (:mod:`autoft.searching.space`) reads its ranges from it.
Strategies and regularisers declare their own parameters (``Recipe.extra``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

from autoft import plugins
from autoft.errors import AutoftError, PluginError
from autoft.plugins import plugin_label

AUGMENT_POLICIES = ("crop-flip", "shift", "randaugment", "trivialaugment", "none")
NO_REGULARIZER = "none"


@dataclass(frozen=True)
class ParamDef:
    """One base hyperparameter. ``low``/``high``/``log`` is the search range, ``choices`` the
    categorical options (``None`` for ones the installed plugins supply), ``minimum`` and
    ``maximum`` the values that make sense at all (``open_max``: ``maximum`` itself does
    not), and ``only_with`` limits it to recipes where another parameter has given values."""

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    open_min: bool = False
    open_max: bool = False
    only_with: tuple[str, tuple[Any, ...]] | None = None

    @property
    def search_range(self) -> dict[str, Any] | None:
        return None if self.low is None else {"low": self.low, "high": self.high, "log": self.log}

    def applies(self, values: dict[str, Any]) -> bool:
        return self.only_with is None or values.get(self.only_with[0]) in self.only_with[1]

    def bounds(self) -> str:
        left = "(" if self.open_min else "["
        right = ")" if self.open_max else "]"
        return f"{left}{self.minimum if self.minimum is not None else '-inf'}, {self.maximum if self.maximum is not None else 'inf'}{right}"

    def check(self, value: Any) -> Any:
        """The value as its type, or an AutoftError naming the parameter and what it accepts."""
        if self.type is str:
            if self.choices is not None and value not in self.choices:
                raise AutoftError(f"{self.name}={value!r} is not one of {', '.join(self.choices)}")
            return str(value)
        try:
            number = self.type(value)
        except (TypeError, ValueError):
            raise AutoftError(f"{self.name}={value!r} is not a number") from None
        if isinstance(value, float) and self.type is int and value != number:
            raise AutoftError(f"{self.name}={value!r} must be a whole number")
        low_fails = self.minimum is not None and (number < self.minimum or (self.open_min and number == self.minimum))
        high_fails = self.maximum is not None and (number > self.maximum or (self.open_max and number == self.maximum))
        if low_fails or high_fails or (isinstance(number, float) and not math.isfinite(number)):
            raise AutoftError(f"{self.name}={value!r} is outside {self.bounds()}")
        return number


# Defaults are the known-good recipe; ranges suit fine-tuning on small data with AdamW.
PARAMS: tuple[ParamDef, ...] = (
    ParamDef("lr", float, 1e-3, "Learning rate (AdamW).", 1e-5, 1e-2, True, minimum=0.0, open_min=True),
    ParamDef("dropout", float, 0.1, "Dropout before the classifier.", 0.0, 0.5, minimum=0.0, maximum=1.0, open_max=True),
    ParamDef("weight_decay", float, 0.01, "AdamW weight decay.", 1e-6, 0.1, True, minimum=0.0),
    ParamDef("label_smoothing", float, 0.1, "Label smoothing of the cross-entropy.", 0.0, 0.3, minimum=0.0, maximum=1.0, open_max=True),
    ParamDef(
        "augment", str, "crop-flip", "Augmentation: crop-flip (random resized crop and flip), shift (random shifts of up to an eighth of the side, and flip), "
        "randaugment, trivialaugment (kornia's, after crop-flip) or none.",
        choices=AUGMENT_POLICIES,
    ),
    ParamDef(
        "augment_magnitude", int, 9, "RandAugment's magnitude, 0 to 30.", 3, 15, minimum=0, maximum=30, only_with=("augment", ("randaugment",))
    ),
    ParamDef("strategy", str, "freeze", "Fine-tuning strategy (see `autoft plugins`)."),
    ParamDef("regularizer", str, NO_REGULARIZER, "Regulariser combined with the strategy: none, mixup, cutmix, bss, fixmatch (with unlabelled images; see `autoft plugins`)."),
)
PARAM_DEFS = {p.name: p for p in PARAMS}

# Searched only from pretrained weights (see autoft.searching.space): from random weights there are
# no learned early layers for a decay to protect and no ImageNet statistics to keep. A recipe
# without them has them off (``default``); they live in ``Recipe.extra``, checked here.
PRETRAINED_PARAMS: tuple[ParamDef, ...] = (
    ParamDef(
        "lr_decay", float, 1.0, "Layer-wise learning-rate decay: group i of n (stem first) trains at lr * lr_decay**(n-1-i), the head at lr; 1 is none.",
        0.5, 1.0, minimum=0.0, maximum=1.0, open_min=True,
    ),
    ParamDef("bn", str, "adapt", "BatchNorm statistics: adapt (they follow the new images) or keep (the starting weights' running statistics, frozen).", choices=("adapt", "keep")),
    ParamDef(
        "head_init", str, "probe", "The head's start: probe (logistic regression on the starting weights' features of the training images, LP-FT's probe fitted to convergence) or random.",
        choices=("probe", "random"),
    ),
)
PRETRAINED_DEFS = {p.name: p for p in PRETRAINED_PARAMS}
# The default recipe from pretrained weights (LP-FT at a low learning rate) states them:
# - lr_decay 1.0: LP-FT already trains the body at lpft_body_lr_scale (0.3) of the head's rate, and
#   only after the probe; a decay on top would leave the stem at a few hundredths of it, close to
#   frozen. The search tries decays; the first trial stays the LP-FT recipe the tests pin.
# - bn keep: the default batch is 16 to 64 images of one small dataset, noisy statistics to replace
#   ImageNet's with, and LP-FT's body starts training only after the probe learned on the old ones.
#   Keras's transfer-learning guide likewise keeps BatchNorm in inference mode when it unfreezes a
#   pretrained model. A practitioner's default, not measured here: the search tries both.
# - head_init probe: see autoft.training.probe_head (a head trained by SGD within a short budget is
#   far from the probe the searched trials then lost to).
PRETRAINED_DEFAULTS: dict[str, Any] = {"lr_decay": 1.0, "bn": "keep", "head_init": "probe"}


def _params(self) -> dict[str, Any]:
    """The recipe as one flat dict, plugin parameters included (what a trial records)."""
    values = {p.name: getattr(self, p.name) for p in PARAMS if p.applies(vars(self))}
    return {**values, **self.extra}


def _from_params(cls, params: dict[str, Any]) -> "Recipe":
    """Split a flat dict into base fields (checked) and plugin parameters; missing fields take their defaults."""
    base = {k: PARAM_DEFS[k].check(v) for k, v in params.items() if k in PARAM_DEFS and v is not None}
    extra = {k: PRETRAINED_DEFS[k].check(v) if k in PRETRAINED_DEFS else v for k, v in params.items() if k not in PARAM_DEFS}
    return cls(**base, extra=extra)


Recipe = dataclasses.make_dataclass(
    "Recipe",
    [(p.name, p.type, dataclasses.field(default=p.default, metadata={"help": p.help})) for p in PARAMS]
    + [("extra", dict, dataclasses.field(default_factory=dict))],
    namespace={"params": _params, "from_params": classmethod(_from_params), "__module__": __name__},
    frozen=True,
)
Recipe.__doc__ = "A fine-tuning recipe: one field per :data:`PARAMS` entry, plus ``extra`` (strategy and regulariser parameters)."


def default_params() -> dict[str, Any]:
    """The known-good recipe's base parameters, as a trial records them."""
    return Recipe().params()


# ---------------------------------------------------------------------------
# Completing and checking a recipe


def resolve_recipe(given: dict[str, Any], n_groups: int, registry: plugins.Registry) -> Recipe:
    """Complete ``given`` with the defaults (base, strategy's, regulariser's) and check it.

    A value the user gave outside a range is an :class:`AutoftError`; a plugin's own default
    outside its own range is a :class:`PluginError` naming the plugin.
    """
    given = {k: v for k, v in given.items() if v is not None}
    recipe = Recipe.from_params(given)
    declared = {}
    owners = [("strategies", recipe.strategy, registry.strategy(recipe.strategy).factory(), (n_groups,))]
    if recipe.regularizer != NO_REGULARIZER:
        owners.append(("regularizers", recipe.regularizer, registry.regularizer(recipe.regularizer).factory(), ()))
    for kind, name, plugin, args in owners:
        label = plugin_label(registry, kind, name)
        defaults = _call(label, "default_params", plugin.default_params, *args)
        _check_declared(label, plugin, {**defaults}, args, own=True)
        wanted = {**defaults, **{k: v for k, v in given.items() if k in defaults or k not in PARAM_DEFS}}
        declared.update(_check_declared(label, plugin, wanted, args, own=False))
    return Recipe.from_params({**recipe.params(), **given, **declared})


def _call(label: str, what: str, fn, *args) -> Any:
    result = fn(*args)
    if not isinstance(result, dict):
        raise PluginError(f"{label}: {what}() returned {type(result).__name__}; expected a dict of parameter values")
    return result


def _check_declared(label: str, plugin, values: dict[str, Any], args: tuple, own: bool) -> dict[str, Any]:
    """Replay ``values`` through the plugin's ``suggest`` on a FixedTrial; return what it declared."""
    import optuna

    fixed = optuna.trial.FixedTrial(values)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # out-of-range values get our clearer error below
            plugin.suggest(fixed, *args)
    except ValueError as exc:  # a parameter the plugin needs is missing
        if own:
            raise PluginError(f"{label}: default_params() leaves out a parameter suggest() declares: {exc}") from None
        raise AutoftError(f"invalid parameters for {label}: {exc}") from None
    for name, distribution in fixed.distributions.items():
        if not _within(distribution, values[name]):
            if own:
                raise PluginError(f"{label}: its default {name}={values[name]!r} is outside its own range {_describe(distribution)}")
            raise AutoftError(f"invalid parameters for {label}: {name}={values[name]!r} is outside {_describe(distribution)}")
    return {name: values[name] for name in fixed.distributions}


def _within(distribution, value) -> bool:
    if hasattr(distribution, "choices"):
        return value in distribution.choices
    return distribution.low <= value <= distribution.high


def _describe(distribution) -> str:
    if hasattr(distribution, "choices"):
        return "{" + ", ".join(map(str, distribution.choices)) + "}"
    return f"[{distribution.low}, {distribution.high}]"
