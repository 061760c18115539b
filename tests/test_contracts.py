"""The built-in plugins and the example distribution pass the contract kit plugin authors use,
and the kit fails plugins that break the contract."""

from __future__ import annotations

import pytest

import autoft_torchvision  # the example distribution: `pip install -e plugins/autoft-torchvision`
from autoft import hookimpl
from autoft.specs import BackboneSpec, ParamGroup, PretrainedWeights, StrategySpec, TrainPlan, WeightsSpec
from autoft.model.backbones import build_backbone
from autoft.lifecycle import PluginError
from autoft.testing import (
    BackboneContract, DatasetContract, MetricContract, PretrainerContract, RegularizerContract, StrategyContract, WeightsContract, registry_with,
)

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
    @pytest.fixture(params=["full", "freeze", "linear-probe", "l2sp", "discriminative", "lp-ft"])
    def strategy_under_test(self, request):
        return request.param


class TestRegularizers(RegularizerContract):
    @pytest.fixture(params=["mixup", "cutmix", "bss", "fixmatch"])
    def regularizer_under_test(self, request):
        return request.param


class TestMetrics(MetricContract):
    @pytest.fixture(params=["accuracy", "f1_macro", "balanced_accuracy", "top5_accuracy", "log_loss"])
    def metric_under_test(self, request):
        return request.param


class TestPretrainers(PretrainerContract):
    @pytest.fixture(params=["simclr", "autoencoder", "masked-autoencoder"])
    def pretrainer_under_test(self, request):
        return request.param


class TestLiteWeights(WeightsContract):
    weights_name = "lite"  # EfficientNet-Lite0/1/2 from their packages, installed with autoft's dev extra


# ---------------------------------------------------------------------------
# The kit fails plugins that break the contract


class Sloppy:
    """A backbone source and a strategy with the mistakes plugin authors make."""

    @hookimpl
    def autoft_register_backbones(self, register):
        from autoft_plugins.timm_backbones import create

        def reordered(model_name, **kwargs):
            backbone = create("test_resnet", **kwargs)
            body = backbone.groups[:-1]
            backbone.groups = [*reversed(body), backbone.head]  # head last, but the body runs output to input
            return backbone

        def wrong_head(model_name, **kwargs):
            backbone = create("test_resnet", **kwargs)
            stem, *rest, head = backbone.groups
            backbone.groups = [ParamGroup("stem", stem.params + head.params), *rest, ParamGroup("head", ())]
            return backbone

        factories = {"reordered": reordered, "wrong-head": wrong_head}
        register(BackboneSpec("sloppy", "", lambda name, **kw: factories[name](name, **kw), lambda: list(factories), factories.__contains__))

    @hookimpl
    def autoft_register_strategies(self, register):
        class LeavesParametersOut:
            def default_params(self, n_groups):
                return {}

            def suggest(self, trial, n_groups):
                return {}

            def apply(self, backbone, params):
                head = [p for n, p in backbone.model.named_parameters() if n in backbone.head.params]
                return TrainPlan([{"params": head}])  # but nothing was frozen

        class ForgetsItsPhase(LeavesParametersOut):
            """LP-FT that counts epochs itself but saves no state: a resumed run restarts its probe."""

            def __init__(self):
                self.epochs_seen = 0

            def apply(self, backbone, params):
                for n, p in backbone.model.named_parameters():
                    p.requires_grad_(n in backbone.head.params)
                return super().apply(backbone, params)

            def on_epoch_start(self, ctx):
                self.epochs_seen += 1
                if self.epochs_seen == 2:
                    ctx.unfreeze(ctx.group_parameters([g.name for g in ctx.backbone.groups[:-1]]))

        class UnfreezesAtZeroRate(ForgetsItsPhase):
            def on_epoch_start(self, ctx):
                if ctx.epoch == 2:
                    ctx.unfreeze(ctx.group_parameters([g.name for g in ctx.backbone.groups[:-1]]), lr_scale=0.0)

        class ReturnsADict(LeavesParametersOut):
            def apply(self, backbone, params):
                return {"params": list(backbone.model.parameters())}

        register(StrategySpec("leaky", "", LeavesParametersOut))
        register(StrategySpec("forgetful", "", ForgetsItsPhase, api_version=2))
        register(StrategySpec("idle", "", UnfreezesAtZeroRate, api_version=2))
        register(StrategySpec("dict-plan", "", ReturnsADict, api_version=2))

    @hookimpl
    def autoft_register_weights(self, register):
        def transposed(backbone, tag):  # a converter that forgot to transpose one linear layer
            import timm

            state = timm.create_model("test_resnet", num_classes=1000).state_dict()
            return {**state, "fc.weight": state["fc.weight"].T, "layer4.0.conv2.weight": state["layer4.0.conv2.weight"][:, :1]}

        register(WeightsSpec("misfit", "", ("test_resnet",), transposed, lambda backbone: PretrainedWeights(True, "here")))


@pytest.fixture
def sloppy_registry():
    return registry_with(Sloppy())


def test_the_kit_fails_groups_out_of_order(sloppy_registry):
    with pytest.raises(AssertionError, match="input to output"):
        BackboneContract().test_groups_cover_every_parameter_once_and_in_order("sloppy:reordered", sloppy_registry)


def test_the_kit_fails_a_head_group_that_is_not_the_classifier(sloppy_registry):
    with pytest.raises(AssertionError, match="class-sized parameters outside the head group"):
        BackboneContract().test_head_is_the_last_group_and_the_only_one_sized_by_classes("sloppy:wrong-head", sloppy_registry)


@pytest.mark.parametrize(
    "strategy, error, message",
    [
        ("leaky", AssertionError, "trainable parameters in no optimizer group"),
        ("dict-plan", PluginError, r"strategy 'dict-plan' \(Sloppy\): apply\(\) returned dict with keys \['params'\]; expected TrainPlan"),
    ],
)
def test_the_kit_fails_a_bad_plan_with_a_readable_message(strategy, error, message, sloppy_registry):
    contract = StrategyContract()
    backbone = build_backbone(contract.backbone_name, num_classes=3, registry=sloppy_registry)
    with pytest.raises(error, match=message):
        contract.test_plan_trains_only_grouped_parameters(strategy, sloppy_registry, backbone)


def test_the_kit_fails_a_strategy_whose_phase_is_lost_on_resume(sloppy_registry, tmp_path):
    with pytest.raises(AssertionError, match=r"resumed after epoch 1 of 3.*state_dict\(\) hold everything"):
        StrategyContract().test_state_survives_save_and_restore("forgetful", sloppy_registry, tmp_path)
    StrategyContract().test_parameters_it_unfreezes_later_train("forgetful", sloppy_registry)  # without a resume it trains fine


def test_the_kit_fails_weights_that_do_not_fit_the_backbone(sloppy_registry):
    with pytest.raises(AssertionError, match=r"load\('test_resnet', None\) does not fit the built backbone: tensor 'layer4.0.conv2.weight' has shape \(96, 1, 3, 3\), the model's is \(96, 96, 3, 3\)"):
        WeightsContract().test_state_dict_has_the_backbones_keys_and_shapes("misfit", sloppy_registry)


def test_the_kit_fails_parameters_unfrozen_later_that_never_train(sloppy_registry):
    with pytest.raises(AssertionError, match="made trainable at epoch 2 never changed"):
        StrategyContract().test_parameters_it_unfreezes_later_train("idle", sloppy_registry)

