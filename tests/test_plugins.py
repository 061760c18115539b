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
    assert table.output.splitlines()[0].split() == ["kind", "name", "package", "entry", "point", "description"]
    row = next(line for line in table.output.splitlines() if "acme-head" in line)
    assert row.split()[:5] == ["strategy", "acme-head", "acme-autoft", "2.0.1", "headwork"]


def test_the_listing_in_a_log_or_an_80_column_terminal_cuts_nothing(installed):
    long_name = "acme_recall_at_five_for_the_rarest_classes"
    mod = module_name("acme_metrics")
    source = (
        "from autoft import hookimpl\nfrom autoft.specs import MetricSpec\n\n@hookimpl\ndef autoft_register_metrics(register):\n"
        f"    register(MetricSpec({long_name!r}, 'Recall at five, averaged over the ten rarest classes of the validation split', lambda l, p: 0.5))\n"
    )
    installed("acme-metrics-for-long-tailed-data", {mod: source}, {"metrics": mod}, version="1.0.0")
    result = invoke("plugins", env={"COLUMNS": "80"})  # stdout is no terminal here, as in a log
    assert result.exit_code == 0 and "…" not in result.output
    row = next(line for line in result.output.splitlines() if long_name in line)
    assert row.split()[:5] == ["metric", long_name, "acme-metrics-for-long-tailed-data", "1.0.0", "metrics"]
    assert row.endswith("Recall at five, averaged over the ten rarest classes of the validation split")


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
    from autoft.model.checkpoints import load_checkpoint

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
        "--epochs", "1", "--image-size", "32", "--batch-size", "8", "--strategy", "freeze", "--device", "cpu", "--no-onnx", "--no-cv",
    )
    assert result.exit_code == 0, result.output
    from autoft.model.checkpoints import CHECKPOINT_NAME, load_checkpoint

    # The best trial's model (a baseline may ship instead when it scores higher on these easy colours).
    best = load_checkpoint(next(out.glob(f"trials/*/{CHECKPOINT_NAME}")))
    assert best.meta["backbone"] == "torchvision:resnet18"
    assert best.meta["params"]["strategy"] == "freeze" and 0 <= best.meta["params"]["freeze_depth"] <= 4


# ---------------------------------------------------------------------------
# Disabling plugins, API versions


def test_one_distribution_or_one_entry_point_is_disabled_by_name(installed, monkeypatch):
    first, second = module_name("acme_a"), module_name("acme_b")
    installed("Acme_AutoFT", {first: GOOD_PLUGIN.format(name="acme-a"), second: GOOD_PLUGIN.format(name="acme-b")}, {"a": first, "b": second})
    assert {"acme-a", "acme-b"} <= set(plugins.build_registry(plugins.get_plugin_manager()).strategies)
    monkeypatch.setenv("AUTOFT_DISABLE_PLUGINS", "acme-autoft:b")  # one entry point; names compare as pip compares them
    registry = plugins.build_registry(plugins.get_plugin_manager())
    assert "acme-a" in registry.strategies and "acme-b" not in registry.strategies
    monkeypatch.setenv("AUTOFT_DISABLE_PLUGINS", " autoft-torchvision , acme-autoft ")  # whole distributions
    registry = use(plugins.get_plugin_manager())
    assert not {"acme-a", "acme-b"} & set(registry.strategies) and "torchvision" not in registry.backbones
    assert "freeze" in registry.strategies  # the others load as before
    listing = json.loads(invoke("plugins", "--json").output)
    assert {(d["package"], d["plugin"]) for d in listing["disabled"]} == {("Acme_AutoFT", "a"), ("Acme_AutoFT", "b"), ("autoft-torchvision", "torchvision")}


def test_a_disabled_name_that_matches_nothing_is_one_warning(monkeypatch):
    monkeypatch.setenv("AUTOFT_DISABLE_PLUGINS", "autoft-torchvison")
    with pytest.warns(UserWarning, match=r"^AUTOFT_DISABLE_PLUGINS names 'autoft-torchvison', but no installed plugin has that name \(did you mean autoft-torchvision"):
        registry = plugins.build_registry(plugins.get_plugin_manager())
    assert "torchvision" in registry.backbones


def test_autoft_marks_its_plugin_api_in_its_version_and_constants():
    import importlib.metadata

    from autoft.specs import API_VERSIONS, STRATEGY_API, RegularizerSpec

    assert autoft.PLUGIN_API_VERSION == 2 == STRATEGY_API == API_VERSIONS["strategies"]
    assert autoft.__version__ == importlib.metadata.version("autoft") and tuple(map(int, autoft.__version__.split(".")[:2])) >= (0, 2)
    assert StrategySpec("s", "", LinearProbe).api_version == STRATEGY_API  # the default is the current API, not the deprecated 1
    assert RegularizerSpec("r", "", object).api_version == STRATEGY_API and BackboneSpec("b", "", None, list, bool).api_version == 1


