"""What every contract class shares: where names are looked up, and small synthetic data."""

from __future__ import annotations

import pytest
import torch

from autoft import plugins


def registry_with(*modules: object, builtins: bool = True) -> plugins.Registry:
    """A registry with ``modules`` registered as plugins (and the installed ones when ``builtins``).

    For testing a plugin that is not installed::

        @pytest.fixture
        def registry(self):
            return registry_with(my_plugin_module)
    """
    import pluggy

    if builtins:
        pm = plugins.get_plugin_manager()
    else:
        pm = pluggy.PluginManager("autoft")
        pm.add_hookspecs(plugins.hookspecs)
    for module in modules:
        plugins.register_plugin(pm, module, getattr(module, "__name__", type(module).__name__))
    return plugins.build_registry(pm)


def synthetic_splits(num_classes: int = 3, per_class: int = 8, image_size: int = 32, seed: int = 0):
    """Small labelled images whose class shows in their colour: enough for a training step."""
    from autoft.data import DataSplits, ImageTensors

    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    colours = torch.rand(num_classes, 3, 1, 1, generator=generator) * 200 + 28
    noise = torch.randn(len(labels), 3, image_size, image_size, generator=generator) * 20
    images = (colours[labels] + noise).clamp(0, 255).to(torch.uint8)
    val = torch.arange(len(labels)) % 4 == 0
    return DataSplits(
        train=ImageTensors(images[~val], labels[~val]),
        val=ImageTensors(images[val], labels[val]),
        test=None,
        classes=[f"class{i}" for i in range(num_classes)],
        image_size=image_size,
    )


class _Contract:
    @pytest.fixture
    def registry(self) -> plugins.Registry:
        """Where names are looked up: the installed plugins."""
        return plugins.registry()
