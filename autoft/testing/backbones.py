"""The backbone source contract."""

from __future__ import annotations

import copy

import pytest
import torch

from autoft import plugins
from autoft.specs import Backbone, BackboneSpec
from autoft.testing.common import _Contract


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
        from autoft.model.backbones import build_backbone

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
        from autoft.model.backbones import freeze_batchnorm

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
        from autoft.model.checkpoints import load_checkpoint, save_checkpoint

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
        from autoft.deploy.exporting import export
        from autoft.model.checkpoints import save_checkpoint

        backbone = self.build(backbone_under_test, registry)
        checkpoint = save_checkpoint(
            tmp_path / "run" / "model.pt", backbone_name=backbone_under_test, backbone=backbone,
            classes=[str(i) for i in range(self.num_classes)], image_size=self.image_size, params={"dropout": 0.0},
        )
        images = ImageTensors((self.images(4) * 255).to(torch.uint8), torch.arange(4) % self.num_classes)
        result = export(checkpoint, tmp_path / "onnx", images=images, registry=registry)
        assert result.model.is_file()
        assert set(result.report["checks"]["fp32"]) == {"batch_1", "batch_4"}
