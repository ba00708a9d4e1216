"""graphfix: make Llama-style models compile clean, then make them fast.

``graphfix.diagnose(model)``, ``graphfix.optimize(model)`` and ``graphfix.verify(result)`` are
functions; the modules of the same names are reached with import statements
(``from graphfix.optimize import default_backend``), not as attributes of the package.
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

_FUNCTIONS = frozenset({"diagnose", "optimize", "verify"})
"""Functions named like the submodule they live in."""


class _Package(types.ModuleType):
    """The ``graphfix`` package, whose ``diagnose``, ``optimize`` and ``verify`` stay the functions.

    Importing a submodule makes Python set it as an attribute of its package: the first
    ``from graphfix.optimize import ...`` anywhere would make ``graphfix.optimize`` the module
    and hide the function of the same name. Installed before the imports below, which load
    submodules of those names themselves.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FUNCTIONS and isinstance(value, types.ModuleType):
            return  # the submodule stays reachable through sys.modules and import statements
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

from graphfix.diagnose.diagnosis import diagnose
from graphfix.diagnose.findings import Category, Finding, Kind, Location
from graphfix.diagnose.report import Report
from graphfix.errors import GraphfixError
from graphfix.optimize.verification import VerificationError, VerifyResult, verify

if TYPE_CHECKING:
    from graphfix.optimize.api import OptimizeResult, optimize

__version__ = "0.1.0"

_LAZY = {"optimize": "graphfix.optimize.api", "OptimizeResult": "graphfix.optimize.api", "quantize": "graphfix.quant.api",
         "shard": "graphfix.engine.tp.api"}
"""Loaded on first use: ``graphfix.optimize.api`` imports ``torch._dynamo`` (seconds), ``import graphfix`` does not."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["Category", "Finding", "GraphfixError", "Kind", "Location", "OptimizeResult", "Report",
           "VerificationError", "VerifyResult", "__version__", "diagnose", "optimize", "quantize", "shard", "verify"]
