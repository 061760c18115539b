"""Plugin loading: entry points, broken plugins, conflicts, autoload off, a plugins folder,
`autoft plugins`, and the example distribution autoft-torchvision end to end."""

from __future__ import annotations

import itertools
import json
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import autoft_torchvision  # the example distribution: `pip install -e plugins/autoft-torchvision`
import autoft
from autoft import AutoftError, hookimpl, plugins
from autoft.cli import make_app
from autoft.specs import BackboneSpec, DatasetSpec, LabelledImages, PretrainerSpec, StrategySpec
from autoft_plugins.strategies import LinearProbe

runner = CliRunner()
_unique = itertools.count()


def invoke(*args, env=None):
    return runner.invoke(make_app(), list(map(str, args)), env=env)


@pytest.fixture(autouse=True)
def fresh_default_manager():
    """Each test builds the plugins it needs; none leaks into the next."""
    plugins.set_default_plugin_manager(None)
    yield
    plugins.set_default_plugin_manager(None)


def use(pm):
    plugins.set_default_plugin_manager(pm)
    return plugins.registry()


def fake_distribution(root: Path, name: str, modules: dict[str, str], entry_points: dict[str, str], version: str = "1.2.3") -> None:
    """An installed distribution as pip leaves it: a dist-info folder beside its modules."""
    dist_info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (dist_info / "entry_points.txt").write_text("[autoft]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for module, source in modules.items():
        (root / f"{module}.py").write_text(source)


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Install fake distributions for one test: call with (name, {module: source}, {entry point: module})."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def install(name, modules, entry_points, version="1.2.3"):
        fake_distribution(tmp_path, name, modules, entry_points, version)
        for module in modules:
            monkeypatch.delitem(sys.modules, module, raising=False)

    return install


def module_name(stem: str) -> str:
    return f"{stem}_{next(_unique)}_{id(object())}"


GOOD_PLUGIN = '''
from autoft import hookimpl
from autoft.specs import StrategySpec
from autoft_plugins.strategies import LinearProbe

@hookimpl
def autoft_register_strategies(register):
    register(StrategySpec("{name}", "A third-party strategy", LinearProbe))
'''


# ---------------------------------------------------------------------------
# Built-ins and entry points


def test_builtins_are_ordinary_entry_point_plugins():
    registry = plugins.build_registry(plugins.get_plugin_manager())
    assert registry.backbones["timm"].plugin.package == "autoft"
    assert {"folder", "split-folder", "csv", "sample"} <= set(registry.datasets)
    assert {"full", "freeze", "linear-probe", "l2sp", "discriminative"} <= set(registry.strategies)
    assert {"simclr", "autoencoder"} <= set(registry.pretrainers)
    assert {p.package for p in registry.plugins.values() if p.name in ("timm", "datasets", "strategies")} == {"autoft"}
    assert not [p for p in registry.plugins.values() if p.broken]


def test_a_distribution_is_discovered_through_its_entry_point(installed):
    mod = module_name("acme_strategies")
    installed("acme-autoft", {mod: GOOD_PLUGIN.format(name="acme-head")}, {"acme": mod}, version="2.0.1")
    registry = plugins.build_registry(plugins.get_plugin_manager())
    registered = registry.strategies["acme-head"]
    assert (registered.plugin.package, registered.plugin.version, registered.plugin.name) == ("acme-autoft", "2.0.1", "acme")
    assert isinstance(registry.strategy("acme-head").factory(), LinearProbe)


class EveryHook:
    """One plugin object implementing every hook, registered by hand for one test."""

    @hookimpl
    def autoft_register_backbones(self, register):
        from autoft_plugins.timm_backbones import create

        register(BackboneSpec("tiny", "timm's test models only", create, lambda: ["test_resnet"], lambda n: n == "test_resnet"))

    @hookimpl
    def autoft_register_datasets(self, register):
        register(DatasetSpec("squares", "Two generated classes", lambda source: squares(int(source or 8))))

    @hookimpl
    def autoft_register_strategies(self, register):
        register(StrategySpec("head-only", "Only the head trains", LinearProbe))

    @hookimpl
    def autoft_register_pretrainers(self, register):
        from autoft_plugins.pretrainers import SimCLR

        register(PretrainerSpec("simclr-hot", "SimCLR at a higher temperature", lambda: SimCLR(temperature=0.5)))


def squares(n: int) -> LabelledImages:
    import numpy as np

    images = [np.full((8, 8), 255 * (i % 2), dtype=np.uint8) for i in range(n)]
    return LabelledImages(images, [i % 2 for i in range(n)], ["dark", "light"], image_size=16, hflip=False)


def test_a_plugin_registered_for_one_test_provides_every_kind():
    pm = plugins.get_plugin_manager()
    pm.register(EveryHook(), name="every-hook")
    registry = use(pm)
    assert registry.backbone("tiny:test_resnet")[1] == "test_resnet"
    assert registry.dataset("squares:12")[0].factory("12").classes == ["dark", "light"]
    assert isinstance(registry.strategy("head-only").factory(), LinearProbe)
    assert registry.pretrainer("simclr-hot").factory().temperature == 0.5
    assert all(r.plugin.package == "every-hook" for r in (registry.backbones["tiny"], registry.strategies["head-only"]))
    result = invoke("plugins", "--json")
    rows = {(r["kind"], r["name"]): r["package"] for r in json.loads(result.output)["plugins"]}
    assert rows[("backbone source", "tiny")] == rows[("pretraining", "simclr-hot")] == "every-hook"


def test_a_hook_that_takes_no_arguments_is_called():
    class Silent:
        called = False

        @hookimpl
        def autoft_register_strategies(self):
            Silent.called = True

    pm = plugins.get_plugin_manager()
    pm.register(Silent(), name="silent")
    registry = plugins.build_registry(pm)
    assert Silent.called and not registry.plugins["silent"].broken


# ---------------------------------------------------------------------------
# Broken plugins


def test_a_plugin_that_fails_to_import_is_broken_and_the_others_load(installed):
    good, bad = module_name("good"), module_name("bad")
    installed("good-plugin", {good: GOOD_PLUGIN.format(name="good-head")}, {"good": good})
    installed("bad-plugin", {bad: "import no_such_module_anywhere\n"}, {"bad": bad})
    registry = use(plugins.get_plugin_manager())
    info = registry.plugins["bad-plugin:bad"]
    assert info.broken and "ModuleNotFoundError" in info.error and "no_such_module_anywhere" in info.error
    assert "good-head" in registry.strategies and "timm" in registry.backbones

    found = json.loads(invoke("plugins", "--json").output)
    assert [(b["package"], b["plugin"]) for b in found["broken"]] == [("bad-plugin", "bad")]
    assert "no_such_module_anywhere" in found["broken"][0]["error"]
    table = invoke("plugins", env={"COLUMNS": "250"})
    assert table.exit_code == 0
    broken_row = next(line for line in table.output.splitlines() if "bad-plugin" in line)
    assert "broken" in broken_row and "ModuleNotFoundError" in broken_row


def test_a_hook_that_raises_breaks_only_its_plugin():
    class Raises:
        @hookimpl
        def autoft_register_strategies(self, register):
            register(StrategySpec("half-registered", "", LinearProbe))  # dropped: the plugin is broken

        @hookimpl
        def autoft_register_backbones(self, register):
            raise RuntimeError("weights server down")

    pm = plugins.get_plugin_manager()
    pm.register(Raises(), name="raises")
    registry = use(pm)
    assert registry.plugins["raises"].broken
    assert "RuntimeError: weights server down" in registry.plugins["raises"].error
    assert "half-registered" not in registry.strategies
    assert "timm" in registry.backbones and "freeze" in registry.strategies
    with pytest.raises(AutoftError, match="broken plugin.*raises"):
        registry.strategy("half-registered")


@pytest.mark.parametrize(
    "hook_source, message",
    [
        ("def autoft_register_strategies(register):\n    register('freeze')\n", "expects StrategySpec, got str"),
        ("def autoft_register_backbone(register):\n    pass\n", "unknown hook autoft_register_backbone (did you mean autoft_register_backbones"),
        ("def autoft_register_strategies(register, extra):\n    pass\n", "extra"),
        (
            "def autoft_register_strategies(register):\n"
            "    register(StrategySpec('x', '', object))\n    register(StrategySpec('x', '', object))\n",
            "registered 'x' twice",
        ),
    ],
    ids=["wrong-spec-type", "misspelt-hook", "unknown-argument", "same-name-twice"],
)
def test_mistakes_in_a_plugin_folder_module_are_reported_as_broken(tmp_path, hook_source, message):
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "mistake.py").write_text("from autoft import hookimpl\nfrom autoft.specs import StrategySpec\n\n@hookimpl\n" + hook_source)
    registry = plugins.build_registry(plugins.get_plugin_manager(folder))
    info = registry.plugins["local:mistake"]
    assert info.broken and message in info.error, info.error
    assert "freeze" in registry.strategies


