"""The strategy and regulariser contracts: what the training loop's lifecycle relies on."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from autoft import plugins
from autoft.specs import Backbone, StrategySpec
from autoft.testing.common import _Contract, synthetic_splits


class _Recorder:
    """A callback after the plugin's own: which parameters train at each epoch, their values
    then, and their values after the last epoch (the loop then restores the best epoch's)."""

    def __init__(self):
        self.trainable_at: dict[int, set[str]] = {}
        self.values_at: dict[int, dict[str, torch.Tensor]] = {}
        self.last: dict[str, torch.Tensor] = {}

    def on_epoch_start(self, ctx):
        named = dict(ctx.model.named_parameters())
        self.trainable_at[ctx.epoch] = {n for n, p in named.items() if p.requires_grad}
        self.values_at[ctx.epoch] = {n: p.detach().clone() for n, p in named.items()}

    def on_epoch_end(self, ctx):
        self.last = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}


class _LifecycleChecks(_Contract, abc.ABC):
    """Runs a few epochs of the real loop, straight and interrupted-then-resumed."""

    backbone_name: str = "test_resnet"
    lifecycle_epochs: int = 3

    @abc.abstractmethod
    def recipe(self, name: str, registry: plugins.Registry, n_groups: int) -> Any:
        """The recipe that trains plugin ``name``, every other value at its default."""

    def run(self, name: str, registry, *, state_file: Path | None = None, stop_after: int | None = None, callbacks=()):
        """Train ``lifecycle_epochs`` epochs from the same start; optionally crash right after epoch ``stop_after``."""
        from autoft.model.backbones import build_backbone
        from autoft.core.events import EpochEnd
        from autoft.training.trainer import Trainer, TrainerConfig

        torch.manual_seed(0)
        backbone = build_backbone(self.backbone_name, num_classes=3, registry=registry)
        config = TrainerConfig(epochs=self.lifecycle_epochs, batch_size=8, device="cpu", state_file=state_file, state_interval=0)

        def crash(event):
            if isinstance(event, EpochEnd) and not event.resumed and event.epoch == stop_after:
                raise KeyboardInterrupt

        unlabelled = synthetic_splits(seed=1).train.images  # for regularisers that use unlabelled images (FixMatch)
        trainer = Trainer(
            backbone, synthetic_splits(), self.recipe(name, registry, len(backbone.groups)), config, registry=registry, on_event=crash,
            callbacks=callbacks, unlabelled=unlabelled,
        )  # fmt: skip
        try:
            return trainer.fit(), backbone
        except KeyboardInterrupt:
            return None, backbone

    def check_resume(self, name: str, registry, tmp_path: Path, what: str) -> None:
        straight, straight_model = self.run(name, registry)
        state, stop_after = tmp_path / "state.pt", self.lifecycle_epochs // 2
        assert self.run(name, registry, state_file=state, stop_after=stop_after)[0] is None and state.is_file()
        resumed, resumed_model = self.run(name, registry, state_file=state)
        losses = [r["train_loss"] for r in resumed.history], [r["train_loss"] for r in straight.history]
        expected = straight_model.model.state_dict()
        differs = [n for n, v in resumed_model.model.state_dict().items() if not torch.equal(v, expected[n])]
        assert losses[0] == losses[1] and not differs, (
            f"resumed after epoch {stop_after} of {self.lifecycle_epochs}, the run differs from an uninterrupted one "
            f"(train losses {losses[0]} vs {losses[1]}; weights {differs[:3]}): does {what}'s state_dict() hold "
            "everything load_state_dict() needs (its phase, its counters)?"
        )

    def check_state_is_plain_data(self, obj: Any, what: str) -> None:
        import io

        state = obj.state_dict() if callable(getattr(obj, "state_dict", None)) else {}
        assert isinstance(state, dict), f"{what}.state_dict() must return a dict, got {type(state).__name__}"
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        try:
            torch.load(buffer, weights_only=True)
        except Exception as exc:
            raise AssertionError(f"{what}.state_dict() must hold only tensors, numbers, strings, lists and dicts (resuming loads it with weights_only=True): {exc}") from None


