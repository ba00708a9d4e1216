"""``optimize`` and ``verify``: rewrite a model with the passes its diagnosis names, compile it, and prove
the result against the original; with the front doors that keep each codebase's calling convention.

The names below load ``graphfix.optimize.api`` on first use: it imports ``torch._dynamo`` (seconds), and
``import graphfix`` (which imports ``graphfix.optimize.verification``) must stay cheap.
"""

import importlib
from typing import Any

_API = ("META_PASSES", "OptimizeResult", "OptimizeWarning", "OptimizedState", "default_backend", "optimize")


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("graphfix.optimize.api"), name)


__all__ = list(_API)
