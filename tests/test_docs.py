"""The documentation: README.md is a landing page whose commands are the ones CI runs, the site in
docs/ builds in strict mode (no broken link, anchor or page), and docs/plugins.md keeps up with the
hooks and the specs, and its example plugins work."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autoft import hookspecs, specs
from autoft.cli import make_app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "plugins.md"
TESTS = Path(__file__).resolve().parent

HOOKS = {name: fn for name, fn in vars(hookspecs).items() if name.startswith("autoft_") and callable(fn)}
DOCUMENTED_TYPES = [
    specs.BackboneSpec, specs.BackboneInfo, specs.Backbone, specs.ParamGroup, specs.DatasetSpec, specs.LabelledImages,
    specs.StrategySpec, specs.TrainPlan, specs.RegularizerSpec, specs.MetricSpec, specs.PretrainerSpec, specs.WeightsSpec,
    specs.PretrainedWeights,
]
PROTOCOLS = [specs.Strategy, specs.TrainCallback, specs.Regularizer, specs.Pretrainer]

# The README's two commands, word for word: CI runs the test command as written, and a newcomer
# copies the quick start.
QUICK_START = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
    "autoft search --backbone test_resnet --data sample:digits --timeout 1m --out runs/digits"
)
TEST_COMMAND = "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[dev]' -e plugins/autoft-torchvision && pytest"
README_MAX_LINES = 150


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


def write_guide_plugins(folder: Path) -> Path:
    """The guide's files, as a reader would save them; the modules load as a plugins folder."""
    (folder / "tests").mkdir(parents=True)
    for name, body in titled_blocks().items():
        (folder / name).write_text(body, encoding="utf-8")
    return folder


def test_the_guide_plugins_load_and_pass_their_contract_tests(tmp_path):
    """From the guide alone: write its modules and its test file, load them, run the tests."""
    folder = plugins_dir = write_guide_plugins(tmp_path / "autoft-acme")  # pyproject.toml is not a *.py

    listed = CliRunner().invoke(make_app(), ["--plugins-dir", str(plugins_dir), "plugins", "--json"])
    assert listed.exit_code == 0, listed.output
    found = json.loads(listed.output)
    assert not found["broken"] and not found["conflicts"]
    assert {(r["kind"], r["name"]) for r in found["plugins"] if r["package"] == str(plugins_dir)} == {
        ("backbone source", "acme"), ("dataset", "jsonl"), ("strategy", "bitfit"), ("strategy", "acme-lpft"),
        ("regularizer", "acme-mixup"), ("metric", "worst_class_recall"), ("pretraining", "rotation"), ("weights", "acme-zoo"),
    }

    env = {**os.environ, "AUTOFT_PLUGINS_DIR": str(plugins_dir), "AUTOFT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", str(folder / "tests" / "test_acme.py")],
        cwd=folder, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" not in summary and "failed" not in summary, summary


def test_the_guide_lp_ft_is_short_and_needs_no_gradient_hooks():
    source = titled_blocks()["acme_strategies.py"]
    lines = source[source.index("class ProbeThenTune") :].split("\n\n\n")[0].splitlines()
    assert len(lines) < 40, f"the LP-FT example has {len(lines)} lines"
    assert "register_hook" not in source and "extra_loss" not in source
    assert "def on_epoch_start(self, ctx)" in source and "ctx.unfreeze(" in source and "def state_dict(self)" in source