class StrategyContract(_LifecycleChecks):
    """What autoft relies on in a fine-tuning strategy: set ``strategy_name``.

    The checks train ``backbone_name`` (a tiny timm model by default) on small synthetic
    images: one epoch, then ``lifecycle_epochs`` epochs to check that parameters the
    strategy unfreezes later do train, and that a run resumed from its saved state
    continues exactly (the strategy's ``state_dict`` holds its phase).
    """

    strategy_name: str = ""
    trials: int = 4

    @pytest.fixture
    def strategy_under_test(self) -> str:
        if not self.strategy_name:
            raise AssertionError(f"{type(self).__name__} must set strategy_name or override strategy_under_test")
        return self.strategy_name

    @pytest.fixture
    def backbone(self, registry) -> Backbone:
        from autoft.model.backbones import build_backbone

        torch.manual_seed(0)
        return build_backbone(self.backbone_name, num_classes=3, registry=registry)

    def strategy(self, name: str, registry: plugins.Registry):
        spec = registry.strategy(name)
        assert isinstance(spec, StrategySpec)
        return spec.factory()

    def recipe(self, name, registry, n_groups):
        from autoft.model.recipe import resolve_recipe

        return resolve_recipe({"strategy": name}, n_groups, registry)

    def sampled_params(self, name: str, registry: plugins.Registry, n_groups: int) -> list[dict[str, Any]]:
        """``trial.params`` of a few random trials, drawn through ``autoft search``'s own search space."""
        import optuna

        from autoft.searching import SearchSpace

        strategy = self.strategy(name, registry)
        space = SearchSpace(strategies=(name,), regularizers=("none",))
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))

        def objective(trial):
            params = space.suggest(trial, {name: strategy}, n_groups)
            assert params == trial.params, "suggest() must return exactly the values it declared on the trial"
            return 0.0

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study.optimize(objective, n_trials=self.trials)
        return [t.params for t in study.trials]

    def test_default_params_are_what_suggest_declares(self, strategy_under_test, registry, backbone):
        import optuna

        from autoft.model.recipe import resolve_recipe

        n = len(backbone.groups)
        strategy = self.strategy(strategy_under_test, registry)
        defaults = strategy.default_params(n)
        fixed = optuna.trial.FixedTrial(defaults)
        assert strategy.suggest(fixed, n) == defaults
        assert set(fixed.params) == set(defaults)
        resolve_recipe({**defaults, "strategy": strategy_under_test}, n, registry)  # raises when a default is outside its declared range

    def test_fixed_trial_replays_a_search_trial(self, strategy_under_test, registry, backbone):
        """autoft retrains a search's best trial from its recorded parameters."""
        import optuna

        n = len(backbone.groups)
        strategy = self.strategy(strategy_under_test, registry)
        for params in self.sampled_params(strategy_under_test, registry, n):
            own = strategy.suggest(optuna.trial.FixedTrial(params), n)
            assert own == {k: params[k] for k in own}

    def test_search_space_describes_every_parameter(self, strategy_under_test, registry, backbone):
        from autoft.searching import SearchSpace

        n = len(backbone.groups)
        strategy = self.strategy(strategy_under_test, registry)
        described = SearchSpace(strategies=(strategy_under_test,), regularizers=("none",)).describe(n, {strategy_under_test: strategy})
        assert set(strategy.default_params(n)) <= set(described)

    def test_plan_trains_only_grouped_parameters(self, strategy_under_test, registry, backbone):
        from autoft.lifecycle import PluginCallback, apply_strategy, plugin_label
        from autoft.model.recipe import resolve_recipe

        n = len(backbone.groups)
        spec = registry.strategy(strategy_under_test)
        for trial_params in [self.strategy(strategy_under_test, registry).default_params(n), *self.sampled_params(strategy_under_test, registry, n)]:
            params = resolve_recipe({**trial_params, "strategy": strategy_under_test}, n, registry).params()
            strategy = PluginCallback(self.strategy(strategy_under_test, registry), plugin_label(registry, "strategies", strategy_under_test))
            plan = apply_strategy(strategy, backbone, params, spec.api_version)  # a wrong return type fails here, naming the plugin
            model_params = {id(p) for p in backbone.model.parameters()}
            planned = [id(p) for g in plan.param_groups for p in g["params"]]
            assert len(planned) == len(set(planned)), "a parameter is in two optimizer groups"
            assert set(planned) <= model_params, "optimizer groups hold parameters of another model"
            assert any(p.requires_grad for g in plan.param_groups for p in g["params"]), "nothing trains"
            loose = [n for n, p in backbone.model.named_parameters() if p.requires_grad and id(p) not in set(planned)]
            assert not loose, f"trainable parameters in no optimizer group: {loose[:5]}"
            assert all(g.get("lr_scale", 1.0) > 0 for g in plan.param_groups)

    def test_one_epoch_trains(self, strategy_under_test, registry, backbone):
        from autoft.training.trainer import Trainer, TrainerConfig

        before = {n: p.detach().clone() for n, p in backbone.model.named_parameters()}
        result = Trainer(backbone, synthetic_splits(), self.recipe(strategy_under_test, registry, len(backbone.groups)), TrainerConfig(epochs=1, batch_size=8, device="cpu"), registry=registry).fit()
        assert len(result.history) == 1 and np.isfinite(result.history[0]["train_loss"])
        after = dict(backbone.model.named_parameters())
        for name, p in after.items():
            if not p.requires_grad:
                assert torch.equal(before[name], p.detach()), f"frozen parameter {name} changed"
        assert any(not torch.equal(before[n], p.detach()) for n, p in after.items()), "no parameter changed"

    def test_parameters_it_unfreezes_later_train(self, strategy_under_test, registry):
        recorder = _Recorder()
        self.run(strategy_under_test, registry, callbacks=[recorder])
        final = recorder.last
        epochs = sorted(recorder.trainable_at)
        for epoch in epochs[1:]:  # what trains from the start is checked by the plan and one-epoch checks
            started = recorder.values_at[epoch]
            newly = recorder.trainable_at[epoch] - recorder.trainable_at[epoch - 1]
            idle = [n for n in newly if torch.equal(started[n], final[n])]
            assert not idle, (
                f"{len(idle)} parameter(s) the strategy made trainable at epoch {epoch} never changed afterwards "
                f"(e.g. {idle[:3]}); unfreeze them with ctx.unfreeze(...) in on_epoch_start, at a learning-rate scale above 0"
            )
        never = set(final) - set().union(*recorder.trainable_at.values())
        moved = [n for n in never if not torch.equal(recorder.values_at[epochs[0]][n], final[n])]
        assert not moved, f"parameters that were never trainable changed: {moved[:3]}"

    def test_state_survives_save_and_restore(self, strategy_under_test, registry, tmp_path):
        self.check_state_is_plain_data(self.strategy(strategy_under_test, registry), f"strategy {strategy_under_test!r}")
        self.check_resume(strategy_under_test, registry, tmp_path, f"strategy {strategy_under_test!r}")


