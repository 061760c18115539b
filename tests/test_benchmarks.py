"""The benchmark scripts still import what they name: they run by hand, rarely, and import
autoft lazily inside ``main()``, so a moved module would only show when someone next runs one."""

import ast
import importlib
import re
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).parent.parent / "benchmarks").glob("*.py"))


def _autoft_imports(path: Path) -> list[tuple[str, str | None]]:
    """``(module, name)`` of every ``from autoft... import name`` and ``import autoft...`` in the
    file's code, and of every ``from autoft... import name`` in its strings (the code it hands
    to ``python -c``, f-strings included)."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "autoft":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "autoft"]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += re.findall(r"from (autoft[\w.]*) import (\w+)", node.value)
    return found


def test_the_benchmarks_are_found():
    assert len(BENCHMARKS) >= 10 and any(p.name == "suite.py" for p in BENCHMARKS)


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_every_autoft_name_a_benchmark_imports_exists(path):
    for module, name in _autoft_imports(path):
        imported = importlib.import_module(module)
        if name is not None and not hasattr(imported, name):
            importlib.import_module(f"{module}.{name}")  # a submodule: raises ModuleNotFoundError, naming it
