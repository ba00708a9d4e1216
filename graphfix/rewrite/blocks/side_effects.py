"""Scoped registration of logging functions Dynamo may reorder after the graph.

``torch._dynamo.config.reorderable_logging_functions`` lets Dynamo trace a call to
``print``, a ``logging`` module function or ``warnings.warn`` without a graph break:
the call is recorded and run after the graph, with the same arguments. It is a
global setting, so graphfix never sets it for good: the ``side-effects`` pass
records on the model which functions it needs, and ``reorder_logging(model)``
registers them for the duration of a ``with`` block (enter it around compilation
*and* calls: a recompile outside it would break again).

Behaviour changes, documented in docs/passes.md: the output comes after the
graph's computation (order), a tensor argument prints its value at the end of the
graph, and a warning is attributed to the ``def`` line of the function. Measured
on torch 2.13: a reorderable call inside an *inlined* frame (a submodule's forward,
a helper) is dropped silently, so the pass only registers calls in the root
forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch._dynamo.config as dynamo_config
from torch import nn

ATTR = "graphfix_reorderable_logging"
"""The model attribute where the ``side-effects`` pass records the functions to register."""


def required_functions(model: nn.Module | None) -> set[Callable]:
    """The logging functions ``model`` needs registered (empty if the pass did not run)."""
    return set(getattr(model, ATTR, set())) if model is not None else set()


@contextlib.contextmanager
def reorder_logging(model: nn.Module | None = None, functions: Iterable[Callable] = ()) -> Iterator[None]:
    """Register ``model``'s recorded logging functions (plus ``functions``) with Dynamo inside the block."""
    with dynamo_config.patch(**config_for(model, functions)):
        yield


@torch._dynamo.disable  # called from graphfix's eager routing frames, around which Dynamo's callback may be on
def config_for(model: nn.Module | None = None, functions: Iterable[Callable] = (), **extra: object) -> dict:
    """The Dynamo config a compiled call of ``model`` needs: its logging functions registered, plus ``extra``."""
    wanted = required_functions(model) | set(functions)
    config = dict(extra)
    if wanted:
        config["reorderable_logging_functions"] = set(dynamo_config.reorderable_logging_functions) | wanted
    return config
