"""Validation metrics, looked up in the plugin registry (``autoft_register_metrics``)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from autoft import plugins
from autoft.data import DataSplits, ImageTensors, to_float
from autoft.lifecycle import PluginError, describe_value, plugin_label, source_files
from autoft.plugin_loading import one_line
from autoft.core.runtime import autocast, layout
from autoft.specs import MetricSpec

# Always recorded per epoch, whatever metric a run selects on.
STANDARD_METRICS = ("accuracy", "f1_macro")


def metric_specs(selected: str, registry: plugins.Registry) -> list[MetricSpec]:
    """The selected metric's spec first (an AutoftError when it is unknown), then the standard ones."""
    names = dict.fromkeys([selected, *STANDARD_METRICS])
    return [registry.metric(name) for name in names]


def is_better(spec: MetricSpec, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if spec.greater_is_better else value < best


def score(spec: MetricSpec, labels: np.ndarray, probabilities: np.ndarray, registry: plugins.Registry | None = None) -> float:
    """The metric's value, checked at the plugin boundary."""
    try:
        value = spec.compute(labels, probabilities)
    except Exception as exc:  # named at the innermost line of the plugin's own code
        raise PluginError(f"{plugin_label(registry, 'metrics', spec.name)}: compute() raised {one_line(exc, source_files(spec.compute))}", kind="metrics", name=spec.name) from exc
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise PluginError(f"{plugin_label(registry, 'metrics', spec.name)}: compute() returned {describe_value(value)}; expected a finite float", kind="metrics", name=spec.name)
    return float(value)


@torch.inference_mode()
def evaluate(
    net: torch.nn.Module, data: ImageTensors, device: torch.device, batch_size: int, metrics: Sequence[MetricSpec], registry: plugins.Registry | None = None
) -> dict[str, Any]:
    """Loss, each metric, predictions and probabilities of ``net`` (normalisation included) on ``data``;
    ``registry`` names a metric's plugin when it fails."""
    specs = list(metrics)
    net.eval()
    logits = []
    for images, _ in data.iter_batches(batch_size=batch_size, pin_memory=data.on_disk and device.type == "cuda"):
        x = to_float(images, device)
        with autocast(device):
            logits.append(net(layout(x, device)).float().cpu())
    out = torch.cat(logits)
    probabilities = out.softmax(1)
    labels = data.labels
    result: dict[str, Any] = {"loss": F.cross_entropy(out, labels).item()}
    for spec in specs:
        result[spec.name] = score(spec, labels.numpy(), probabilities.numpy(), registry)
    result["predictions"] = out.argmax(1)
    result["probabilities"] = probabilities
    return result


def test_metrics(net: torch.nn.Module, data: DataSplits, device: torch.device, batch_size: int, metrics: Sequence[MetricSpec]) -> dict[str, float]:
    """``test_loss`` and ``test_<metric>`` on the test split, when there is one."""
    if data.test is None or len(data.test) == 0:
        return {}
    result = evaluate(net, data.test, device, batch_size, metrics)
    return {f"test_{k}": v for k, v in result.items() if isinstance(v, float)}


test_metrics.__test__ = False  # not a pytest test, whatever its name
