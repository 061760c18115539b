"""Contract tests for autoft plugins, to subclass in a plugin's own test suite.

In the manner of ``optuna.testing``: each class holds pytest tests that check one kind of
plugin against what autoft relies on. Subclass it in a ``test_*.py`` file, name the
thing under test, and pytest runs every check on it::

    from autoft.testing import BackboneContract

    class TestTinyNet(BackboneContract):
        backbone_name = "mynets:tiny"

To check several names at once, override the ``*_under_test`` fixture with params::

    class TestMyNets(BackboneContract):
        @pytest.fixture(params=["mynets:tiny", "mynets:small"])
        def backbone_under_test(self, request):
            return request.param

The checks look names up in the installed plugins (``autoft.plugins.registry()``). A
plugin that is not installed (a module in a test folder) overrides the ``registry``
fixture, as :func:`registry_with` shows.

Requires pytest (a test dependency of autoft plugins, not of autoft).
"""

from __future__ import annotations

import abc

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from autoft import plugins
from autoft.errors import AutoftError
from autoft.specs import Backbone, BackboneSpec, DatasetSpec, LabelledImages, PretrainerSpec, StrategySpec

__all__ = [
    "BackboneContract", "DatasetContract", "StrategyContract", "RegularizerContract", "MetricContract", "PretrainerContract",
    "registry_with", "synthetic_splits",
]  # fmt: skip


def registry_with(*modules: object, builtins: bool = True) -> plugins.Registry:
    """A registry with ``modules`` registered as plugins (and the installed ones when ``builtins``).

    For testing a plugin that is not installed::

        @pytest.fixture
        def registry(self):
            return registry_with(my_plugin_module)
    """
    import pluggy

    if builtins:
        pm = plugins.get_plugin_manager()
    else:
        pm = pluggy.PluginManager("autoft")
        pm.add_hookspecs(plugins.hookspecs)
    for module in modules:
        plugins.register_plugin(pm, module, getattr(module, "__name__", type(module).__name__))
    return plugins.build_registry(pm)


def synthetic_splits(num_classes: int = 3, per_class: int = 8, image_size: int = 32, seed: int = 0):
    """Small labelled images whose class shows in their colour: enough for a training step."""
    from autoft.data import DataSplits, ImageTensors

    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    colours = torch.rand(num_classes, 3, 1, 1, generator=generator) * 200 + 28
    noise = torch.randn(len(labels), 3, image_size, image_size, generator=generator) * 20
    images = (colours[labels] + noise).clamp(0, 255).to(torch.uint8)
    val = torch.arange(len(labels)) % 4 == 0
    return DataSplits(
        train=ImageTensors(images[~val], labels[~val]),
        val=ImageTensors(images[val], labels[val]),
        test=None,
        classes=[f"class{i}" for i in range(num_classes)],
        image_size=image_size,
    )


class _Contract:
    @pytest.fixture
    def registry(self) -> plugins.Registry:
        """Where names are looked up: the installed plugins."""
        return plugins.registry()


# ---------------------------------------------------------------------------
# Backbones


