"""Built-in fine-tuning strategies, written against the public strategy API (version 2)."""

from __future__ import annotations

from autoft import hookimpl
from autoft.finetune import freeze_first, l2sp_penalty, parameters
from autoft.specs import STRATEGY_API, Backbone, StrategySpec, TrainPlan


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
        self.penalty = l2sp_penalty(body, params["l2sp_alpha"]) if body else None
        return TrainPlan(groups)

    def loss_term(self, ctx, logits, targets, features):
        return self.penalty() if self.penalty is not None else None


class Discriminative:
    """Layer-wise learning-rate decay: every group trains, group ``i`` of ``n`` at
    ``lr * lr_decay**(n-1-i)``. The loop applies ``lr_decay`` to any strategy's groups
    (:func:`autoft.lifecycle.optimizer_groups`); this strategy trains everything and searches it
    from any weights."""

    def default_params(self, n_groups):
        return {"lr_decay": 0.7}

    def suggest(self, trial, n_groups):
        return {"lr_decay": trial.suggest_float("lr_decay", 0.3, 1.0)}

    def apply(self, backbone: Backbone, params) -> TrainPlan:
        return TrainPlan([{"params": freeze_first(backbone, 0)}])


class LinearProbeThenFineTune:
    """LP-FT (Kumar et al., 2022): train the head alone for the first ``lpft_probe_share`` of
    the epochs, then the groups from ``freeze_depth`` on too, at ``lpft_body_lr_scale``
    times the learning rate."""

    def __init__(self):
        self.tuning = False

    def default_params(self, n_groups):
        return {"freeze_depth": 0, "lpft_probe_share": 0.3, "lpft_body_lr_scale": 0.3}

    def suggest(self, trial, n_groups):
        return {
            "freeze_depth": _suggest_depth(trial, n_groups),
            "lpft_probe_share": trial.suggest_float("lpft_probe_share", 0.1, 0.7),
            "lpft_body_lr_scale": trial.suggest_float("lpft_body_lr_scale", 0.05, 1.0, log=True),
        }

    def apply(self, backbone: Backbone, params) -> TrainPlan:
        freeze_first(backbone, params["freeze_depth"])  # a depth out of range fails now, not when the probe ends
        return TrainPlan([{"params": freeze_first(backbone, len(backbone.groups) - 1)}])

    def on_epoch_start(self, ctx):
        probe_epochs = max(1, round(ctx.params["lpft_probe_share"] * ctx.epochs))
        if not self.tuning and ctx.epoch > probe_epochs:
            body = [g.name for g in ctx.backbone.groups[ctx.params["freeze_depth"] : -1]]
            ctx.unfreeze(ctx.group_parameters(body), lr_scale=ctx.params["lpft_body_lr_scale"])
            self.tuning = True

    def state_dict(self):
        return {"tuning": self.tuning}

    def load_state_dict(self, state):
        self.tuning = state["tuning"]


@hookimpl
def autoft_register_strategies(register):
    v2 = {"api_version": STRATEGY_API}
    register(StrategySpec("full", "Fine-tune every parameter", Full, **v2))
    register(StrategySpec("freeze", "Freeze the first freeze_depth parameter groups (BatchNorm statistics too)", Freeze, **v2))
    register(StrategySpec("linear-probe", "Train only the classifier head", LinearProbe, **v2))
    register(StrategySpec("l2sp", "Freeze depth plus L2-SP regularisation towards the starting weights", L2SP, **v2))
    register(StrategySpec("discriminative", "Layer-wise learning-rate decay from head to stem", Discriminative, **v2))
    register(StrategySpec("lp-ft", "Linear probe for a searched share of the epochs, then fine-tune everything (LP-FT)", LinearProbeThenFineTune, **v2))
