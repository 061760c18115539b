"""docs/plugins.md keeps up with the hooks and the specs, and its example plugins work."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autoft import hookspecs, specs
from autoft.cli import make_app

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugins.md"
TESTS = Path(__file__).resolve().parent

HOOKS = {name: fn for name, fn in vars(hookspecs).items() if name.startswith("autoft_") and callable(fn)}
DOCUMENTED_TYPES = [
    specs.BackboneSpec, specs.Backbone, specs.ParamGroup, specs.DatasetSpec, specs.LabelledImages,
    specs.StrategySpec, specs.TrainPlan, specs.PretrainerSpec,
]
PROTOCOLS = [specs.Strategy, specs.Pretrainer]


def reference() -> str:
    text = GUIDE.read_text(encoding="utf-8")
    return text[text.index("\n## Reference") :]


def signature(fn) -> str:
    return f"{fn.__name__}({', '.join(p for p in inspect.signature(fn).parameters if p != 'self')})"


def titled_blocks() -> dict[str, str]:
    """Code blocks written as ```python title="FILE"``` in the guide, by file name."""
    pattern = re.compile(r'^```\w+ title="([^"]+)"\n(.*?)^```$', re.S | re.M)
    return {title: body for title, body in pattern.findall(GUIDE.read_text(encoding="utf-8"))}


def test_the_hooks_are_the_ones_this_test_knows():
    assert HOOKS, "no hooks found in autoft.hookspecs"
    assert all(getattr(fn, "autoft_spec", None) is not None for fn in HOOKS.values())


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_every_hook_is_in_the_reference_with_its_arguments(hook):
    assert f"#### `{signature(HOOKS[hook])}`" in reference()


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_every_hook_is_exercised_by_a_test(hook):
    """A test implements the hook (in a test plugin object or module source) and loads it."""
    users = [
        path.name for path in TESTS.glob("test_*.py")
        if path.name != Path(__file__).name and re.search(rf"def {hook}\(", path.read_text(encoding="utf-8"))
    ]
    assert users, f"no test implements {hook}"


@pytest.mark.parametrize("spec_type", DOCUMENTED_TYPES, ids=lambda t: t.__name__)
def test_every_spec_field_is_in_the_reference(spec_type):
    text = reference()
    fields = [f.name for f in dataclasses.fields(spec_type)] if dataclasses.is_dataclass(spec_type) else list(spec_type._fields)
    assert f"`{spec_type.__name__}" in text
    spans = re.findall(r"`([^`]+)`", text)
    missing = [f for f in fields if not any(re.search(rf"\b{f}\b", span) for span in spans)]
    assert not missing, f"{spec_type.__name__} fields not in the reference: {missing}"


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda t: t.__name__)
def test_every_protocol_method_is_in_the_reference_with_its_arguments(protocol):
    methods = [fn for name, fn in vars(protocol).items() if inspect.isfunction(fn) and not name.startswith("_")]
    assert methods
    for method in methods:
        assert f"`{signature(method)}" in reference(), signature(method)


def test_the_guide_example_distribution_is_what_its_pyproject_says():
    blocks = titled_blocks()
    project = tomllib.loads(blocks["pyproject.toml"])
    modules = sorted(name.removesuffix(".py") for name in blocks if name.endswith(".py") and "/" not in name)
    assert sorted(project["project"]["entry-points"]["autoft"].values()) == modules
    assert sorted(project["tool"]["setuptools"]["py-modules"]) == modules
    hooks_in_guide = {hook for hook in HOOKS for name in modules if f"def {hook}(" in blocks[f"{name}.py"]}
    assert hooks_in_guide == set(HOOKS), "the guide shows a plugin for every hook"


def test_the_guide_plugins_load_and_pass_their_contract_tests(tmp_path):
    """From the guide alone: write its modules and its test file, load them, run the tests."""
    folder = tmp_path / "autoft-acme"
    (folder / "tests").mkdir(parents=True)
    for name, body in titled_blocks().items():
        (folder / name).write_text(body, encoding="utf-8")
    plugins_dir = folder  # the modules load as a plugins folder; pyproject.toml is not a *.py

    listed = CliRunner().invoke(make_app(), ["--plugins-dir", str(plugins_dir), "plugins", "--json"])
    assert listed.exit_code == 0, listed.output
    found = json.loads(listed.output)
    assert not found["broken"] and not found["conflicts"]
    assert {(r["kind"], r["name"]) for r in found["plugins"] if r["package"] == str(plugins_dir)} == {
        ("backbone source", "acme"), ("dataset", "jsonl"), ("strategy", "bitfit"), ("pretraining", "rotation"),
    }

    env = {**os.environ, "AUTOFT_PLUGINS_DIR": str(plugins_dir), "AUTOFT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(folder / "tests" / "test_acme.py")],
        cwd=folder, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" not in summary and "failed" not in summary, summary
