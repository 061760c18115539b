"""What strategies and regularisers see of the training loop, and the boundary that checks them.

A strategy or regulariser is a callback of the loop (:class:`autoft.specs.TrainCallback`):
it receives a :class:`TrainContext` at each phase. Whatever plugin code returns or raises
there is checked by :class:`PluginCallback`, and a mistake is reported as one
:class:`PluginError` line naming the plugin, its distribution and version, what was
expected and what came back.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from autoft.errors import AutoftError, PluginError  # noqa: F401 - PluginError: part of this module's API
from autoft.plugins import plugin_label  # noqa: F401 - part of this module's API
from autoft.plugin_loading import module_roots, one_line
from autoft.specs import STRATEGY_API, Backbone, TrainPlan

HOOKS = ("on_epoch_start", "transform_batch", "loss_term", "on_epoch_end", "state_dict", "load_state_dict")
TRAINING_HOOKS = HOOKS[:4]  # those that change training; state_dict and load_state_dict only keep state

_warned: set[str] = set()  # run-time warnings already given in this process, one each


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def describe_value(value: Any) -> str:
    """What a plugin returned, on one line: a value's type and shape, never its multi-line repr."""
    if isinstance(value, torch.Tensor):
        return f"a {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')} tensor"
    if isinstance(value, np.ndarray):
        return f"a {value.shape} {value.dtype} array" if value.ndim else f"a 0-d {value.dtype} array {value.item()!r}"
    if isinstance(value, tuple):
        return "(" + ", ".join(describe_value(v) for v in value) + ")"
    if isinstance(value, dict):
        return f"dict with keys {list(value)[:5]}"
    if isinstance(value, (list, set)):
        kinds = sorted({type(v).__name__ for v in value})
        return f"{type(value).__name__} of {len(value)} {'/'.join(kinds) or 'items'}"
    return f"{type(value).__name__} {value!r}"[:120].replace("\n", " ")


def source_files(obj: Any) -> list[Path]:
    """The files of the plugin ``obj`` (an object, a class or a function) comes from: its own
    file and its distribution's package."""
    target = obj if inspect.isroutine(obj) or isinstance(obj, type) else type(obj)
    try:
        own = [Path(inspect.getfile(target))]
    except (TypeError, OSError):  # a built-in, a functools.partial
        own = []
    module = getattr(target, "__module__", None)
    return own + (module_roots(module) if isinstance(module, str) else [])


# ---------------------------------------------------------------------------
# The context


@dataclass
class TrainContext:
    """The loop's state, passed to every callback. Read ``epoch``/``epochs``, ``step``/``steps``
    and ``steps_per_epoch``; change what trains with :meth:`unfreeze`."""

    backbone: Backbone
    params: dict[str, Any]
    optimizer: torch.optim.Optimizer
    device: torch.device
    num_classes: int
    epochs: int
    steps: int
    steps_per_epoch: int
    epoch: int = 0
    step: int = 0
    record: dict[str, float] | None = None  # the last finished epoch's losses and metrics
    unlabelled: torch.Tensor | None = None  # uint8 (N, 3, S, S) images without labels, when given
    hflip: bool = True  # whether horizontal flips keep labels true

    @property
    def model(self) -> torch.nn.Module:
        return self.backbone.model

    def group_parameters(self, names: Iterable[str]) -> list[torch.nn.Parameter]:
        """The parameters of the backbone groups called ``names`` (``"stem"``, ``"head"`` ...)."""
        wanted = set(names)
        unknown = wanted - {g.name for g in self.backbone.groups}
        if unknown:
            raise ValueError(f"no parameter group {sorted(unknown)}; groups are {[g.name for g in self.backbone.groups]}")
        by_name = dict(self.model.named_parameters())
        return [by_name[p] for g in self.backbone.groups if g.name in wanted for p in g.params]

    def unfreeze(self, params: Iterable[torch.nn.Parameter], *, lr_scale: float = 1.0, weight_decay: float | None = None) -> None:
        """Train ``params`` from the next step on, in a new optimizer group at ``lr_scale``
        times the learning rate (a parameter already in the optimizer keeps its group)."""
        known = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        fresh = []
        for p in params:
            p.requires_grad_(True)
            if id(p) not in known:
                fresh.append(p)
                known.add(id(p))
        for group in optimizer_groups(fresh, self.backbone, self.params, lr_scale, weight_decay) if fresh else ():
            self.optimizer.add_param_group(group)


