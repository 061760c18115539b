"""The validation metric contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoft.testing.common import _Contract, synthetic_splits


class MetricContract(_Contract):
    """What autoft relies on in a validation metric: set ``metric_name``."""

    metric_name: str = ""

    @pytest.fixture
    def metric_under_test(self) -> str:
        if not self.metric_name:
            raise AssertionError(f"{type(self).__name__} must set metric_name or override metric_under_test")
        return self.metric_name

    def predictions(self, quality: str) -> tuple[np.ndarray, np.ndarray]:
        labels = np.random.default_rng(0).integers(0, 10, 60)
        if quality == "uniform":
            return labels, np.full((60, 10), 0.1)
        probabilities = np.full((60, 10), 0.01)
        probabilities[np.arange(60), labels] = 0.91
        return labels, probabilities

    def test_perfect_predictions_beat_uniform_ones(self, metric_under_test, registry):
        from autoft.model.metrics import is_better, score

        spec = registry.metric(metric_under_test)
        perfect, uniform = score(spec, *self.predictions("perfect"), registry), score(spec, *self.predictions("uniform"), registry)
        direction = "higher" if spec.greater_is_better else "lower"
        assert is_better(spec, perfect, uniform), f"perfect predictions scored {perfect}, uniform ones {uniform}; greater_is_better says {direction} is better"

    def test_a_class_missing_from_the_labels_still_scores(self, metric_under_test, registry):
        from autoft.model.metrics import score

        labels, probabilities = self.predictions("perfect")
        labels = np.where(labels == 9, 0, labels)  # a small validation split may miss a class
        assert np.isfinite(score(registry.metric(metric_under_test), labels, probabilities, registry))

    def test_selects_the_best_epoch_in_training(self, metric_under_test, registry):
        from autoft.model.backbones import build_backbone
        from autoft.training.trainer import Trainer, TrainerConfig

        torch.manual_seed(0)
        backbone = build_backbone("test_resnet", num_classes=3, registry=registry)
        result = Trainer(backbone, synthetic_splits(), {"strategy": "full"}, TrainerConfig(epochs=2, batch_size=8, device="cpu", metric=metric_under_test), registry=registry).fit()
        assert all(np.isfinite(r[f"val_{metric_under_test}"]) for r in result.history)
