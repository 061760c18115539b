"""``--weights auto``: pretrained weights when they can be had, random ones said out loud.

Decided before any image is decoded, in this order:

1. every weights plugin (``autoft_register_weights``, :class:`~autoft.specs.WeightsSpec`)
   that has weights for the backbone and says they are at hand, in load order;
2. the backbone source's own pretrained weights (``BackboneSpec.pretrained(model_name)``,
   returning :class:`~autoft.specs.PretrainedWeights`): in its local cache, or a download
   where the source can reach them now.

Either way one line says which weights the run starts from; when none can be had,
training starts from random weights and the line names where it looked and how to pass
weights offline (``--weights PATH``). An explicit ``--weights pretrained`` that cannot be
had still fails at once.

A weights plugin's choice is the string ``plugin:NAME`` (``plugin:NAME:TAG`` for a tag),
which pickles to ``--jobs`` workers and is stored in checkpoints like any other
``--weights`` value; :func:`autoft.model.backbones.build_backbone` loads it through
:func:`load_plugin_weights`, which checks the plugin's state dict tensor by tensor first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from autoft import plugins
from autoft.errors import AutoftError
from autoft.specs import PretrainedWeights, WeightsSpec

if TYPE_CHECKING:
    from autoft.specs import Backbone

AUTO = "auto"
SCRATCH = ("scratch", "none", "random", "")
PLUGIN_PREFIX = "plugin:"


def resolve_weights(weights: str | None, backbone: str, registry: plugins.Registry | None = None) -> tuple[str | None, str | None]:
    """(the weights to build with, the line that says which, or None when the user chose them)."""
    if weights is None or weights in SCRATCH:
        return None, None
    if weights != AUTO:
        return weights, None
    registry = registry or plugins.registry()
    looked = []
    for registered, provided in weights_plugins_for(backbone, registry):
        spec, found = registered.spec, where(registered, provided)
        if found.available:
            what = f"{spec.trained_on} weights" if spec.trained_on else "pretrained weights"
            return plugin_weights(spec.name), f"starting {backbone} from {what} of plugin {spec.name} ({found.location})"
        looked.append(f"plugin {spec.name}: {found.location}")
    source, model_name = registry.backbone(backbone)
    if source.pretrained is None:
        looked.append(f"its source {source.name!r} offers no pretrained weights")
        return None, f"training {backbone} from random weights: {'; '.join(looked)}; pass --weights PATH to start from a file"
    found = source.pretrained(model_name)
    if found is not None and found.available:
        how = f"downloading them to {found.location}" if found.download else found.location
        return "pretrained", f"starting {backbone} from the pretrained weights of its source {source.name} ({how})"
    looked.append(found.location if found is not None else "nowhere known")
    return None, (
        f"training {backbone} from random weights: no pretrained weights at hand (looked in {'; '.join(looked)}); "
        "to start from pretrained ones offline, download them elsewhere and pass --weights PATH"
    )


def plugin_weights(name: str, tag: str | None = None) -> str:
    """The ``--weights`` value that names weights plugin ``name`` (and one of its tags)."""
    return f"{PLUGIN_PREFIX}{name}" + (f":{tag}" if tag else "")


def parse_plugin_weights(weights: str | None) -> tuple[str, str | None] | None:
    """(plugin name, tag or None) for ``plugin:NAME[:TAG]``; None for any other weights."""
    if not weights or not weights.startswith(PLUGIN_PREFIX):
        return None
    name, _, tag = weights.removeprefix(PLUGIN_PREFIX).partition(":")
    if not name:
        raise AutoftError(f"--weights {weights}: name the weights plugin, as in plugin:lite; `autoft plugins` lists them")
    return name, tag or None


def weights_plugins_for(backbone: str, registry: plugins.Registry) -> list[tuple[plugins.Registered[WeightsSpec], str]]:
    """The weights plugins with weights for ``backbone``, in load order, each with the name
    it gives the backbone (``timm:resnet18`` and ``resnet18`` are one backbone)."""
    target = _identity(backbone, registry)
    found = []
    for registered in registry.weights.values():
        provided = next((name for name in registered.spec.backbones if _identity(name, registry) == target), None)
        if target is not None and provided is not None:
            found.append((registered, provided))
    return found


def _identity(backbone: str, registry: plugins.Registry) -> tuple[str, str] | None:
    try:
        source, model_name = registry.backbone(backbone)
    except AutoftError:  # a source that is not installed builds nothing here
        return None
    return source.name, model_name


def where(registered: plugins.Registered[WeightsSpec], backbone: str) -> PretrainedWeights:
    """The plugin's own answer; a plugin without ``where`` is taken to have its weights at hand."""
    spec = registered.spec
    if spec.where is None:
        return PretrainedWeights(True, registered.plugin.origin)
    try:
        found = spec.where(backbone)
    except Exception as exc:  # a plugin's bug must not stop a run that can start from other weights
        return PretrainedWeights(False, f"its where() raised {type(exc).__name__}: {exc}")
    if not isinstance(found, PretrainedWeights):
        return PretrainedWeights(False, f"its where() returned {type(found).__name__}, expected PretrainedWeights")
    return found