class BackboneContract(_Contract):
    """What autoft relies on in a backbone source: set ``backbone_name`` (``SOURCE:MODEL``).

    ``image_size`` is the input size the checks use; raise it for models that need more
    than 32 pixels. ``num_classes`` is the classifier width the checks ask for.
    """

    backbone_name: str = ""
    image_size: int = 32
    num_classes: int = 3

    @pytest.fixture
    def backbone_under_test(self) -> str:
        if not self.backbone_name:
            raise AssertionError(f"{type(self).__name__} must set backbone_name or override backbone_under_test")
        return self.backbone_name

    def build(self, name: str, registry: plugins.Registry, num_classes: int | None = None, dropout: float = 0.0) -> Backbone:
        from autoft.backbones import build_backbone

        torch.manual_seed(0)
        return build_backbone(name, num_classes=num_classes or self.num_classes, dropout=dropout, registry=registry)

    def images(self, n: int = 2) -> torch.Tensor:
        return torch.rand(n, 3, self.image_size, self.image_size, generator=torch.Generator().manual_seed(0))

    def test_source_offers_the_model(self, backbone_under_test, registry):
        spec, model_name = registry.backbone(backbone_under_test)
        assert isinstance(spec, BackboneSpec)
        assert spec.has_model(model_name)
        assert not spec.has_model(model_name + "-no-such-variant")
        assert model_name in set(spec.list_models()), "list_models() feeds 'did you mean' suggestions"

    def test_builds(self, backbone_under_test, registry):
        backbone = self.build(backbone_under_test, registry)
        assert isinstance(backbone, Backbone)
        assert isinstance(backbone.model, torch.nn.Module)
        assert len(backbone.groups) >= 2, "at least one body group and the head"
        assert backbone.num_features > 0 and backbone.input_size > 0
        assert len(backbone.mean) == 3 and len(backbone.std) == 3 and min(backbone.std) > 0

    def test_forward_shape(self, backbone_under_test, registry):
        backbone = self.build(backbone_under_test, registry)
        x = self.images()
        backbone.model.train()  # a batch of two must train (BatchNorm)
        assert backbone.model(x).shape == (2, self.num_classes)
        logits = backbone.model.eval()(x)
        assert logits.shape == (2, self.num_classes)
        assert torch.isfinite(logits).all()

    def test_embed_gives_pooled_features_that_train(self, backbone_under_test, registry):
        backbone = self.build(backbone_under_test, registry)
        features = backbone.embed(self.images())
        assert features.shape == (2, backbone.num_features)
        features.float().pow(2).mean().backward()  # pretraining methods train through embed
        body = {p for g in backbone.groups[:-1] for p in g.params}
        trained = [n for n, p in backbone.model.named_parameters() if n in body and p.grad is not None and p.grad.abs().sum() > 0]
        assert trained, "embed() must depend on the backbone's body parameters"

    def test_groups_cover_every_parameter_once_and_in_order(self, backbone_under_test, registry):
        backbone = self.build(backbone_under_test, registry)
        names = [n for n, _ in backbone.model.named_parameters()]
        grouped = [p for g in backbone.groups for p in g.params]
        assert len(grouped) == len(set(grouped)), "a parameter is in two groups"
        assert set(grouped) == set(names), f"ungrouped: {sorted(set(names) - set(grouped))[:5]}"
        assert grouped == names, "groups must run from input to output, in the model's parameter order"
        assert all(g.params for g in backbone.groups), "empty group"
        assert len({g.name for g in backbone.groups}) == len(backbone.groups), "group names must be unique"

    def test_head_is_the_last_group_and_the_only_one_sized_by_classes(self, backbone_under_test, registry):
        narrow = self.build(backbone_under_test, registry, num_classes=self.num_classes)
        wide = self.build(backbone_under_test, registry, num_classes=self.num_classes + 2)
        narrow_shapes = {n: p.shape for n, p in narrow.model.named_parameters()}
        resized = {n for n, p in wide.model.named_parameters() if narrow_shapes.get(n) != p.shape}
        assert resized, "num_classes changed no parameter"
        assert resized <= set(narrow.head.params), f"class-sized parameters outside the head group: {sorted(resized - set(narrow.head.params))}"

    def test_freeze_depth_freezes_exactly_those_groups(self, backbone_under_test, registry):
        from autoft.finetune import freeze_first
        from autoft.backbones import freeze_batchnorm

        backbone = self.build(backbone_under_test, registry)
        by_name = dict(backbone.model.named_parameters())
        for depth in range(len(backbone.groups) + 1):
            freeze_first(backbone, depth)
            for i, group in enumerate(backbone.groups):
                assert all(by_name[p].requires_grad == (i >= depth) for p in group.params), f"depth {depth}, group {group.name}"

        # One optimisation step at half depth: frozen weights and their BatchNorm statistics stay put.
        depth = len(backbone.groups) // 2
        trainable = freeze_first(backbone, depth)
        frozen = [p for g in backbone.groups[:depth] for p in g.params]
        before = copy.deepcopy(backbone.model.state_dict())
        backbone.model.train()
        freeze_batchnorm(backbone.model)
        optimizer = torch.optim.SGD(trainable, lr=0.1)
        loss = torch.nn.functional.cross_entropy(backbone.model(self.images(4)), torch.arange(4) % self.num_classes)
        loss.backward()
        optimizer.step()
        after = backbone.model.state_dict()
        changed = [n for n in frozen if not torch.equal(before[n], after[n])]
        assert not changed, f"frozen parameters changed: {changed[:5]}"
        frozen_modules = {n.rpartition(".")[0] for n in frozen}
        moved = [
            n for n, v in after.items()
            if n.rpartition(".")[0] in frozen_modules and n.endswith(("running_mean", "running_var")) and not torch.equal(before[n], v)
        ]
        assert not moved, f"BatchNorm statistics of frozen groups changed: {moved[:5]}"
        assert any(not torch.equal(before[n], after[n]) for n in backbone.head.params), "the head did not train"

    def test_checkpoint_round_trip(self, backbone_under_test, registry, tmp_path):
        from autoft.checkpoints import load_checkpoint, save_checkpoint

        backbone = self.build(backbone_under_test, registry, dropout=0.2)
        with torch.no_grad():  # move off the initial values, so a fresh build cannot pass by chance
            for p in backbone.model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        x = self.images()
        expected = backbone.model.eval()(x)
        path = save_checkpoint(
            tmp_path / "model.pt", backbone_name=backbone_under_test, backbone=backbone,
            classes=[str(i) for i in range(self.num_classes)], image_size=self.image_size, params={"dropout": 0.2},
        )
        loaded = load_checkpoint(path, registry=registry)
        torch.testing.assert_close(loaded.backbone.model(x), expected)

    def test_exports_to_onnx(self, backbone_under_test, registry, tmp_path):
        """Through ``autoft export``'s own path: ONNX with normalisation inside, any batch
        size, checked against PyTorch in onnxruntime (it raises when they differ)."""
        from autoft.data import ImageTensors
        from autoft.exporting import export
        from autoft.checkpoints import save_checkpoint

        backbone = self.build(backbone_under_test, registry)
        checkpoint = save_checkpoint(
            tmp_path / "run" / "model.pt", backbone_name=backbone_under_test, backbone=backbone,
            classes=[str(i) for i in range(self.num_classes)], image_size=self.image_size, params={"dropout": 0.0},
        )
        images = ImageTensors((self.images(4) * 255).to(torch.uint8), torch.arange(4) % self.num_classes)
        result = export(checkpoint, tmp_path / "onnx", images=images, registry=registry)
        assert result.model.is_file()
        assert set(result.report["checks"]["fp32"]) == {"batch_1", "batch_4"}


