"""Functions with code objects of their own, so that Dynamo compiles them apart."""

from __future__ import annotations

import types


def own_code(fn: types.FunctionType) -> types.FunctionType:
    """A copy of ``fn`` that runs the same code from a code object of its own.

    Dynamo keeps its compiled graphs, guards and recompile limit (``recompile_limit``,
    8 entries) per *code object*, not per function object or model. Two models (or a
    prefill and a decode callable, or two batch sizes) that compile the same function
    would share one cache: each would evict or recompile the other's graphs, and together
    they would hit the limit, after which Dynamo runs the function eagerly. A copy with its
    own code object gets a cache of its own, and the graphs it compiled can be counted from
    that code object (``torch._dynamo.eval_frame._debug_get_cache_entry_list(copy.__code__)``).

    The copy shares ``fn``'s globals, closure and defaults, and keeps its name, qualified
    name, docstring and module.
    """
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = dict(fn.__kwdefaults__) if fn.__kwdefaults__ else None
    copy.__qualname__, copy.__doc__, copy.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    return copy


__all__ = ["own_code"]
