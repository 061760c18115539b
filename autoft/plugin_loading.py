"""Finding and loading plugins: the ``autoft`` entry points, a plugins folder, what
``AUTOFT_DISABLE_PLUGINS`` turns off, and load errors as one line naming the plugin's own code.

:mod:`autoft.plugins` builds the registry from what this loads.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import os
import re
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pluggy

from autoft import hookspecs
from autoft.errors import AutoftError

ENTRY_POINT_GROUP = "autoft"
BUILTIN_DISTRIBUTION = "autoft"
LOCAL_VERSION = "local"  # the version shown for modules loaded from a plugins folder


@dataclass
class PluginInfo:
    name: str
    package: str
    version: str
    error: str | None = None
    disabled: bool = False  # named in AUTOFT_DISABLE_PLUGINS: not loaded

    @property
    def broken(self) -> bool:
        return self.error is not None

    @property
    def origin(self) -> str:
        """``package acme 1.2 (entry point strategies)``, or the module of a plugins folder."""
        if self.version == LOCAL_VERSION:
            return f"module {self.name}.py in {self.package}"
        if not self.version:  # registered by hand: the name is all there is
            return f"plugin {self.name}"
        return f"package {self.package} {self.version} (entry point {self.name})"


def did_you_mean(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


# ---------------------------------------------------------------------------
# Loading


def get_plugin_manager(plugins_dir: str | os.PathLike | None = None) -> pluggy.PluginManager:
    """Build a plugin manager: add the hookspecs, load entry points, load a plugins folder."""
    pm = pluggy.PluginManager("autoft")
    pm.add_hookspecs(hookspecs)
    pm.autoft_info = {}  # plugin name -> PluginInfo, broken ones included
    builtins_only = os.environ.get("AUTOFT_DISABLE_PLUGIN_AUTOLOAD", "").strip() not in ("", "0", "false")
    disabled = _disabled_plugins()
    entry_points = sorted(_entry_points(), key=lambda ep: ep.dist.name != BUILTIN_DISTRIBUTION if ep.dist else True)
    _check_disabled(disabled, entry_points)
    for ep in entry_points:
        dist = ep.dist.name if ep.dist else "?"
        if builtins_only and dist != BUILTIN_DISTRIBUTION:
            continue
        info = PluginInfo(name=ep.name, package=dist, version=ep.dist.version if ep.dist else "?")
        name = f"{dist}:{ep.name}"
        if pm.get_plugin(name) is not None or name in pm.autoft_info:
            continue  # the same distribution seen twice on sys.path
        if _normalise(dist) in disabled or f"{_normalise(dist)}:{ep.name}" in disabled:
            info.disabled = True
            pm.autoft_info[name] = info
            continue
        try:
            register_plugin(pm, ep.load(), name)
        except Exception as exc:  # a broken plugin must not stop the others
            info.error = one_line(exc, module_roots(ep.module))
        pm.autoft_info[name] = info
    folder = plugins_dir or os.environ.get("AUTOFT_PLUGINS_DIR")
    pm.autoft_plugins_dir = str(Path(folder).resolve()) if folder else None  # for --jobs workers, which build their own
    if folder:
        load_plugins_dir(pm, Path(folder))
    return pm


def _normalise(distribution: str) -> str:
    """A distribution's name as pip compares them (PEP 503): ``Acme_AutoFT`` is ``acme-autoft``."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _disabled_plugins() -> set[str]:
    """``AUTOFT_DISABLE_PLUGINS``: distributions, or ``DISTRIBUTION:ENTRY_POINT``, comma-separated."""
    entries = set()
    for item in os.environ.get("AUTOFT_DISABLE_PLUGINS", "").split(","):
        dist, sep, entry_point = item.strip().partition(":")
        if dist:
            entries.add(_normalise(dist) + (f":{entry_point.strip()}" if sep else ""))
    return entries