# ---------------------------------------------------------------------------
# Datasets


class DatasetContract(_Contract):
    """What autoft relies on in a dataset format: set ``dataset_source`` to what a user types
    (``myformat:path/to/data``), or override ``dataset_under_test(self, tmp_path)`` to
    write example files first and return their source string."""

    dataset_source: str = ""

    @pytest.fixture
    def dataset_under_test(self) -> str:
        if not self.dataset_source:
            raise AssertionError(f"{type(self).__name__} must set dataset_source or override dataset_under_test")
        return self.dataset_source

    def load(self, source: str, registry: plugins.Registry) -> tuple[DatasetSpec, LabelledImages]:
        spec, argument = registry.dataset(source)
        return spec, spec.factory(argument)

    def test_resolves_to_a_format(self, dataset_under_test, registry):
        spec, argument = registry.dataset(dataset_under_test)
        assert isinstance(spec, DatasetSpec)
        assert isinstance(argument, str)

    def test_returns_consistent_labelled_images(self, dataset_under_test, registry):
        _, labelled = self.load(dataset_under_test, registry)
        assert isinstance(labelled, LabelledImages)
        assert len(labelled.samples) == len(labelled.labels) > 0
        assert all(isinstance(c, str) for c in labelled.classes)
        assert len(set(labelled.classes)) == len(labelled.classes), "class names must be unique"
        labels = [int(label) for label in labelled.labels]
        assert all(0 <= label < len(labelled.classes) for label in labels), "labels index classes"
        assert len(set(labels)) >= 2, "a classifier needs two classes"
        if labelled.splits is not None:
            assert len(labelled.splits) == len(labelled.samples)
            assert set(labelled.splits) <= {"train", "val", "test"}
            assert "train" in set(labelled.splits)

    def test_every_image_decodes(self, dataset_under_test, registry):
        from autoft.data import prepare

        _, labelled = self.load(dataset_under_test, registry)
        data = prepare(labelled, image_size=16, seed=0)
        assert not data.skipped, f"undecodable samples: {data.skipped[:3]}"
        assert data.train.image_shape == (3, 16, 16)  # not .images: a plugin's large set stays on disk
        assert len(data.train) + len(data.val) + (len(data.test) if data.test else 0) == len(labelled.samples)

    def test_loads_the_same_twice(self, dataset_under_test, registry):
        _, first = self.load(dataset_under_test, registry)
        _, second = self.load(dataset_under_test, registry)
        assert list(map(int, first.labels)) == list(map(int, second.labels)), "the same source must give the same labels in the same order"
        assert first.classes == second.classes

    def test_missing_source_is_a_user_error(self, dataset_under_test, registry, tmp_path):
        spec, _ = registry.dataset(dataset_under_test)
        missing = str(tmp_path / "does-not-exist")
        if spec.detect is not None:
            assert spec.detect(missing) is False
        with pytest.raises(AutoftError):
            spec.factory(missing)