def test_autoft_plugins_warns_about_a_plugin_written_for_a_newer_api():
    class Future:
        @hookimpl
        def autoft_register_strategies(self, register):
            register(StrategySpec("from-the-future", "", LinearProbe, api_version=3))

    pm = plugins.get_plugin_manager()
    pm.register(Future(), name="future-plugin")
    use(pm)
    result = invoke("plugins")
    assert result.exit_code == 0 and "Traceback" not in result.output
    warning = next(line for line in result.output.splitlines() if line.startswith("warning:"))
    assert warning == (
        f"warning: strategy 'from-the-future' from future-plugin is written for strategy API 3, but this autoft ({autoft.__version__}) "
        "offers API 2: upgrade autoft, or install a release of future-plugin for API 2"
    )
    train = invoke("train", "--backbone", "test_resnet", "--data", "sample:digits", "--out", "unused", "--strategy", "from-the-future", "--epochs", "1")
    assert train.exit_code == 2 and "Traceback" not in train.output
    assert "is written for strategy API 3; this autoft" in train.output and "upgrade autoft" in train.output


# ---------------------------------------------------------------------------
# A clash on a default name


STALE_LPFT = '''
from autoft import hookimpl
from autoft.specs import StrategySpec
from autoft_plugins.strategies import LinearProbe

@hookimpl
def autoft_register_strategies(register):
    register(StrategySpec("lp-ft", "an old copy", LinearProbe))
'''


def test_a_clash_on_a_default_strategy_leaves_it_out_of_the_default_search(installed, class_folder, tmp_path):
    import optuna

    from autoft.searching import search
    from autoft.searching.storage import open_storage

    stale = module_name("stale_lpft")
    installed("acme-stale", {stale: STALE_LPFT}, {"strategies": stale}, version="0.3")
    use(plugins.get_plugin_manager())
    expected = (
        f"strategy 'lp-ft' is registered by both autoft {autoft.__version__} (entry point strategies) and acme-stale 0.3 "
        "(entry point strategies): left out of the default search (AUTOFT_DISABLE_PLUGINS=acme-stale turns one off)"
    )
    with pytest.warns(UserWarning) as caught:
        result = search("test_resnet", str(class_folder), tmp_path / "s", trials=1, epochs=1, image_size=16, device="cpu", no_cv=True, export_onnx=False, batch_size=8, ensemble=1)
    assert [str(w.message) for w in caught if "lp-ft" in str(w.message)] == [expected]
    assert result.states == {"COMPLETE": 1}
    (trial,) = optuna.load_study(study_name=result.study_name, storage=open_storage(result.storage)).get_trials()
    assert trial.distributions["strategy"].choices == ("freeze", "l2sp")  # the clashing name is no choice of the search
    # Asked for by name, the clash is still the error, in one line.
    asked = invoke("search", "--backbone", "test_resnet", "--data", class_folder, "--out", tmp_path / "x", "--strategy", "lp-ft", "--trials", "1")
    assert asked.exit_code == 2 and "Traceback" not in asked.output
    assert asked.output.strip().splitlines()[-1].startswith("error: strategy 'lp-ft' is registered by both autoft")


# ---------------------------------------------------------------------------
# Errors and silent misbehaviour at the boundary: one line, naming the plugin's own code


BOUNDARY_PLUGIN = '''
import torch
from autoft import hookimpl
from autoft.specs import MetricSpec, RegularizerSpec, StrategySpec, TrainPlan
from autoft_plugins.strategies import Full


class Boom(Full):
    def on_epoch_start(self, ctx):
        ctx.group_parameters(["no-such-group"])  # line 10: the ValueError is raised in autoft's lifecycle.py


class LegacyNan(Full):
    def apply(self, backbone, params):
        return TrainPlan([{"params": list(backbone.model.parameters())}], extra_loss=self.penalty)

    def penalty(self):
        return torch.tensor(float("nan"))


class HeadOnlyPlan(Full):
    def apply(self, backbone, params):  # forgets to freeze what it does not train
        head = [p for n, p in backbone.model.named_parameters() if n in backbone.head.params]
        return TrainPlan([{"params": head}])


class Inert:
    def default_params(self):
        return {}

    def suggest(self, trial):
        return {}


@hookimpl
def autoft_register_strategies(register):
    register(StrategySpec("boom", "raises at the first epoch", Boom))
    register(StrategySpec("legacy-nan", "an API 1 strategy whose extra loss is NaN", LegacyNan, api_version=1))
    register(StrategySpec("head-only-plan", "leaves the backbone trainable outside its plan", HeadOnlyPlan))


@hookimpl
def autoft_register_regularizers(register):
    register(RegularizerSpec("inert", "implements no lifecycle method", Inert))


@hookimpl
def autoft_register_metrics(register):
    register(MetricSpec("acme_recall_of_every_class", "an array, not a float", lambda labels, p: p[:, 0]))
    register(MetricSpec("acme_nan", "NaN", lambda labels, p: float("nan")))
'''


