"""autoft: automatic fine-tuning of image classifiers, extended through plugins.

The Python API mirrors the CLI; the CLI is a thin layer over it::

    import autoft
    result = autoft.train("test_resnet", "sample:digits", "runs/digits", epochs=5)
    print(result.metrics["val_accuracy"])
"""

import time as _time

_IMPORTED_AT = _time.monotonic()  # the first import of autoft: what the program's clock starts from, at the latest (core.runtime.process_started)

from importlib import import_module  # noqa: E402
from importlib.metadata import PackageNotFoundError, version  # noqa: E402

from autoft.errors import AutoftError  # noqa: E402
from autoft.hookspecs import hookimpl  # noqa: E402
from autoft.specs import API_VERSIONS, PLUGIN_API_VERSION  # noqa: E402

try:
    __version__ = version("autoft")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# Public API, imported on first use so that `import autoft` stays light (no torch import).
# The modules are named for the stage (training, searching) and the functions for the verb
# (train, search), so importing a submodule never shadows an API function.
_API = {
    "train": "autoft.training",
    "load_checkpoint": "autoft.model.checkpoints",
    "search": "autoft.searching",
    "pretrain": "autoft.training.pretraining",
    "export": "autoft.deploy.exporting",
}

# A plugin written for plugin API 2 requires ``autoft>=0.2`` in its metadata; a spec's
# ``api_version`` names the version of its kind's API (API_VERSIONS) it was written for.
__all__ = ["AutoftError", "hookimpl", "__version__", "PLUGIN_API_VERSION", "API_VERSIONS", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'autoft' has no attribute {name!r}")