@pytest.mark.parametrize(
    "body, line",
    [
        ("import json\n\nSETTINGS = json.loads('{not json')\n", 3),  # raised inside json's decoder
        ("from autoft import hookimpl\n\n@hookimpl\ndef autoft_register_strategies(register):\n    register('freeze')\n", 5),  # refused by autoft
        ("from autoft import hookimpl\nimport json\n\n@hookimpl\ndef autoft_register_datasets(register):\n    json.loads('[')\n", 6),  # in a hook
    ],
    ids=["import-time-stdlib", "refused-registration", "hook-calls-stdlib"],
)
def test_a_load_error_points_at_the_plugins_own_line(installed, tmp_path, body, line):
    mod = module_name("faulty")
    installed("faulty-plugin", {mod: body}, {"faulty": mod})
    error = plugins.build_registry(plugins.get_plugin_manager()).plugins["faulty-plugin:faulty"].error
    assert error.endswith(f"({tmp_path / mod}.py:{line})"), error
    assert "decoder.py" not in error and "plugins.py" not in error

    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "faulty.py").write_text(body)
    error = plugins.build_registry(plugins.get_plugin_manager(folder)).plugins["local:faulty"].error
    assert error.endswith(f"({folder / 'faulty.py'}:{line})"), error


def test_a_misspelt_hook_names_where_it_is_defined(tmp_path):
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "typo.py").write_text("from autoft import hookimpl\n\n\n@hookimpl\ndef autoft_register_strategy(register):\n    pass\n")
    error = plugins.build_registry(plugins.get_plugin_manager(folder)).plugins["local:typo"].error
    assert "did you mean autoft_register_strategies" in error and f"at {folder / 'typo.py'}:4" in error
    assert "plugins.py" not in error and "pluggy" not in error


