"""The hooks autoft plugins implement.

Every hook receives a ``register`` callback and calls it once per thing it provides,
in the manner of ``llm``'s ``register_models(register)``. The host decides what a
name clash means (see :mod:`autoft.plugins`).
"""

import pluggy

hookspec = pluggy.HookspecMarker("autoft")
hookimpl = pluggy.HookimplMarker("autoft")


@hookspec
def autoft_register_backbones(register):
    """Register backbone sources: ``register(BackboneSpec(...))``."""


@hookspec
def autoft_register_datasets(register):
    """Register dataset formats: ``register(DatasetSpec(...))``."""


@hookspec
def autoft_register_strategies(register):
    """Register fine-tuning strategies: ``register(StrategySpec(...))``."""


@hookspec
def autoft_register_pretrainers(register):
    """Register self-supervised pretraining methods: ``register(PretrainerSpec(...))``."""


@hookspec
def autoft_register_regularizers(register):
    """Register regularisers that combine with any strategy: ``register(RegularizerSpec(...))``."""


@hookspec
def autoft_register_metrics(register):
    """Register validation metrics: ``register(MetricSpec(...))``."""


@hookspec
def autoft_register_weights(register):
    """Register sources of pretrained weights for backbones: ``register(WeightsSpec(...))``."""
