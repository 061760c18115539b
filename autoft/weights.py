"""``--weights auto``: a source's pretrained weights when they can be had, random ones said out loud.

Decided before any image is decoded. A backbone source that can tell where its pretrained
weights live registers ``BackboneSpec.pretrained(model_name)``, returning
:class:`~autoft.specs.PretrainedWeights`: whether they are at hand (in a local cache, or
downloadable now) and where the source would read them. ``auto`` then uses them when
they are at hand; otherwise training starts from random weights with one line that says
so, names that location, and tells how to pass weights offline (``--weights PATH``).
An explicit ``--weights pretrained`` that cannot be had still fails at once.
"""

from __future__ import annotations

from autoft import plugins

AUTO = "auto"
SCRATCH = ("scratch", "none", "random", "")


def resolve_weights(weights: str | None, backbone: str, registry: plugins.Registry | None = None) -> tuple[str | None, str | None]:
    """(the weights to build with, a notice to print or None)."""
    if weights is None or weights in SCRATCH:
        return None, None
    if weights != AUTO:
        return weights, None
    registry = registry or plugins.registry()
    spec, model_name = registry.backbone(backbone)
    lookup = getattr(spec, "pretrained", None)
    if lookup is None:
        return None, f"training {backbone} from random weights: its source {spec.name!r} offers no pretrained weights; pass --weights PATH to start from a file"
    found = lookup(model_name)
    if found is not None and found.available:
        return "pretrained", None
    where = found.location if found is not None else "nowhere known"
    return None, (
        f"training {backbone} from random weights: no pretrained weights at hand (looked in {where}); "
        "to start from pretrained ones offline, download them elsewhere and pass --weights PATH"
    )