@pytest.fixture
def boundary(tmp_path):
    folder = tmp_path / "boundary_plugins"
    folder.mkdir()
    (folder / "acme_boundary.py").write_text(BOUNDARY_PLUGIN)
    registry = use(plugins.get_plugin_manager(folder))
    assert not any(p.broken for p in registry.plugins.values())
    return folder, registry


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    from autoft.data.decoding import load_data
    from conftest import COLOURS, make_image

    root = tmp_path_factory.mktemp("boundary") / "colours"
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(6):
            make_image(root / name / f"{i}.png", colour, seed=100 * c + i, size=16)
    return load_data(str(root), image_size=16, seed=0)


def fit(data, registry, **params):
    from autoft.model.backbones import build_backbone
    from autoft.training.trainer import Trainer, TrainerConfig

    backbone = build_backbone("test_resnet", num_classes=data.num_classes, registry=registry)
    return Trainer(backbone, data, {"strategy": "full", **params}, TrainerConfig(epochs=1, batch_size=8, device="cpu"), registry=registry).fit()


def test_an_error_raised_in_a_plugin_names_the_plugins_own_file_and_line(boundary, colours, tmp_path):
    from autoft.lifecycle import PluginError

    folder, registry = boundary
    with pytest.raises(PluginError) as caught:
        fit(colours, registry, strategy="boom")
    message = str(caught.value)
    assert message.startswith("strategy 'boom' (") and "on_epoch_start() raised ValueError: no parameter group ['no-such-group']" in message
    assert message.endswith(f"({folder / 'acme_boundary.py'}:10)") and "lifecycle.py" not in message and "\n" not in message
    assert (caught.value.kind, caught.value.name) == ("strategies", "boom")
    result = invoke("--plugins-dir", folder, "train", "--backbone", "test_resnet", "--data", "sample:digits", "--out", tmp_path / "r", "--strategy", "boom", "--epochs", "1", "--image-size", "16")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].endswith("acme_boundary.py:10)")


def test_a_metric_returning_an_array_or_nan_is_one_line_asking_for_a_finite_float(boundary):
    import numpy as np

    from autoft.lifecycle import PluginError
    from autoft.model.metrics import score

    folder, registry = boundary
    labels, probabilities = np.array([0, 1, 1, 0, 2, 2]), np.full((6, 3), 1 / 3, dtype=np.float32)
    with pytest.raises(PluginError) as array:
        score(registry.metric("acme_recall_of_every_class"), labels, probabilities, registry)
    assert str(array.value) == f"metric 'acme_recall_of_every_class' (acme_boundary.py in {folder}): compute() returned a (6,) float32 array; expected a finite float"
    with pytest.raises(PluginError) as nan:
        score(registry.metric("acme_nan"), labels, probabilities, registry)
    assert str(nan.value) == f"metric 'acme_nan' (acme_boundary.py in {folder}): compute() returned float nan; expected a finite float"


def test_a_nan_from_an_api_1_extra_loss_names_the_method_the_plugin_defined(boundary, colours):
    from autoft.lifecycle import PluginError

    _, registry = boundary
    with pytest.warns(DeprecationWarning), pytest.raises(PluginError) as caught:
        fit(colours, registry, strategy="legacy-nan")
    assert "TrainPlan.extra_loss (LegacyNan.penalty()) returned nan at step 0 (epoch 1)" in str(caught.value)
    assert "loss_term" not in str(caught.value)


def test_a_regulariser_that_changes_nothing_and_parameters_outside_the_plan_are_said_once(boundary, colours):
    folder, registry = boundary
    with pytest.warns(UserWarning) as caught:
        fit(colours, registry, regularizer="inert")
        fit(colours, registry, regularizer="inert")
        fit(colours, registry, strategy="head-only-plan")
        fit(colours, registry, strategy="head-only-plan")
    messages = [str(w.message) for w in caught if "inert" in str(w.message) or "head-only-plan" in str(w.message)]
    assert messages == [
        f"regularizer 'inert' (acme_boundary.py in {folder}) implements none of on_epoch_start, transform_batch, loss_term, on_epoch_end: it changes nothing in training",
        messages[1],
    ]
    assert messages[1].startswith(f"strategy 'head-only-plan' (acme_boundary.py in {folder}): apply() leaves ")
    assert "parameter(s) trainable outside its TrainPlan (" in messages[1] and messages[1].endswith("they get gradients but never train: freeze them or add them to a group")