def optimizer_group(params: list[torch.nn.Parameter], recipe: dict[str, Any], lr_scale: float = 1.0, weight_decay: float | None = None) -> dict[str, Any]:
    """An AdamW group; ``base_lr`` is what the schedule scales at every step."""
    base_lr = recipe["lr"] * lr_scale
    return {
        "params": params,
        "lr": base_lr,
        "base_lr": base_lr,
        "lr_scale": lr_scale,
        "weight_decay": recipe["weight_decay"] if weight_decay is None else weight_decay,
    }


def optimizer_groups(
    params: list[torch.nn.Parameter], backbone: Backbone, recipe: dict[str, Any], lr_scale: float = 1.0, weight_decay: float | None = None
) -> list[dict[str, Any]]:
    """:func:`optimizer_group`'s groups for ``params``, under the recipe's layer-wise
    learning-rate decay (``lr_decay``, 1 when absent): a parameter of backbone group ``i`` of
    ``n`` trains at ``lr_scale * lr_decay**(n-1-i)``, the head (the last group) at ``lr_scale``.
    Applied here, once, it holds for every strategy, whatever groups its plan makes, and for
    what a strategy unfreezes later."""
    decay = float(recipe.get("lr_decay", 1.0))
    if decay == 1.0:
        return [optimizer_group(params, recipe, lr_scale, weight_decay)]
    n = len(backbone.groups)
    by_name = dict(backbone.model.named_parameters())
    depth = {id(by_name[name]): i for i, group in enumerate(backbone.groups) for name in group.params if name in by_name}
    split: dict[int, list[torch.nn.Parameter]] = {}
    for p in params:
        split.setdefault(depth.get(id(p), n - 1), []).append(p)  # a parameter outside the backbone's groups trains as the head does
    return [optimizer_group(split[i], recipe, lr_scale * decay ** (n - 1 - i), weight_decay) for i in sorted(split)]


# ---------------------------------------------------------------------------
# The boundary


