"""Grad-mode decorators recognised exactly, and the root forward's inference mode moved out of the compiled region.

Dynamo traces an ``inference_mode`` context manager into the graph, and with
``aot_eager``/``inductor`` that fails as soon as a view is updated in place ("Cannot set
version_counter for inference tensor", an upstream bug). Entering inference mode *around*
the compiled call works. So a root forward whose whole body runs in inference mode is split
into an eager wrapper that enters it (its code is skipped by Dynamo,
``torch._dynamo.decorators.skip``: that one frame runs eagerly, and the frames it calls are
still compiled) and a core without it. The sites inside the step are the ``inference-mode``
pass's (``passes/_mode_sites.py``).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._dynamo.decorators import skip as skip_frame

_DECORATED_CODE = torch.inference_mode()(lambda: None).__code__
"""The code object of ``torch.utils._contextlib.context_decorator``'s wrapper (shared by every grad-mode decorator)."""

GRAD_MODE_CLASSES = (torch.inference_mode, torch.no_grad, torch.enable_grad, torch.set_grad_enabled)
"""The context managers whose decorator form graphfix sees through (all switch autograd state only)."""


def grad_mode_decorator_of(fn: Any) -> tuple[Any, Callable] | None:
    """``(context manager, wrapped function)`` if ``fn`` is ``torch.<grad mode>(...)(f)``, else ``None``.

    Matched by the wrapper's code object and its closure (``ctx_factory`` is the
    bound ``clone`` of a grad-mode context manager instance), not by names.
    """
    fn = getattr(fn, "__func__", fn)
    if getattr(fn, "__code__", None) is not _DECORATED_CODE or not fn.__closure__:
        return None
    cells = dict(zip(fn.__code__.co_freevars, fn.__closure__))
    if "ctx_factory" not in cells or "func" not in cells:
        return None
    ctx = getattr(cells["ctx_factory"].cell_contents, "__self__", None)
    if not isinstance(ctx, GRAD_MODE_CLASSES):
        return None
    return ctx, cells["func"].cell_contents


def inference_mode_of(fn: Any) -> tuple[bool, Callable] | None:
    """``(mode, undecorated function)`` if ``fn`` is ``torch.inference_mode(mode)(f)``, else ``None``."""
    found = grad_mode_decorator_of(fn)
    if found is None or not isinstance(found[0], torch.inference_mode):
        return None
    return bool(found[0].mode), found[1]


def without_grad_mode_decorators(fn: types.FunctionType) -> types.FunctionType:
    """The plain function under any stack of grad-mode decorators (``fn`` itself when it has none).

    Its source still shows the decorators (``inspect`` reads from the first one), so a source
    transform sees them and can turn them into ``with`` blocks.
    """
    found = grad_mode_decorator_of(fn)
    while found is not None and isinstance(found[1], types.FunctionType):
        fn = found[1]
        found = grad_mode_decorator_of(fn)
    return fn


def core_callable(model: nn.Module) -> Callable:
    """What the eager wrapper calls: the compiled core optimize set, else the plain core."""
    compiled = getattr(model, "graphfix_core_fn", None)
    return compiled if compiled is not None else model.graphfix_forward_core


@skip_frame
def forward_outside_inference_mode(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The eager wrapper installed as ``forward``: inference mode around the (compiled) core."""
    with torch.inference_mode(self.graphfix_inference_mode_enabled):
        return core_callable(self)(*args, **kwargs)


def move_outside(model: nn.Module, mode: bool, undecorated: Callable) -> None:
    """Install the split on ``model``: ``graphfix_forward_core`` (undecorated, bound) and the wrapper."""
    model.graphfix_forward_core = types.MethodType(undecorated, model)
    model.graphfix_inference_mode = "outside"
    model.graphfix_inference_mode_enabled = mode
    model.forward = types.MethodType(forward_outside_inference_mode, model)