def test_describe_origin_names_the_package_version_and_entry_point(installed, plugins_folder):
    mod = module_name("acme_strategies")
    installed("acme-autoft", {mod: GOOD_PLUGIN.format(name="acme-head")}, {"headwork": mod}, version="2.0.1")
    registry = use(plugins.get_plugin_manager(plugins_folder))
    expected = "strategy 'acme-head' from package acme-autoft 2.0.1 (entry point headwork)"
    assert plugins.describe_origin(registry.strategy("acme-head")) == expected  # a spec
    assert plugins.describe_origin("acme-head", registry=registry) == expected  # a name
    assert registry.describe_origin("freeze", "strategies") == f"strategy 'freeze' from package autoft {autoft.__version__} (entry point strategies)"
    assert registry.describe_origin("timm") == f"backbone source 'timm' from package autoft {autoft.__version__} (entry point timm)"
    assert registry.describe_origin("house-head") == f"strategy 'house-head' from module house_rules.py in {plugins_folder}"
    assert registry.describe_origin("nothing", "pretrainers") == "pretraining method 'nothing' (not registered by any loaded plugin)"
    assert registry.describe_origin(StrategySpec("ghost", "", LinearProbe)) == "strategy 'ghost' (not registered by any loaded plugin)"


def test_describe_origin_of_a_name_two_plugins_registered_names_both():
    pm = plugins.get_plugin_manager()
    for owner in ("acme-finetune", "globex-finetune"):
        pm.register(type("Plugin", (), {"autoft_register_strategies": hookimpl(lambda self, register: register(StrategySpec("sharp", "", LinearProbe)))})(), name=owner)
    assert plugins.build_registry(pm).describe_origin("sharp") == "strategy 'sharp' from plugin acme-finetune and plugin globex-finetune"


def test_the_listing_shows_entry_point_names(installed):
    mod = module_name("acme_strategies")
    installed("acme-autoft", {mod: GOOD_PLUGIN.format(name="acme-head")}, {"headwork": mod}, version="2.0.1")
    use(plugins.get_plugin_manager())
    rows = {r["name"]: r for r in json.loads(invoke("plugins", "--json").output)["plugins"]}
    assert rows["acme-head"]["plugin"] == "headwork" and rows["freeze"]["plugin"] == "strategies" and rows["timm"]["plugin"] == "timm"
    table = invoke("plugins", env={"COLUMNS": "250"})
    assert table.exit_code == 0, table.output
    assert "entry point" in table.output.splitlines()[1]
    row = next(line for line in table.output.splitlines() if "acme-head" in line)
    assert [cell.strip() for cell in row.strip("│ ").split("│")][:4] == ["strategy", "acme-head", "acme-autoft 2.0.1", "headwork"]