# ---------------------------------------------------------------------------
# Strategies and regularisers: what the training loop's lifecycle relies on


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
        from autoft.backbones import build_backbone
        from autoft.events import EpochEnd
        from autoft.trainer import Trainer, TrainerConfig

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
        from autoft.backbones import build_backbone

        torch.manual_seed(0)
        return build_backbone(self.backbone_name, num_classes=3, registry=registry)

    def strategy(self, name: str, registry: plugins.Registry):
        spec = registry.strategy(name)
        assert isinstance(spec, StrategySpec)
        return spec.factory()

    def recipe(self, name, registry, n_groups):
        from autoft.recipe import resolve_recipe

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

        from autoft.recipe import resolve_recipe

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
        from autoft.recipe import resolve_recipe

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
        from autoft.trainer import fit

        before = {n: p.detach().clone() for n, p in backbone.model.named_parameters()}
        result = fit(backbone, synthetic_splits(), self.recipe(strategy_under_test, registry, len(backbone.groups)), epochs=1, batch_size=8, device="cpu", registry=registry)
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
        from autoft.recipe import resolve_recipe

        return resolve_recipe({"strategy": self.strategy, "regularizer": name}, n_groups, registry)

    def context(self, name: str, registry) -> Any:
        from autoft.backbones import build_backbone
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

        from autoft.recipe import resolve_recipe

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


# ---------------------------------------------------------------------------
# Metrics


class MetricContract(_Contract):
    """What autoft relies on in a validation metric: set ``metric_name``."""

    metric_name: str = ""

    @pytest.fixture
    def metric_under_test(self) -> str:
        if not self.metric_name:
            raise AssertionError(f"{type(self).__name__} must set metric_name or override metric_under_test")
        return self.metric_name

    def predictions(self, quality: str) -> tuple[np.ndarray, np.ndarray]:
        labels = np.random.default_rng(0).integers(0, 10, 60)
        if quality == "uniform":
            return labels, np.full((60, 10), 0.1)
        probabilities = np.full((60, 10), 0.01)
        probabilities[np.arange(60), labels] = 0.91
        return labels, probabilities

    def test_perfect_predictions_beat_uniform_ones(self, metric_under_test, registry):
        from autoft.metrics import is_better, score

        spec = registry.metric(metric_under_test)
        perfect, uniform = score(spec, *self.predictions("perfect"), registry), score(spec, *self.predictions("uniform"), registry)
        direction = "higher" if spec.greater_is_better else "lower"
        assert is_better(spec, perfect, uniform), f"perfect predictions scored {perfect}, uniform ones {uniform}; greater_is_better says {direction} is better"

    def test_a_class_missing_from_the_labels_still_scores(self, metric_under_test, registry):
        from autoft.metrics import score

        labels, probabilities = self.predictions("perfect")
        labels = np.where(labels == 9, 0, labels)  # a small validation split may miss a class
        assert np.isfinite(score(registry.metric(metric_under_test), labels, probabilities, registry))

    def test_selects_the_best_epoch_in_training(self, metric_under_test, registry):
        from autoft.backbones import build_backbone
        from autoft.trainer import fit

        torch.manual_seed(0)
        backbone = build_backbone("test_resnet", num_classes=3, registry=registry)
        result = fit(backbone, synthetic_splits(), {"strategy": "full"}, epochs=2, batch_size=8, device="cpu", metric=metric_under_test, registry=registry)
        assert all(np.isfinite(r[f"val_{metric_under_test}"]) for r in result.history)


