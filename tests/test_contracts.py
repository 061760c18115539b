"""The built-in plugins and the example distribution pass the contract kit plugin authors use."""

from __future__ import annotations

import pytest

import autoft_torchvision  # the example distribution: `pip install -e plugins/autoft-torchvision`
from autoft.testing import BackboneContract, DatasetContract, PretrainerContract, StrategyContract

from conftest import COLOURS, make_image


class TestTimmBackbones(BackboneContract):
    @pytest.fixture(params=["test_resnet", "timm:test_vit"])
    def backbone_under_test(self, request):
        return request.param


class TestTorchvisionBackbones(BackboneContract):
    # One per family of parameter groups: ResNet stages; a features sequence with a convolutional head.
    @pytest.fixture(params=["torchvision:resnet18", "torchvision:squeezenet1_1"])
    def backbone_under_test(self, request):
        return request.param

    def test_comes_from_the_example_distribution(self, backbone_under_test, registry):
        spec, _ = registry.backbone(backbone_under_test)
        assert spec.factory is autoft_torchvision.create
        assert registry.backbones["torchvision"].plugin.package == "autoft-torchvision"


class TestSampleDigits(DatasetContract):
    dataset_source = "sample:digits"


class TestFileFormats(DatasetContract):
    @pytest.fixture(params=["folder", "split-folder", "csv"])
    def dataset_under_test(self, request, tmp_path):
        root = tmp_path / "data"
        for c, (name, colour) in enumerate(COLOURS.items()):
            for i in range(4):
                split = ("train", "train", "val", "test")[i]
                prefix = f"{split}/" if request.param == "split-folder" else ""
                make_image(root / f"{prefix}{name}/{i}.png", colour, seed=10 * c + i, size=12)
        if request.param == "csv":
            rows = [f"{p.relative_to(root).as_posix()},{p.parent.name}" for p in sorted(root.rglob("*.png"))]
            (root / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
            return f"csv:{root / 'labels.csv'}"
        return f"{request.param}:{root}"


class TestStrategies(StrategyContract):
    @pytest.fixture(params=["full", "freeze", "linear-probe", "l2sp", "discriminative"])
    def strategy_under_test(self, request):
        return request.param


class TestPretrainers(PretrainerContract):
    @pytest.fixture(params=["simclr", "autoencoder", "masked-autoencoder"])
    def pretrainer_under_test(self, request):
        return request.param
