"""autoft: automatic fine-tuning of image classifiers, extended through plugins.

The Python API mirrors the CLI; the CLI is a thin layer over it::

    import autoft
    result = autoft.train("test_resnet", "sample:digits", "runs/digits", epochs=5)
    print(result.metrics["val_accuracy"])
"""

import sys
import types
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

from autoft.errors import AutoftError
from autoft.hookspecs import hookimpl

try:
    __version__ = version("autoft")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# Public API, imported on first use so that `import autoft` stays light (no torch import).
_API = {
    "train": "autoft.training",
    "load_checkpoint": "autoft.training",
    "search": "autoft.search",
    "pretrain": "autoft.pretraining",
    "export": "autoft.export",
}

__all__ = ["AutoftError", "hookimpl", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'autoft' has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """A submodule named like the API function it holds (``autoft.search``), called as that function."""

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):
    """Importing ``autoft.search`` or ``autoft.export`` binds the *module* to that attribute
    of ``autoft``, shadowing the API function of the same name. Making such a module
    callable keeps ``autoft.search(...)`` working however the imports happened, and
    ``autoft.search.SearchSpace`` too."""

    def __setattr__(self, name, value):
        if name in _API and type(value) is types.ModuleType and value.__name__ == f"{__name__}.{name}":
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