def test_a_command_that_does_not_need_a_broken_plugin_still_works(installed, class_folder, tmp_path):
    bad = module_name("crashes")
    installed("crashing-plugin", {bad: "raise SystemError('corrupt install')\n"}, {"crashes": bad})
    pm = plugins.get_plugin_manager()
    pm.register(type("Raises", (), {"autoft_register_datasets": hookimpl(lambda self, register: 1 / 0)})(), name="zero")
    use(pm)
    result = invoke(
        "train", "--backbone", "test_resnet", "--data", class_folder, "--out", tmp_path / "run",
        "--epochs", "1", "--image-size", "16", "--batch-size", "8",
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "model.pt").is_file()
    # A name nobody provides mentions the broken plugins, which may be where it was meant to come from.
    missing = invoke("train", "--backbone", "acme:net", "--data", "sample:digits", "--out", tmp_path / "x")
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    assert "crashing-plugin" in missing.output and "autoft plugins" in missing.output


# ---------------------------------------------------------------------------
# Conflicts


def test_two_plugins_registering_one_name_name_both_packages():
    def strategies(name):
        class Plugin:
            @hookimpl
            def autoft_register_strategies(self, register):
                register(StrategySpec(name, f"from {name}", LinearProbe))

        return Plugin()

    pm = plugins.get_plugin_manager()
    pm.register(strategies("sharp"), name="acme-finetune")
    pm.register(strategies("sharp"), name="globex-finetune")
    registry = use(pm)
    with pytest.raises(AutoftError) as error:
        registry.strategy("sharp")
    assert "acme-finetune" in str(error.value) and "globex-finetune" in str(error.value)
    assert "freeze" in registry.strategies  # everything else keeps working

    found = json.loads(invoke("plugins", "--json").output)
    assert found["conflicts"] == [{"kind": "strategy", "name": "sharp", "packages": ["acme-finetune", "globex-finetune"]}]
    result = invoke("train", "--backbone", "test_resnet", "--data", "sample:digits", "--out", "unused", "--strategy", "sharp")
    assert result.exit_code == 2 and "acme-finetune" in result.output and "globex-finetune" in result.output


def test_a_plugin_broken_in_one_hook_takes_part_in_no_conflict():
    class Shadow:
        @hookimpl
        def autoft_register_strategies(self, register):
            register(StrategySpec("freeze", "a copy", LinearProbe))

        @hookimpl
        def autoft_register_datasets(self, register):
            raise ValueError("half-installed")

    pm = plugins.get_plugin_manager()
    pm.register(Shadow(), name="shadow")
    registry = plugins.build_registry(pm)
    assert registry.strategies["freeze"].plugin.package == "autoft"
    assert not registry.conflicts


def test_a_bare_backbone_name_prefers_timm_and_a_prefix_selects_the_source():
    pm = plugins.get_plugin_manager()
    pm.register(EveryHook(), name="every-hook")
    registry = plugins.build_registry(pm)
    assert registry.backbone("test_resnet")[0].name == "timm"
    assert registry.backbone("tiny:test_resnet")[0].name == "tiny"


# ---------------------------------------------------------------------------
# Autoload off, plugins folder


