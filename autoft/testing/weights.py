"""The weights source contract."""

from __future__ import annotations

import pytest
import torch

from autoft import plugins
from autoft.specs import PretrainedWeights, WeightsSpec
from autoft.testing.common import _Contract


class WeightsContract(_Contract):
    """What autoft relies on in a weights source: set ``weights_name``.

    Every backbone the source names is checked, with its default weights and each tag: its
    state dict has the built backbone's keys with equal shapes, and ``--weights auto`` and
    ``build_backbone`` load it. The weights must be at hand (installed, or reachable) where
    the checks run. ``num_classes`` is the head width the checks build with.
    """

    weights_name: str = ""
    num_classes: int = 3

    @pytest.fixture
    def weights_under_test(self) -> str:
        if not self.weights_name:
            raise AssertionError(f"{type(self).__name__} must set weights_name or override weights_under_test")
        return self.weights_name

    def spec(self, name: str, registry: plugins.Registry) -> WeightsSpec:
        spec = registry.weights_source(name)
        assert isinstance(spec, WeightsSpec)
        return spec

    def variants(self, spec: WeightsSpec) -> list[tuple[str, str | None]]:
        return [(backbone, tag) for backbone in spec.backbones for tag in (None, *spec.tags)]

    def build(self, backbone: str, registry: plugins.Registry, weights: str | None = None):
        from autoft.model.backbones import build_backbone

        torch.manual_seed(0)
        return build_backbone(backbone, num_classes=self.num_classes, weights=weights, registry=registry)

    def test_names_backbones_that_can_be_built(self, weights_under_test, registry):
        spec = self.spec(weights_under_test, registry)
        assert isinstance(spec.backbones, tuple) and spec.backbones, "backbones: a tuple of the backbone names it has weights for"
        assert all(isinstance(t, str) and t and ":" not in t for t in spec.tags), "tags: names without ':' (plugin:NAME:TAG)"
        for backbone in spec.backbones:
            registry.backbone(backbone)  # an unknown name raises, naming the sources

    def test_says_where_its_weights_are(self, weights_under_test, registry):
        spec = self.spec(weights_under_test, registry)
        for backbone in spec.backbones:
            found = spec.where(backbone) if spec.where is not None else PretrainedWeights(True, "")
            assert isinstance(found, PretrainedWeights), f"where({backbone!r}) must return PretrainedWeights"
            assert found.available, f"the checks need {backbone}'s weights at hand; where() says: {found.location}"

    def test_state_dict_has_the_backbones_keys_and_shapes(self, weights_under_test, registry):
        from autoft.model.weights import mapping_problem

        spec = self.spec(weights_under_test, registry)
        for backbone, tag in self.variants(spec):
            state = spec.load(backbone, tag)
            built = self.build(backbone, registry)
            problem = mapping_problem(built, state)
            assert problem is None, f"load({backbone!r}, {tag!r}) does not fit the built backbone: {problem}"
            not_finite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
            assert not not_finite, f"load({backbone!r}, {tag!r}) holds NaN or infinite values: {not_finite[:3]}"

    def test_builds_with_its_tensors(self, weights_under_test, registry):
        from autoft.model.weights import plugin_weights

        spec = self.spec(weights_under_test, registry)
        for backbone, tag in self.variants(spec):
            state = spec.load(backbone, tag)
            built = self.build(backbone, registry, plugin_weights(spec.name, tag)).model.state_dict()
            differs = [k for k, v in state.items() if v.shape == built[k].shape and not torch.equal(v.to(built[k].dtype), built[k])]
            assert not differs, f"{backbone} built with plugin:{spec.name} does not carry its tensors: {differs[:3]}"
            head = self.build(backbone, registry).head.params
            assert all(built[p].shape[0] == self.num_classes for p in head if built[p].ndim), "the head has the task's width"

    def test_auto_finds_it(self, weights_under_test, registry):
        from autoft.model.weights import resolve_weights, weights_plugins_for

        spec = self.spec(weights_under_test, registry)
        for backbone in spec.backbones:
            providers = [r.spec.name for r, _ in weights_plugins_for(backbone, registry)]
            assert spec.name in providers, f"--weights auto does not see {spec.name} as a source for {backbone}"
            weights, notice = resolve_weights("auto", backbone, registry)  # this plugin, or one loaded before it
            assert weights in {f"plugin:{name}" for name in providers} and weights.removeprefix("plugin:") in notice, (weights, notice)