def _check_disabled(disabled: set[str], entry_points: Sequence[importlib.metadata.EntryPoint]) -> None:
    """A name in ``AUTOFT_DISABLE_PLUGINS`` that matches nothing installed is a typo: one warning."""
    known = {_normalise(ep.dist.name) for ep in entry_points if ep.dist}
    known |= {f"{_normalise(ep.dist.name)}:{ep.name}" for ep in entry_points if ep.dist}
    for entry in sorted(disabled - known):
        warnings.warn(f"AUTOFT_DISABLE_PLUGINS names {entry!r}, but no installed plugin has that name{did_you_mean(entry, known)}", stacklevel=3)


def load_plugins_dir(pm: pluggy.PluginManager, folder: Path) -> None:
    """Register every ``*.py`` module in ``folder`` as a plugin."""
    if not folder.is_dir():
        raise AutoftError(f"plugins folder not found: {folder}")
    for path in sorted(folder.glob("*.py")):
        name = f"{folder.name}:{path.stem}"
        info = PluginInfo(name=path.stem, package=str(folder), version=LOCAL_VERSION)
        module_name = f"autoft_local_plugins.{path.stem}"
        try:
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # dataclasses and pickling look modules up here
            spec.loader.exec_module(module)
            register_plugin(pm, module, name)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            info.error = one_line(exc, [path])
        pm.autoft_info[name] = info


def register_plugin(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    """Register ``plugin``; a hook name autoft does not define is an error, not silence.

    pluggy accepts an implementation of a hook nobody specified (``autoft_register_backbone``,
    singular) and never calls it, so a typo would look like a plugin that registers nothing.
    """
    pm.register(plugin, name=name)
    unknown = [c.name for c in pm.get_hookcallers(plugin) or [] if not c.has_spec()]
    if unknown:
        pm.unregister(plugin, name=name)
        known = [n for n in dir(hookspecs) if n.startswith("autoft_")]
        hints = [f"{n}{did_you_mean(n, known)}{_defined_at(getattr(plugin, n, None))}" for n in unknown]
        raise AttributeError(f"unknown hook {', '.join(hints)}")


def _defined_at(function: Any) -> str:
    code = getattr(function, "__code__", None)
    return f" at {code.co_filename}:{code.co_firstlineno}" if code else ""


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def one_line(exc: BaseException, plugin_files: Sequence[Path] = ()) -> str:
    """``Type: message (file:line)``, the line being the innermost one in the plugin's own code.

    A plugin's author needs the line of *their* code: not json's decoder that raised, nor
    autoft's check that refused what the plugin registered, nor importlib's frames.
    """
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen")] if exc.__traceback__ else []
    own = [f for f in frames if _within(f.filename, plugin_files)]
    # Without the plugin's files, never point at autoft's or pluggy's own lines: they are not the mistake.
    outside = [f for f in frames if not _within(f.filename, _HOST_FILES)]
    where = [] if isinstance(exc, SyntaxError) else (own or outside)[-1:]  # a SyntaxError names its line itself
    place = f" ({where[0].filename}:{where[0].lineno})" if where else ""
    return f"{type(exc).__name__}: {exc}{place}".replace("\n", " ")


_HOST_FILES = (Path(__file__).parent, Path(pluggy.__file__).parent)


def _within(filename: str, roots: Sequence[Path]) -> bool:
    path = Path(filename).resolve()
    return any(path == root or root in path.parents for root in (r.resolve() for r in roots))


def module_roots(module: str) -> list[Path]:
    """The files of the distribution a module belongs to: its top-level package's folders, or the module's file."""
    top = module.split(".")[0]
    try:
        spec = importlib.util.find_spec(top) if top not in sys.modules else getattr(sys.modules[top], "__spec__", None)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return [Path(p) for p in spec.submodule_search_locations]
    return [Path(spec.origin)] if spec.origin and spec.origin not in ("built-in", "frozen") else []


def plugin_info(pm: pluggy.PluginManager, plugin_name: str) -> PluginInfo:
    if not hasattr(pm, "autoft_info"):  # a manager built without get_plugin_manager()
        pm.autoft_info = {}
    if plugin_name not in pm.autoft_info:  # registered by hand, e.g. pm.register(obj, name=...) in a test
        pm.autoft_info[plugin_name] = PluginInfo(name=plugin_name, package=plugin_name, version="")
    return pm.autoft_info[plugin_name]