class PluginCallback:
    """One plugin object in the loop: calls only the hooks it implements, checks what comes back."""

    def __init__(self, obj: Any, label: str, *, kind: str | None = None, name: str | None = None):
        self.obj, self.label, self.kind, self.name = obj, label, kind, name
        self.hooks = {hook for hook in HOOKS if callable(getattr(obj, hook, None))}
        self.files = source_files(obj)
        self.names: dict[str, str] = {}  # hook -> what the plugin calls it, where that differs (API 1's extra_loss)
        if kind == "regularizers" and not self.hooks & set(TRAINING_HOOKS):
            warn_once(f"{label} implements none of {', '.join(TRAINING_HOOKS)}: it changes nothing in training")

    def named(self, hook: str) -> str:
        """``loss_term()``, or the name the plugin gave the method that serves as it."""
        return self.names.get(hook, f"{hook}()")

    def fail(self, what: str, expected: str, got: Any) -> PluginError:
        return PluginError(f"{self.label}: {what} returned {describe_value(got)}; expected {expected}", kind=self.kind, name=self.name)

    def call(self, hook: str, *args: Any) -> Any:
        try:
            return getattr(self.obj, hook)(*args)
        except (AutoftError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as exc:  # named at the innermost line of the plugin's own code, not autoft's
            raise PluginError(f"{self.label}: {self.named(hook)} raised {one_line(exc, self.files)}", kind=self.kind, name=self.name) from exc

    def epoch_hook(self, hook: str, ctx: TrainContext) -> None:
        if hook in self.hooks:
            result = self.call(hook, ctx)
            if result is not None:
                raise self.fail(f"{hook}()", "None", result)

    def transform_batch(self, ctx: TrainContext, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        result = self.call("transform_batch", ctx, images, targets)
        if not (isinstance(result, tuple) and len(result) == 2 and all(isinstance(t, torch.Tensor) for t in result)) or (
            result[0].shape != images.shape or result[1].shape != targets.shape
        ):
            raise self.fail(self.named("transform_batch"), f"(images {tuple(images.shape)}, targets {tuple(targets.shape)})", result)
        return result

    def loss_term(self, ctx: TrainContext, logits: torch.Tensor, targets: torch.Tensor, features: torch.Tensor) -> torch.Tensor | None:
        term = self.call("loss_term", ctx, logits, targets, features)
        if term is not None and not (isinstance(term, torch.Tensor) and term.ndim == 0):
            raise self.fail(self.named("loss_term"), "a scalar tensor or None", term)
        return term

    def state_dict(self) -> dict[str, Any]:
        if "state_dict" not in self.hooks:
            return {}
        state = self.call("state_dict")
        if not isinstance(state, dict):
            raise self.fail("state_dict()", "a dict", state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "load_state_dict" in self.hooks:
            self.call("load_state_dict", state)


def apply_strategy(strategy: PluginCallback, backbone: Backbone, params: dict[str, Any], api_version: int) -> TrainPlan:
    """Call the strategy's ``apply`` and check its plan; a version-1 ``extra_loss`` becomes a loss term."""
    if api_version > STRATEGY_API:
        from autoft import __version__

        raise PluginError(
            f"{strategy.label} is written for strategy API {api_version}; this autoft ({__version__}) offers API {STRATEGY_API}: "
            "upgrade autoft", kind=strategy.kind, name=strategy.name,
        )  # fmt: skip
    plan = strategy.call("apply", backbone, params)
    if not isinstance(plan, TrainPlan):
        raise strategy.fail("apply()", "TrainPlan", plan)
    groups = plan.param_groups
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), (list, tuple)) for g in groups):
        raise strategy.fail("apply()", "TrainPlan.param_groups as a list of {'params': [...], ...} dicts", groups)
    _warn_stray_parameters(strategy, backbone, groups)
    if plan.extra_loss is not None:
        if api_version >= STRATEGY_API:
            raise PluginError(
                f"{strategy.label}: apply() returned TrainPlan.extra_loss, which API version {STRATEGY_API} replaces by "
                "loss_term(ctx, logits, targets, features); a plugin written for API 1 says StrategySpec(..., api_version=1)",
                kind=strategy.kind, name=strategy.name,
            )  # fmt: skip
        warnings.warn(
            f"{strategy.label} is written for autoft's strategy API 1 (TrainPlan.extra_loss); it still works, "
            f"but API {STRATEGY_API} adds loss terms through loss_term(ctx, logits, targets, features): see docs/plugins.md",
            DeprecationWarning,
            stacklevel=2,
        )
        strategy.obj = _LegacyLoss(strategy.obj, plan.extra_loss)
        strategy.hooks.add("loss_term")
        strategy.names["loss_term"] = f"TrainPlan.extra_loss ({getattr(plan.extra_loss, '__qualname__', 'extra_loss')}())"
    return plan


def _warn_stray_parameters(strategy: PluginCallback, backbone: Backbone, groups: list[dict[str, Any]]) -> None:
    """Parameters left trainable outside every group get gradients but no optimizer step: say so, once."""
    planned = {id(p) for g in groups for p in g["params"]}
    stray = [name for name, p in backbone.model.named_parameters() if p.requires_grad and id(p) not in planned]
    if stray:
        warn_once(
            f"{strategy.label}: apply() leaves {len(stray)} parameter(s) trainable outside its TrainPlan ({', '.join(stray[:3])}"
            f"{', ...' if len(stray) > 3 else ''}); they get gradients but never train: freeze them or add them to a group"
        )


class _LegacyLoss:
    """A version-1 strategy whose ``extra_loss()`` serves as its loss term."""

    def __init__(self, strategy: Any, extra_loss):
        self._strategy, self._extra_loss = strategy, extra_loss

    def __getattr__(self, name: str) -> Any:
        return getattr(self._strategy, name)

    def loss_term(self, ctx, logits, targets, features):
        return self._extra_loss()