class RegularizerContract(_LifecycleChecks):
    """What autoft relies on in a regulariser: set ``regularizer_name``. The checks combine it
    with ``strategy`` (``full`` by default) on small synthetic images."""

    regularizer_name: str = ""
    strategy: str = "full"

    @pytest.fixture
    def regularizer_under_test(self) -> str:
        if not self.regularizer_name:
            raise AssertionError(f"{type(self).__name__} must set regularizer_name or override regularizer_under_test")
        return self.regularizer_name

    def recipe(self, name, registry, n_groups):
        from autoft.model.recipe import resolve_recipe

        return resolve_recipe({"strategy": self.strategy, "regularizer": name}, n_groups, registry)

    def context(self, name: str, registry) -> Any:
        from autoft.model.backbones import build_backbone
        from autoft.lifecycle import TrainContext

        torch.manual_seed(0)
        backbone = build_backbone(self.backbone_name, num_classes=3, registry=registry)
        params = self.recipe(name, registry, len(backbone.groups)).params()
        optimizer = torch.optim.AdamW(backbone.model.parameters())
        return TrainContext(
            backbone=backbone, params=params, optimizer=optimizer, device=torch.device("cpu"), num_classes=3, epochs=2, steps=4,
            steps_per_epoch=2, epoch=1, unlabelled=synthetic_splits(seed=1).train.images,
        )  # fmt: skip

    def test_default_params_are_what_suggest_declares(self, regularizer_under_test, registry):
        import optuna

        from autoft.model.recipe import resolve_recipe

        regularizer = registry.regularizer(regularizer_under_test).factory()
        defaults = regularizer.default_params()
        assert regularizer.suggest(optuna.trial.FixedTrial(defaults)) == defaults
        resolve_recipe({**defaults, "regularizer": regularizer_under_test}, 6, registry)  # raises when a default is outside its declared range

    def test_its_hooks_keep_their_contract(self, regularizer_under_test, registry):
        """``transform_batch`` keeps shapes and targets that are distributions; ``loss_term`` is a finite scalar."""
        regularizer = registry.regularizer(regularizer_under_test).factory()
        hooks = [h for h in ("on_epoch_start", "transform_batch", "loss_term", "on_epoch_end") if callable(getattr(regularizer, h, None))]
        assert hooks, "a regulariser must implement at least one lifecycle method (transform_batch, loss_term, ...)"
        ctx = self.context(regularizer_under_test, registry)
        images = synthetic_splits().train.images[:8].float() / 255
        targets = torch.nn.functional.one_hot(torch.arange(8) % 3, 3).float()
        if "transform_batch" in hooks:
            out = regularizer.transform_batch(ctx, images, targets)
            assert isinstance(out, tuple) and len(out) == 2, f"transform_batch() must return (images, targets), got {type(out).__name__}"
            assert out[0].shape == images.shape and out[1].shape == targets.shape, "transform_batch() must keep the shapes"
            assert torch.allclose(out[1].sum(1), torch.ones(8)) and (out[1] >= 0).all(), "targets must stay distributions over the classes"
        if "loss_term" in hooks:
            term = regularizer.loss_term(ctx, ctx.model(images), targets, ctx.backbone.embed(images))
            assert term is None or (isinstance(term, torch.Tensor) and term.ndim == 0 and torch.isfinite(term)), f"loss_term() must return a finite scalar or None, got {term}"

    def test_trains_with_a_strategy(self, regularizer_under_test, registry):
        result, _ = self.run(regularizer_under_test, registry)
        assert all(np.isfinite(r["train_loss"]) for r in result.history)

    def test_state_survives_save_and_restore(self, regularizer_under_test, registry, tmp_path):
        self.check_state_is_plain_data(registry.regularizer(regularizer_under_test).factory(), f"regularizer {regularizer_under_test!r}")
        self.check_resume(regularizer_under_test, registry, tmp_path, f"regularizer {regularizer_under_test!r}")
