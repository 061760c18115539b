"""Contract tests for autoft plugins, to subclass in a plugin's own test suite.

In the manner of ``optuna.testing``: each class holds pytest tests that check one kind of
plugin against what autoft relies on. Subclass it in a ``test_*.py`` file, name the
thing under test, and pytest runs every check on it::

    from autoft.testing import BackboneContract

    class TestTinyNet(BackboneContract):
        backbone_name = "mynets:tiny"

To check several names at once, override the ``*_under_test`` fixture with params::

    class TestMyNets(BackboneContract):
        @pytest.fixture(params=["mynets:tiny", "mynets:small"])
        def backbone_under_test(self, request):
            return request.param

The checks look names up in the installed plugins (``autoft.plugins.registry()``). A
plugin that is not installed (a module in a test folder) overrides the ``registry``
fixture, as :func:`registry_with` shows.

Requires pytest (a test dependency of autoft plugins, not of autoft).
"""

from autoft.testing.backbones import BackboneContract
from autoft.testing.common import registry_with, synthetic_splits
from autoft.testing.datasets import DatasetContract
from autoft.testing.lifecycle import RegularizerContract, StrategyContract
from autoft.testing.metrics import MetricContract
from autoft.testing.pretrainers import PretrainerContract
from autoft.testing.weights import WeightsContract

__all__ = [
    "BackboneContract", "DatasetContract", "StrategyContract", "RegularizerContract", "MetricContract", "PretrainerContract",
    "WeightsContract", "registry_with", "synthetic_splits",
]  # fmt: skip