def test_a_strategy_whose_plugin_raised_is_left_out_of_later_trials(boundary):
    import optuna

    from autoft.lifecycle import PluginError
    from autoft.searching.left_out import LeftOut
    from autoft.searching.space import SearchSpace

    _, registry = boundary
    strategies = {name: registry.strategy(name).factory() for name in ("freeze", "boom")}
    space, left_out = SearchSpace(("freeze", "boom"), regularizers=("none",)), LeftOut()
    error = PluginError("strategy 'boom' (local): on_epoch_start() raised ValueError: no (acme_boundary.py:10)", kind="strategies", name="boom")
    with pytest.warns(UserWarning) as caught:
        assert left_out.add(error, trial_number=3) is True
        assert left_out.add(error, trial_number=4) is False  # said once
    assert [str(w.message) for w in caught] == [f"{error}; later trials leave strategy 'boom' out"]
    assert not left_out.exhausted(space.strategies, space.regularizers)  # freeze is left
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda trial: len(space.suggest(trial, strategies, 6, left_out)), n_trials=12)
    drew_boom = [t for t in study.trials if t.params["strategy"] == "boom"]
    assert drew_boom and all(t.state == optuna.trial.TrialState.PRUNED for t in drew_boom)  # none of them trains
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials if t.params["strategy"] == "freeze")
    assert space == SearchSpace(("freeze", "boom"), regularizers=("none",))  # the space itself is unchanged: what failed is the search's state
    with pytest.warns(UserWarning, match="later trials leave strategy 'freeze' out"):
        assert left_out.add(PluginError("x", kind="strategies", name="freeze"), 5) is True
    assert left_out.exhausted(space.strategies, space.regularizers)  # nothing left to search


def test_a_search_whose_only_strategy_raised_stops_instead_of_failing_every_trial(boundary, class_folder, tmp_path):
    folder, _ = boundary
    result = invoke(
        "--plugins-dir", folder, "search", "--backbone", "test_resnet", "--data", class_folder, "--out", tmp_path / "s", "--strategy", "boom",
        "--trials", "4", "--epochs", "1", "--image-size", "16", "--no-cv", "--no-onnx", "--batch-size", "8",
    )
    assert "Traceback" not in result.output
    said = [line for line in result.output.splitlines() if "later trials leave strategy 'boom' out" in line]
    assert len(said) == 1 and said[0].startswith("warning: strategy 'boom' (") and "acme_boundary.py:10)" in said[0]
    assert result.exit_code == 0 and "(1 fail, 3 queued, not run;" in " ".join(result.output.split())  # the search stopped: the other 3 never ran


def test_a_range_that_leaves_out_the_default_recipes_value_says_so():
    from autoft.searching.space import SearchSpace, load_overrides
    from autoft_plugins.strategies import Freeze

    space = SearchSpace(("freeze",), load_overrides(["lr=0.01:0.1:log", "dropout=0.1:0.3"]))
    with pytest.warns(UserWarning) as caught:
        first = space.defaults("freeze", Freeze(), 6)
    assert [str(w.message) for w in caught] == [
        "--range lr=0.01 to 0.1 (log) leaves out the default recipe's lr=0.001; its first trial draws lr from that range instead"
    ]
    assert "lr" not in first and first["dropout"] == 0.1  # a value inside the range stays


def test_the_search_space_takes_its_regularisers_from_the_registry_it_was_given(tmp_path):
    """A worker's space holds the worker's registry (--plugins-dir included), not whatever the
    process's default plugins are: a folder regulariser the default registry lacks is drawn."""
    import optuna

    from autoft.errors import AutoftError
    from autoft.searching.space import SearchSpace

    folder = tmp_path / "boundary_plugins"
    folder.mkdir()
    (folder / "acme_boundary.py").write_text(BOUNDARY_PLUGIN)
    own = plugins.build_registry(plugins.get_plugin_manager(folder))
    plugins.set_default_plugin_manager(None)
    with pytest.raises(AutoftError):
        plugins.registry().regularizer("inert")  # not installed: only the folder has it
    space = SearchSpace(("freeze",), regularizers=("inert",), registry=own)
    study = optuna.create_study()
    study.optimize(lambda trial: len(space.suggest(trial, {"freeze": own.strategy("freeze").factory()}, 4)), n_trials=1)
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE and study.trials[0].params["regularizer"] == "inert"
