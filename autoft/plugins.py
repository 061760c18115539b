"""Plugin loading and the registry of what plugins provide.

Built-in plugins (``autoft_plugins``) and third-party ones load the same way: through
the ``autoft`` entry-point group. A plugin that fails to import, or raises in a hook,
is recorded as broken and skipped; the others load. Two plugins registering one name
make that name unusable, with an error naming both packages, while everything else
keeps working.

Environment:

- ``AUTOFT_DISABLE_PLUGIN_AUTOLOAD=1`` loads only the built-in plugins.
- ``AUTOFT_PLUGINS_DIR=DIR`` (or the CLI's ``--plugins-dir``) also loads every ``*.py``
  module in ``DIR`` as a plugin, without packaging.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Sequence, TypeVar

import pluggy

from autoft import hookspecs
from autoft.errors import AutoftError
from autoft.specs import BackboneSpec, DatasetSpec, MetricSpec, PretrainerSpec, RegularizerSpec, StrategySpec

ENTRY_POINT_GROUP = "autoft"
BUILTIN_DISTRIBUTION = "autoft"
LOCAL_VERSION = "local"  # the version shown for modules loaded from a plugins folder

SpecT = TypeVar("SpecT")

# hook name -> (registry attribute, the spec type it must register)
KINDS: dict[str, tuple[str, type]] = {
    "autoft_register_backbones": ("backbones", BackboneSpec),
    "autoft_register_datasets": ("datasets", DatasetSpec),
    "autoft_register_strategies": ("strategies", StrategySpec),
    "autoft_register_pretrainers": ("pretrainers", PretrainerSpec),
    "autoft_register_regularizers": ("regularizers", RegularizerSpec),
    "autoft_register_metrics": ("metrics", MetricSpec),
}

# registry attribute -> what the user calls one of its entries, in messages
KIND_NAMES: dict[str, str] = {
    "backbones": "backbone source",
    "datasets": "dataset format",
    "strategies": "strategy",
    "pretrainers": "pretraining method",
    "regularizers": "regulariser",
    "metrics": "metric",
}


@dataclass
class PluginInfo:
    name: str
    package: str
    version: str
    error: str | None = None

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


@dataclass
class Registered(Generic[SpecT]):
    spec: SpecT
    plugin: PluginInfo


@dataclass
class Registry:
    """Everything the loaded plugins registered, by kind and name."""

    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    backbones: dict[str, Registered[BackboneSpec]] = field(default_factory=dict)
    datasets: dict[str, Registered[DatasetSpec]] = field(default_factory=dict)
    strategies: dict[str, Registered[StrategySpec]] = field(default_factory=dict)
    pretrainers: dict[str, Registered[PretrainerSpec]] = field(default_factory=dict)
    regularizers: dict[str, Registered[RegularizerSpec]] = field(default_factory=dict)
    metrics: dict[str, Registered[MetricSpec]] = field(default_factory=dict)
    # kind -> name -> every plugin that registered it, when more than one did
    conflicts: dict[str, dict[str, list[PluginInfo]]] = field(default_factory=dict)

    # -- lookups ------------------------------------------------------------

    def _get(self, kind: str, name: str) -> Any:
        what = KIND_NAMES.get(kind, kind)
        clash = self.conflicts.get(kind, {}).get(name)
        if clash:
            owners = " and ".join(f"{p.package} ({p.name})" for p in clash)
            raise AutoftError(f"{what} {name!r} is registered by both {owners}; uninstall or disable one of them")
        table: dict[str, Registered[Any]] = getattr(self, kind)
        if name not in table:
            hint = _did_you_mean(name, table)
            raise AutoftError(f"unknown {what} {name!r}{hint}; run `autoft plugins` to list them{self._broken_note()}")
        return table[name].spec

    def _broken_note(self) -> str:
        """The name may belong to a plugin that failed to load: say so rather than only 'unknown'."""
        broken = sorted({p.package for p in self.plugins.values() if p.broken})
        if not broken:
            return ""
        return f" (note: broken plugin(s) from {', '.join(broken)} registered nothing; see `autoft plugins`)"

    def strategy(self, name: str) -> StrategySpec:
        return self._get("strategies", name)

    def pretrainer(self, name: str) -> PretrainerSpec:
        return self._get("pretrainers", name)

    def regularizer(self, name: str) -> RegularizerSpec:
        return self._get("regularizers", name)

    def metric(self, name: str) -> MetricSpec:
        return self._get("metrics", name)

    def backbone(self, name: str) -> tuple[BackboneSpec, str]:
        """Resolve ``SOURCE:MODEL`` or a bare model name to its source and model name."""
        source, sep, model_name = name.partition(":")
        if sep and (source in self.backbones or source in self.conflicts.get("backbones", {})):
            spec = self._get("backbones", source)
            if not spec.has_model(model_name):
                hint = _did_you_mean(model_name, list(spec.list_models()))
                raise AutoftError(f"unknown backbone {name!r}{hint}")
            return spec, model_name
        # A bare name: timm first (the built-in default), then the other sources in load order.
        sources = sorted(self.backbones.values(), key=lambda r: r.spec.name != "timm")
        for registered in sources:
            if registered.spec.has_model(name):
                return registered.spec, name
        known: list[str] = []
        for registered in sources:
            prefix = "" if registered.spec.name == "timm" else f"{registered.spec.name}:"
            known.extend(prefix + m for m in registered.spec.list_models())
        raise AutoftError(f"unknown backbone {name!r}{_did_you_mean(name, known)}{self._broken_note()}")

    def dataset(self, source: str) -> tuple[DatasetSpec, str]:
        """Resolve ``FORMAT:SOURCE`` or a bare path to its dataset format and argument."""
        fmt, sep, rest = source.partition(":")
        # "C:\\data" is a path, not format "C".
        if sep and len(fmt) > 1 and (fmt in self.datasets or fmt in self.conflicts.get("datasets", {})):
            return self._get("datasets", fmt), rest
        if sep and len(fmt) > 1 and not Path(source).exists() and not fmt.startswith((".", "/", "~")):
            hint = _did_you_mean(fmt, self.datasets)
            raise AutoftError(f"unknown dataset format {fmt!r} in {source!r}{hint}{self._broken_note()}")
        if not Path(source).expanduser().exists():
            raise AutoftError(f"data not found: {source}")
        for registered in self.datasets.values():
            if registered.spec.detect is not None and registered.spec.detect(source):
                return registered.spec, source
        raise AutoftError(
            f"no dataset format recognises {source!r}; expected DIR/<class>/*, DIR/{{train,val,test}}/<class>/* "
            "or a CSV manifest (path,label)"
        )


    def describe_origin(self, item: Any, kind: str | None = None) -> str:
        """Name a registered spec (or a name) with where it comes from, for error messages:
        ``strategy 'lp-ft' from package acme-finetune 1.2 (entry point strategies)``."""
        kinds = [kind] if kind else [attr for attr, _ in KINDS.values()]
        name = item if isinstance(item, str) else getattr(item, "name", repr(item))
        for attr in kinds:
            registered = getattr(self, attr, {}).get(name)
            if registered is not None and (isinstance(item, str) or registered.spec is item or registered.spec == item):
                return f"{KIND_NAMES.get(attr, attr)} {name!r} from {registered.plugin.origin}"
            clash = self.conflicts.get(attr, {}).get(name)
            if clash:
                return f"{KIND_NAMES.get(attr, attr)} {name!r} from " + " and ".join(p.origin for p in clash)
        what = KIND_NAMES.get(kinds[0], kinds[0]) if len(kinds) == 1 else _kind_of(item)
        return f"{what} {name!r} (not registered by any loaded plugin)"


def _kind_of(item: Any) -> str:
    for attr, spec_type in KINDS.values():
        if isinstance(item, spec_type):
            return KIND_NAMES.get(attr, attr)
    return "plugin item"


def describe_origin(item: Any, kind: str | None = None, registry: Registry | None = None) -> str:
    """:meth:`Registry.describe_origin` on ``registry`` (default: the process-wide one).

    ``item`` is a spec (``StrategySpec`` ...) or a registered name; ``kind`` (``"strategies"``,
    ``"backbones"`` ...) narrows a bare name to one kind.
    """
    return (registry or build_registry(default_plugin_manager())).describe_origin(item, kind)


def _did_you_mean(name: str, choices: Any) -> str:
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
    for ep in sorted(_entry_points(), key=lambda ep: ep.dist.name != BUILTIN_DISTRIBUTION if ep.dist else True):
        dist = ep.dist.name if ep.dist else "?"
        if builtins_only and dist != BUILTIN_DISTRIBUTION:
            continue
        info = PluginInfo(name=ep.name, package=dist, version=ep.dist.version if ep.dist else "?")
        name = f"{dist}:{ep.name}"
        if pm.get_plugin(name) is not None or name in pm.autoft_info:
            continue  # the same distribution seen twice on sys.path
        try:
            register_plugin(pm, ep.load(), name)
        except Exception as exc:  # a broken plugin must not stop the others
            info.error = _one_line(exc, _module_roots(ep.module))
        pm.autoft_info[name] = info
    folder = plugins_dir or os.environ.get("AUTOFT_PLUGINS_DIR")
    pm.autoft_plugins_dir = str(Path(folder).resolve()) if folder else None  # for --jobs workers, which build their own
    if folder:
        load_plugins_dir(pm, Path(folder))
    return pm


def default_plugins_dir() -> str | None:
    """The plugins folder the process-wide manager loaded, or None."""
    return getattr(default_plugin_manager(), "autoft_plugins_dir", None)


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
            info.error = _one_line(exc, [path])
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
        hints = [f"{n}{_did_you_mean(n, known)}{_defined_at(getattr(plugin, n, None))}" for n in unknown]
        raise AttributeError(f"unknown hook {', '.join(hints)}")


def _defined_at(function: Any) -> str:
    code = getattr(function, "__code__", None)
    return f" at {code.co_filename}:{code.co_firstlineno}" if code else ""


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _one_line(exc: BaseException, plugin_files: Sequence[Path] = ()) -> str:
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


def _module_roots(module: str) -> list[Path]:
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


def build_registry(pm: pluggy.PluginManager) -> Registry:
    """Call every registration hook, one plugin at a time, and collect the specs.

    A plugin that raises in any hook (or registers the wrong type) is broken everywhere:
    nothing it registered is used, and it takes part in no conflict.
    """
    registry = Registry()
    for name, info in getattr(pm, "autoft_info", {}).items():
        registry.plugins[name] = info
    collected: list[tuple[str, Any, PluginInfo]] = []  # (kind, spec, plugin) in load order
    for hook_name, (kind, spec_type) in KINDS.items():
        # get_hookimpls() lists in registration order (pluggy *calls* them in reverse).
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            info = plugin_info(pm, impl.plugin_name)
            registry.plugins[impl.plugin_name] = info
            if info.broken:
                continue
            specs: list[Any] = []

            def register(spec: Any, _specs: list[Any] = specs, _hook: str = hook_name, _type: type = spec_type) -> None:
                if not isinstance(spec, _type):
                    raise TypeError(f"{_hook} expects {_type.__name__}, got {type(spec).__name__}")
                if any(s.name == spec.name for s in _specs):
                    raise ValueError(f"{_hook} registered {spec.name!r} twice")
                _specs.append(spec)

            # Only the arguments the implementation asks for, as pluggy itself would pass them.
            arguments = {"register": register}
            try:
                impl.function(**{a: arguments[a] for a in impl.argnames})
            except Exception as exc:
                info.error = _one_line(exc, [Path(impl.function.__code__.co_filename), *_module_roots(impl.function.__module__)])
                continue
            collected.extend((kind, spec, info) for spec in specs)
    owners: dict[tuple[str, str], list[Registered[Any]]] = {}
    for kind, spec, info in collected:
        if not info.broken:
            owners.setdefault((kind, spec.name), []).append(Registered(spec, info))
    for (kind, name), registered in owners.items():
        if len(registered) == 1:
            getattr(registry, kind)[name] = registered[0]
        else:
            registry.conflicts.setdefault(kind, {})[name] = [r.plugin for r in registered]
    return registry


_default_pm: pluggy.PluginManager | None = None


def default_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager the CLI and the Python API use."""
    global _default_pm
    if _default_pm is None:
        _default_pm = get_plugin_manager()
    return _default_pm


def set_default_plugin_manager(pm: pluggy.PluginManager | None) -> None:
    global _default_pm
    _default_pm = pm


def registry() -> Registry:
    return build_registry(default_plugin_manager())
