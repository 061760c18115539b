"""Built-in fine-tuning strategies."""

from __future__ import annotations

from autoft import hookimpl
from autoft.finetune import freeze_first, l2sp_penalty, parameters
from autoft.specs import Backbone, StrategySpec, TrainPlan


def _suggest_depth(trial, n_groups: int) -> int:
    # 0 trains everything; n_groups - 1 leaves only the head.
    return trial.suggest_int("freeze_depth", 0, n_groups - 1)


class Full:
    """Every parameter trains."""

    def default_params(self, n_groups):
        return {}

    def suggest(self, trial, n_groups):
        return {}

    def apply(self, backbone: Backbone, params) -> TrainPlan:
        return TrainPlan([{"params": freeze_first(backbone, 0)}])


class Freeze:
    """The first ``freeze_depth`` groups are frozen, BatchNorm statistics included."""

    def default_params(self, n_groups):
        return {"freeze_depth": 0}

    def suggest(self, trial, n_groups):
        return {"freeze_depth": _suggest_depth(trial, n_groups)}

    def apply(self, backbone: Backbone, params) -> TrainPlan:
        return TrainPlan([{"params": freeze_first(backbone, params["freeze_depth"])}])


class LinearProbe:
    """Only the classifier head trains."""

    def default_params(self, n_groups):
        return {}

    def suggest(self, trial, n_groups):
        return {}

    def apply(self, backbone: Backbone, params) -> TrainPlan:
        return TrainPlan([{"params": freeze_first(backbone, len(backbone.groups) - 1)}])


class L2SP:
    """Freeze depth plus L2-SP: trainable backbone weights are pulled towards their starting
    values (strength ``l2sp_alpha``) instead of towards zero; weight decay stays on the head."""

    def default_params(self, n_groups):
        return {"freeze_depth": 0, "l2sp_alpha": 0.01}

    def suggest(self, trial, n_groups):
        return {
            "freeze_depth": _suggest_depth(trial, n_groups),
            "l2sp_alpha": trial.suggest_float("l2sp_alpha", 1e-4, 1.0, log=True),
        }

    def apply(self, backbone: Backbone, params) -> TrainPlan:
        freeze_first(backbone, params["freeze_depth"])
        body = [p for p in parameters(backbone, tuple(g.name for g in backbone.groups[:-1])) if p.requires_grad]
        head = parameters(backbone, (backbone.head.name,))
        groups = [{"params": head}]
        if body:
            groups.insert(0, {"params": body, "weight_decay": 0.0})
        return TrainPlan(groups, extra_loss=l2sp_penalty(body, params["l2sp_alpha"]) if body else None)


class Discriminative:
    """Layer-wise learning-rate decay: group ``i`` of ``n`` trains at ``lr * lr_decay**(n-1-i)``."""

    def default_params(self, n_groups):
        return {"lr_decay": 0.7}

    def suggest(self, trial, n_groups):
        return {"lr_decay": trial.suggest_float("lr_decay", 0.3, 1.0)}

    def apply(self, backbone: Backbone, params) -> TrainPlan:
        freeze_first(backbone, 0)
        n = len(backbone.groups)
        return TrainPlan(
            [
                {"params": parameters(backbone, (g.name,)), "lr_scale": params["lr_decay"] ** (n - 1 - i)}
                for i, g in enumerate(backbone.groups)
                if g.params
            ]
        )


@hookimpl
def autoft_register_strategies(register):
    register(StrategySpec("full", "Fine-tune every parameter", Full))
    register(StrategySpec("freeze", "Freeze the first freeze_depth parameter groups (BatchNorm statistics too)", Freeze))
    register(StrategySpec("linear-probe", "Train only the classifier head", LinearProbe))
    register(StrategySpec("l2sp", "Freeze depth plus L2-SP regularisation towards the starting weights", L2SP))
    register(StrategySpec("discriminative", "Layer-wise learning-rate decay from head to stem", Discriminative))