def test_disable_autoload_loads_only_the_builtins(installed, monkeypatch):
    mod = module_name("third_party")
    installed("third-party", {mod: GOOD_PLUGIN.format(name="third")}, {"third": mod})
    assert "third" in plugins.build_registry(plugins.get_plugin_manager()).strategies
    monkeypatch.setenv("AUTOFT_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry = plugins.build_registry(plugins.get_plugin_manager())
    assert "third" not in registry.strategies and "torchvision" not in registry.backbones
    assert {p.package for p in registry.plugins.values()} == {"autoft"}
    assert {"timm"} == set(registry.backbones)
    result = invoke("plugins", "--json")
    assert {r["package"] for r in json.loads(result.output)["plugins"]} == {"autoft"}


@pytest.fixture
def plugins_folder(tmp_path):
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    (folder / "house_rules.py").write_text(GOOD_PLUGIN.format(name="house-head"))
    (folder / "typo.py").write_text("def broken(:\n")
    (folder / "notes.txt").write_text("not a module")
    return folder


def check_folder_listing(result, folder):
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    rows = {r["name"]: r for r in found["plugins"]}
    assert rows["house-head"]["package"] == str(folder) and rows["house-head"]["version"] == "local"
    assert [b["plugin"] for b in found["broken"]] == ["typo"] and "SyntaxError" in found["broken"][0]["error"]
    assert "freeze" in rows  # the built-ins load too


def test_plugins_dir_option_loads_modules_without_packaging(plugins_folder):
    check_folder_listing(invoke("--plugins-dir", plugins_folder, "plugins", "--json"), plugins_folder)


def test_plugins_dir_environment_variable(plugins_folder, monkeypatch):
    check_folder_listing(invoke("plugins", "--json", env={"AUTOFT_PLUGINS_DIR": str(plugins_folder)}), plugins_folder)
    monkeypatch.setenv("AUTOFT_PLUGINS_DIR", str(plugins_folder))
    assert "house-head" in plugins.registry().strategies  # the Python API reads it too


def test_plugins_dir_still_loads_with_autoload_off(plugins_folder, monkeypatch):
    monkeypatch.setenv("AUTOFT_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry = plugins.build_registry(plugins.get_plugin_manager(plugins_folder))
    assert "house-head" in registry.strategies and "torchvision" not in registry.backbones


def test_a_missing_plugins_dir_is_one_clear_line(tmp_path):
    result = invoke("--plugins-dir", tmp_path / "nowhere", "plugins")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: plugins folder not found: {tmp_path / 'nowhere'}"]


# ---------------------------------------------------------------------------
# The example distribution: autoft-torchvision


def test_autoft_plugins_lists_the_example_distribution():
    result = invoke("plugins", "--json")
    row = next(r for r in json.loads(result.output)["plugins"] if r["name"] == "torchvision")
    assert (row["kind"], row["package"]) == ("backbone source", "autoft-torchvision")


def test_train_on_a_torchvision_backbone_end_to_end(class_folder, tmp_path):
    out = tmp_path / "run"
    result = invoke(
        "train", "--backbone", "torchvision:resnet18", "--data", class_folder, "--out", out,
        "--epochs", "1", "--image-size", "32", "--batch-size", "8", "--freeze-depth", "3",
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backbone"] == "torchvision:resnet18" and metrics["params"]["freeze_depth"] == 3
    from autoft.checkpoints import load_checkpoint

    loaded = load_checkpoint(out)
    assert [g.name for g in loaded.backbone.groups] == ["stem", "stage1", "stage2", "stage3", "stage4", "head"]
    assert loaded.classes == ["blue", "green", "red"]
    assert loaded.network()(torch.rand(2, 3, 32, 32)).shape == (2, 3)


def test_torchvision_groups_follow_the_architecture():
    resnet = autoft_torchvision.create("resnet18", num_classes=4)
    assert resnet.groups[0].params == ("conv1.weight", "bn1.weight", "bn1.bias")
    assert all(p.startswith(f"layer{i}.") for i in range(1, 5) for p in resnet.groups[i].params)
    assert resnet.head.params == ("fc.1.weight", "fc.1.bias")
    mobilenet = autoft_torchvision.create("mobilenet_v3_small", num_classes=4, dropout=0.3)
    features = [g for g in mobilenet.groups if g.params[0].startswith("features.")]
    assert len(features) == len(mobilenet.model.features)  # one group per block
    assert mobilenet.head.params == ("classifier.3.weight", "classifier.3.bias")
    assert mobilenet.model.classifier[2].p == 0.3  # its own dropout before the head is the tuned one


def test_torchvision_weights_tags_fail_offline_with_a_way_out(monkeypatch):
    import torchvision.models._api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(AutoftError, match="--weights PATH"):
        autoft_torchvision.create("resnet18", num_classes=3, weights="IMAGENET1K_V1")
    with pytest.raises(AutoftError, match="IMAGENET1K_V1"):  # an unknown tag lists the real ones
        autoft_torchvision.create("resnet18", num_classes=3, weights="imagenet22k")


def test_unknown_torchvision_model_suggests_close_names():
    result = invoke("train", "--backbone", "torchvision:resnet19", "--data", "sample:digits", "--out", "unused")
    assert result.exit_code == 2 and "resnet18" in result.output


def test_search_on_a_torchvision_backbone_end_to_end(class_folder, tmp_path):
    out = tmp_path / "search"
    result = invoke(
        "search", "--backbone", "torchvision:resnet18", "--data", class_folder, "--out", out, "--trials", "2",
        "--epochs", "1", "--image-size", "32", "--batch-size", "8", "--strategy", "freeze", "--device", "cpu", "--no-onnx",
    )
    assert result.exit_code == 0, result.output
    from autoft.checkpoints import load_checkpoint

    best = load_checkpoint(out)  # a search folder resolves to its best/ model
    assert best.meta["backbone"] == "torchvision:resnet18"
    assert best.meta["params"]["strategy"] == "freeze" and 0 <= best.meta["params"]["freeze_depth"] <= 4
