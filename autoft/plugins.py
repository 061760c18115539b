"""The registry of what plugins provide (loading them is :mod:`autoft.plugin_loading`).

Built-in plugins (``autoft_plugins``) and third-party ones load the same way: through
the ``autoft`` entry-point group. A plugin that fails to import, or raises in a hook,
is recorded as broken and skipped; the others load. Two plugins registering one name
make that name unusable, with an error naming both packages, while everything else
keeps working (a default search leaves such a name out, with a warning).

Environment:

- ``AUTOFT_DISABLE_PLUGIN_AUTOLOAD=1`` loads only the built-in plugins.
- ``AUTOFT_DISABLE_PLUGINS=acme-autoft,other:strategies`` loads neither the distributions
  named nor the single entry points named as ``DISTRIBUTION:ENTRY_POINT``.
- ``AUTOFT_PLUGINS_DIR=DIR`` (or the CLI's ``--plugins-dir``) also loads every ``*.py``
  module in ``DIR`` as a plugin, without packaging.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Sequence, TypeVar

import pluggy

from autoft import hookspecs  # noqa: F401 - plugins.hookspecs, as autoft.testing uses it
from autoft.errors import AutoftError
from autoft.plugin_loading import (  # noqa: F401 - re-exported: loading is part of this module's API
    BUILTIN_DISTRIBUTION, ENTRY_POINT_GROUP, LOCAL_VERSION, PluginInfo, did_you_mean, get_plugin_manager, load_plugins_dir,
    module_roots, one_line, plugin_info, register_plugin,
)  # fmt: skip
from autoft.specs import BackboneSpec, DatasetSpec, MetricSpec, PretrainerSpec, RegularizerSpec, StrategySpec, WeightsSpec

SpecT = TypeVar("SpecT")

# hook name -> (registry attribute, the spec type it must register)
KINDS: dict[str, tuple[str, type]] = {
    "autoft_register_backbones": ("backbones", BackboneSpec),
    "autoft_register_datasets": ("datasets", DatasetSpec),
    "autoft_register_strategies": ("strategies", StrategySpec),
    "autoft_register_pretrainers": ("pretrainers", PretrainerSpec),
    "autoft_register_regularizers": ("regularizers", RegularizerSpec),
    "autoft_register_metrics": ("metrics", MetricSpec),
    "autoft_register_weights": ("weights", WeightsSpec),
}

# registry attribute -> what the user calls one of its entries, in messages
KIND_NAMES: dict[str, str] = {
    "backbones": "backbone source",
    "datasets": "dataset format",
    "strategies": "strategy",
    "pretrainers": "pretraining method",
    "regularizers": "regulariser",
    "metrics": "metric",
    "weights": "weights source",
}


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
    weights: dict[str, Registered[WeightsSpec]] = field(default_factory=dict)
    # kind -> name -> every plugin that registered it, when more than one did
    conflicts: dict[str, dict[str, list[PluginInfo]]] = field(default_factory=dict)

    # -- lookups ------------------------------------------------------------

    def _get(self, kind: str, name: str) -> Any:
        what = KIND_NAMES.get(kind, kind)
        clash = self.conflicts.get(kind, {}).get(name)
        if clash:
            raise AutoftError(f"{what} {name!r} is registered by both {_owners(clash)}; uninstall or disable one of them{_disable_hint(clash)}")
        table: dict[str, Registered[Any]] = getattr(self, kind)
        if name not in table:
            hint = did_you_mean(name, table)
            raise AutoftError(f"unknown {what} {name!r}{hint}; run `autoft plugins` to list them{self._broken_note()}")
        return table[name].spec

    def without_clashes(self, kind: str, names: Sequence[str]) -> tuple[str, ...]:
        """``names`` (a default list) less those two plugins registered, each left out with one warning.

        Asked for by name, such a name fails with the clash error; a default list goes on without it.
        """
        what = KIND_NAMES.get(kind, kind)
        kept = []
        for name in names:
            clash = self.conflicts.get(kind, {}).get(name)
            if clash:
                warnings.warn(f"{what} {name!r} is registered by both {_owners(clash)}: left out of the default search{_disable_hint(clash)}", stacklevel=2)
            else:
                kept.append(name)
        if names and not kept:
            self._get(kind, names[0])  # nothing left to search: the clash is the error
        return tuple(kept)

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

    def weights_source(self, name: str) -> WeightsSpec:
        return self._get("weights", name)

    def backbone(self, name: str) -> tuple[BackboneSpec, str]:
        """Resolve ``SOURCE:MODEL`` or a bare model name to its source and model name."""
        source, sep, model_name = name.partition(":")
        if sep and (source in self.backbones or source in self.conflicts.get("backbones", {})):
            spec = self._get("backbones", source)
            if not spec.has_model(model_name):
                hint = did_you_mean(model_name, list(spec.list_models()))
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
        raise AutoftError(f"unknown backbone {name!r}{did_you_mean(name, known)}{self._broken_note()}")

    def dataset(self, source: str) -> tuple[DatasetSpec, str]:
        """Resolve ``FORMAT:SOURCE`` or a bare path to its dataset format and argument."""
        fmt, sep, rest = source.partition(":")
        # "C:\\data" is a path, not format "C".
        if sep and len(fmt) > 1 and (fmt in self.datasets or fmt in self.conflicts.get("datasets", {})):
            return self._get("datasets", fmt), rest
        if sep and len(fmt) > 1 and not Path(source).exists() and not fmt.startswith((".", "/", "~")):
            hint = did_you_mean(fmt, self.datasets)
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


def plugin_label(registry: Registry | None, kind: str, name: str) -> str:
    """``strategy 'lp-ft' (autoft 0.1.0)``: what a message needs to send the user to the right package."""
    what = {"strategies": "strategy", "regularizers": "regularizer", "metrics": "metric", "pretrainers": "pretraining method"}[kind]
    registered = getattr(registry, kind, {}).get(name) if registry is not None else None
    if registered is None:
        return f"{what} {name!r}"
    info = registered.plugin
    if info.version == LOCAL_VERSION:  # a module of a plugins folder
        return f"{what} {name!r} ({info.name}.py in {info.package})"
    return f"{what} {name!r} ({info.package} {info.version})".replace(" )", ")")


def _owners(clash: Sequence[PluginInfo]) -> str:
    """``autoft 0.2.0 and acme-old 0.3 (entry point strategies)``: each distribution with its version."""
    return " and ".join(f"{p.package} {p.version} (entry point {p.name})".replace("  ", " ") if p.version != LOCAL_VERSION else p.origin for p in clash)


def _disable_hint(clash: Sequence[PluginInfo]) -> str:
    others = [p for p in clash if p.package != BUILTIN_DISTRIBUTION and p.version not in (LOCAL_VERSION, "")]
    return f" (AUTOFT_DISABLE_PLUGINS={others[0].package} turns one off)" if others else ""


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
                info.error = one_line(exc, [Path(impl.function.__code__.co_filename), *module_roots(impl.function.__module__)])
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


def default_plugins_dir() -> str | None:
    """The plugins folder the process-wide manager loaded (``--plugins-dir``), or None: what ``--jobs`` workers load too."""
    return getattr(default_plugin_manager(), "autoft_plugins_dir", None)


def set_default_plugin_manager(pm: pluggy.PluginManager | None) -> None:
    global _default_pm
    _default_pm = pm


def registry() -> Registry:
    return build_registry(default_plugin_manager())
