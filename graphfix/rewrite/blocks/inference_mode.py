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

from graphfix.rewrite.grad_modes import grad_mode_decorator_of, without_grad_mode_decorators

__all__ = ["core_callable", "forward_outside_inference_mode", "grad_mode_decorator_of", "inference_mode_of",
           "move_outside", "without_grad_mode_decorators"]

def inference_mode_of(fn: Any) -> tuple[bool, Callable] | None:
    """``(mode, undecorated function)`` if ``fn`` is ``torch.inference_mode(mode)(f)``, else ``None``."""
    found = grad_mode_decorator_of(fn)
    if found is None or not isinstance(found[0], torch.inference_mode):
        return None
    return bool(found[0].mode), found[1]


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
