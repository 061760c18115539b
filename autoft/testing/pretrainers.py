"""The pretraining method contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoft import plugins
from autoft.specs import Backbone, PretrainerSpec
from autoft.testing.common import _Contract, synthetic_splits


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
        from autoft.model.backbones import build_backbone

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
