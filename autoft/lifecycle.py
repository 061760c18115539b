"""What strategies and regularisers see of the training loop, and the boundary that checks them.

A strategy or regulariser is a callback of the loop (:class:`autoft.specs.TrainCallback`):
it receives a :class:`TrainContext` at each phase. Whatever plugin code returns or raises
there is checked by :class:`PluginCallback`, and a mistake is reported as one
:class:`PluginError` line naming the plugin, its distribution and version, what was
expected and what came back.
"""

from __future__ import annotations

import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from autoft import plugins
from autoft.errors import AutoftError
from autoft.specs import STRATEGY_API, Backbone, TrainPlan

HOOKS = ("on_epoch_start", "transform_batch", "loss_term", "on_epoch_end", "state_dict", "load_state_dict")


class PluginError(AutoftError):
    """A plugin returned or raised something autoft cannot use; the message names the plugin."""


def plugin_label(registry: plugins.Registry | None, kind: str, name: str) -> str:
    """``strategy 'lp-ft' (autoft 0.1.0)``: what a message needs to send the user to the right package."""
    what = {"strategies": "strategy", "regularizers": "regularizer", "metrics": "metric", "pretrainers": "pretraining method"}[kind]
    registered = getattr(registry, kind, {}).get(name) if registry is not None else None
    if registered is None:
        return f"{what} {name!r}"
    info = registered.plugin
    return f"{what} {name!r} ({info.package} {info.version})".replace(" )", ")")


def describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')} tensor"
    if isinstance(value, tuple):
        return "(" + ", ".join(describe_value(v) for v in value) + ")"
    if isinstance(value, dict):
        return f"dict with keys {list(value)[:5]}"
    if isinstance(value, (list, set)):
        kinds = sorted({type(v).__name__ for v in value})
        return f"{type(value).__name__} of {len(value)} {'/'.join(kinds) or 'items'}"
    return f"{type(value).__name__} {value!r}"[:120].replace("\n", " ")


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    return f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""


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
        if fresh:
            self.optimizer.add_param_group(optimizer_group(fresh, self.params, lr_scale, weight_decay))


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


# ---------------------------------------------------------------------------
# The boundary


class PluginCallback:
    """One plugin object in the loop: calls only the hooks it implements, checks what comes back."""

    def __init__(self, obj: Any, label: str):
        self.obj, self.label = obj, label
        self.hooks = {name for name in HOOKS if callable(getattr(obj, name, None))}

    def fail(self, what: str, expected: str, got: Any) -> PluginError:
        return PluginError(f"{self.label}: {what} returned {describe_value(got)}; expected {expected}")

    def call(self, hook: str, *args: Any) -> Any:
        try:
            return getattr(self.obj, hook)(*args)
        except (AutoftError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as exc:
            raise PluginError(f"{self.label}: {hook}() raised {type(exc).__name__}: {exc}{_where(exc)}".replace("\n", " ")) from exc

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
            raise self.fail("transform_batch()", f"(images {tuple(images.shape)}, targets {tuple(targets.shape)})", result)
        return result

    def loss_term(self, ctx: TrainContext, logits: torch.Tensor, targets: torch.Tensor, features: torch.Tensor) -> torch.Tensor | None:
        term = self.call("loss_term", ctx, logits, targets, features)
        if term is not None and not (isinstance(term, torch.Tensor) and term.ndim == 0):
            raise self.fail("loss_term()", "a scalar tensor or None", term)
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
    plan = strategy.call("apply", backbone, params)
    if not isinstance(plan, TrainPlan):
        raise strategy.fail("apply()", "TrainPlan", plan)
    groups = plan.param_groups
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), (list, tuple)) for g in groups):
        raise strategy.fail("apply()", "TrainPlan.param_groups as a list of {'params': [...], ...} dicts", groups)
    if plan.extra_loss is not None:
        if api_version >= STRATEGY_API:
            raise PluginError(f"{strategy.label}: apply() returned TrainPlan.extra_loss, which API version {STRATEGY_API} replaces by loss_term(ctx, logits, targets, features)")
        warnings.warn(
            f"{strategy.label} is written for autoft's strategy API 1 (TrainPlan.extra_loss); it still works, "
            f"but API {STRATEGY_API} adds loss terms through loss_term(ctx, logits, targets, features): see docs/plugins.md",
            DeprecationWarning,
            stacklevel=2,
        )
        strategy.obj = _LegacyLoss(strategy.obj, plan.extra_loss)
        strategy.hooks.add("loss_term")
    return plan


class _LegacyLoss:
    """A version-1 strategy whose ``extra_loss()`` serves as its loss term."""

    def __init__(self, strategy: Any, extra_loss):
        self._strategy, self._extra_loss = strategy, extra_loss

    def __getattr__(self, name: str) -> Any:
        return getattr(self._strategy, name)

    def loss_term(self, ctx, logits, targets, features):
        return self._extra_loss()