def load_plugin_weights(backbone: Backbone, name: str, weights: str, registry: plugins.Registry) -> None:
    """Load ``plugin:NAME[:TAG]`` into ``backbone`` (built as ``name``), or fail in one line
    naming the plugin; nothing is loaded unless every tensor fits."""
    source, tag = parse_plugin_weights(weights) or (weights, None)
    spec = registry.weights_source(source)
    origin = registry.describe_origin(spec, "weights")
    provided = next((p for r, p in weights_plugins_for(name, registry) if r.spec is spec), None)
    if provided is None:
        raise AutoftError(f"{origin} has no weights for backbone {name!r} (it has {', '.join(spec.backbones) or 'none'})")
    if tag is not None and tag not in spec.tags:
        raise AutoftError(f"{origin} has no weights tagged {tag!r} (its tags: {', '.join(spec.tags) or 'none'})")
    try:
        state = spec.load(provided, tag)
    except AutoftError as exc:
        raise AutoftError(f"{origin}: {exc}") from None
    except Exception as exc:
        raise AutoftError(f"{origin} failed to load weights for {name}: {type(exc).__name__}: {exc}") from None
    problem = mapping_problem(backbone, state)
    if problem:
        raise AutoftError(f"{origin} does not fit backbone {name}: {problem}; nothing was loaded")
    own = backbone.model.state_dict()
    backbone.model.load_state_dict({k: v for k, v in state.items() if v.shape == own[k].shape}, strict=False)


def mapping_problem(backbone: Backbone, state: Any) -> str | None:
    """The first tensor of ``state`` that does not fit ``backbone``, in the model's order, or None.

    Every tensor of the body must be there with the model's shape, and nothing else; the
    classifier's may be missing or have another width (a fresh head for the task's classes);
    BatchNorm's ``num_batches_tracked`` counters may be missing.
    """
    if not isinstance(state, Mapping) or not all(_is_tensor(v) for v in state.values()):
        return f"load() returned {type(state).__name__}, expected a dict of tensor names to tensors"
    own = backbone.model.state_dict()
    head_modules = {p.rpartition(".")[0] for p in backbone.head.params}
    problems = []
    for key, tensor in own.items():
        in_head = key.rpartition(".")[0] in head_modules
        if key not in state:
            if not in_head and not key.endswith("num_batches_tracked"):
                problems.append(f"tensor {key!r} {tuple(tensor.shape)} is missing")
        elif state[key].shape != tensor.shape and not in_head:
            problems.append(f"tensor {key!r} has shape {tuple(state[key].shape)}, the model's is {tuple(tensor.shape)}")
    problems += [f"tensor {key!r} is not in the model" for key in state if key not in own]
    if not problems:
        return None
    return problems[0] + (f" (and {len(problems) - 1} more mismatches)" if len(problems) > 1 else "")


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)