def test_the_guide_metric_regularizer_and_lp_ft_work_from_the_cli(tmp_path):
    """`--metric` of a metric plugin on train and search; the guide's LP-FT and mixup in a run."""
    import optuna

    plugins_dir = write_guide_plugins(tmp_path / "autoft-acme")
    base = ["--plugins-dir", str(plugins_dir)]
    data = ["--backbone", "test_resnet", "--data", "sample:digits", "--image-size", "16", "--device", "cpu", "--batch-size", "128"]
    train = CliRunner().invoke(
        make_app(),
        [*base, "train", *data, "--out", str(tmp_path / "train"), "--epochs", "2", "--strategy", "acme-lpft", "--regularizer", "acme-mixup", "--metric", "worst_class_recall"],
    )
    assert train.exit_code == 0, train.output
    metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert metrics["metric"] == "worst_class_recall" and "val worst class recall" in train.output
    assert all("val_worst_class_recall" in epoch for epoch in metrics["epochs"])
    assert metrics["params"]["regularizer"] == "acme-mixup" and 0.05 <= metrics["params"]["acme_mixup_alpha"] <= 1.0
    search = CliRunner().invoke(
        make_app(),
        [*base, "search", *data, "--out", str(tmp_path / "search"), "--trials", "2", "--epochs", "1", "--no-onnx", "--metric", "worst_class_recall",
         "--strategy", "acme-lpft", "--range", "regularizer=none,acme-mixup"],
    )  # fmt: skip
    assert search.exit_code == 0, search.output
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 'search' / 'study.db'}")
    assert all(t.params["strategy"] == "acme-lpft" and t.params["regularizer"] in ("none", "acme-mixup") for t in study.trials)
    assert json.loads((tmp_path / "search" / "best" / "metrics.json").read_text())["metric"] == "worst_class_recall"


def bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"^```bash\n(.*?)^```$", text, re.S | re.M)]


def test_the_readme_gives_the_quick_start_and_the_test_command_that_ci_runs():
    readme = README.read_text(encoding="utf-8")
    assert QUICK_START in bash_blocks(readme) and TEST_COMMAND in bash_blocks(readme)
    assert re.search(r"^```\nplan: .*\ndone: best .*\nbest model in runs/digits/best", readme, re.S | re.M), "the quick start's sample output"
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert "mkdocs build --strict" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    assert QUICK_START in bash_blocks(index) and TEST_COMMAND in bash_blocks(index), "the site's home gives the same commands"


def nav_pages() -> list[str]:
    from mkdocs.config import load_config

    def flatten(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from flatten(value) if isinstance(value, list) else [value]

    return list(flatten(load_config(str(ROOT / "mkdocs.yml")).nav))


def test_the_readme_is_a_short_landing_page_that_links_every_docs_page():
    readme = README.read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES
    links = [link.split("#")[0] for link in re.findall(r"\]\(([^)\s]+)\)", readme) if "://" not in link]
    assert not [link for link in links if not (ROOT / link).exists()], "README links to missing files"
    assert not [page for page in nav_pages() if f"docs/{page}" not in links], "every page of the site is linked from the README"


def build_site(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=config.parent, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True, timeout=300,
    )


def test_the_site_builds_in_strict_mode_with_every_page_in_the_nav(tmp_path):
    built = build_site(ROOT / "mkdocs.yml", tmp_path / "site")
    assert built.returncode == 0, built.stderr[-4000:]
    pages = nav_pages()
    assert sorted(pages) == sorted(path.name for path in (ROOT / "docs").glob("*.md"))
    for page in pages:
        html = tmp_path / "site" / ("index.html" if page == "index.md" else f"{page.removesuffix('.md')}/index.html")
        assert html.is_file(), page


def test_a_broken_link_anchor_or_page_fails_the_strict_build(tmp_path):
    """The validation settings are what make these fail: without them strict mode lets them through."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with (tmp_path / "docs" / "data.md").open("a", encoding="utf-8") as page:
        page.write("\nSee [a page](nowhere.md) and [a heading](search.md#no-such-heading).\n")
    (tmp_path / "docs" / "orphan.md").write_text("# Not in the nav\n", encoding="utf-8")
    built = build_site(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert built.returncode != 0
    assert "'nowhere.md'" in built.stderr and "'#no-such-heading'" in built.stderr and "orphan.md" in built.stderr, built.stderr[-4000:]