# ---------------------------------------------------------------------------
# Pretraining methods


class PretrainerContract(_Contract):
    """What autoft relies on in a pretraining method: set ``pretrainer_name``.

    The checks run the method on ``backbone_name`` (a tiny timm model by default) with
    small synthetic images of ``image_size``.
    """

    pretrainer_name: str = ""
    backbone_name: str = "test_resnet"
    image_size: int = 32

    @pytest.fixture
    def pretrainer_under_test(self) -> str:
        if not self.pretrainer_name:
            raise AssertionError(f"{type(self).__name__} must set pretrainer_name or override pretrainer_under_test")
        return self.pretrainer_name

    @pytest.fixture
    def backbone(self, registry) -> Backbone:
        from autoft.backbones import build_backbone

        torch.manual_seed(0)
        return build_backbone(self.backbone_name, num_classes=3, registry=registry)

    def setup(self, name: str, registry: plugins.Registry, backbone: Backbone):
        spec = registry.pretrainer(name)
        assert isinstance(spec, PretrainerSpec)
        method = spec.factory()
        extra = method.setup(backbone, self.image_size)
        assert extra is None or isinstance(extra, torch.nn.Module)
        if extra is not None:
            extra.train()
        backbone.model.train()
        return method, extra

    def images(self, n: int = 4) -> torch.Tensor:
        return synthetic_splits(image_size=self.image_size).train.images[:n].float() / 255

    def test_loss_is_a_finite_scalar(self, pretrainer_under_test, registry, backbone):
        method, _ = self.setup(pretrainer_under_test, registry, backbone)
        loss = method.loss(backbone, self.images())
        assert loss.ndim == 0 and torch.isfinite(loss)

    def test_loss_trains_the_backbone_body(self, pretrainer_under_test, registry, backbone):
        method, extra = self.setup(pretrainer_under_test, registry, backbone)
        method.loss(backbone, self.images()).backward()
        body = {p for g in backbone.groups[:-1] for p in g.params}
        reached = [n for n, p in backbone.model.named_parameters() if n in body and p.grad is not None and p.grad.abs().sum() > 0]
        assert reached, "the loss must reach the backbone's body (train through backbone.embed)"

    def test_fresh_method_per_run(self, pretrainer_under_test, registry):
        spec = registry.pretrainer(pretrainer_under_test)
        assert spec.factory() is not spec.factory(), "factory() must build a new method for each run"

    def test_a_few_steps_lower_the_loss_on_one_batch(self, pretrainer_under_test, registry, backbone):
        method, extra = self.setup(pretrainer_under_test, registry, backbone)
        params = list(backbone.model.parameters()) + (list(extra.parameters()) if extra is not None else [])
        optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-3)
        images = self.images(4)
        losses = []
        for step in range(4):
            torch.manual_seed(step % 2)  # the same two augmentation draws, so the loss can only fall by learning
            loss = method.loss(backbone, images)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert all(np.isfinite(losses))
        assert min(losses[-2:]) < max(losses[:2]), f"loss did not fall: {losses}"
