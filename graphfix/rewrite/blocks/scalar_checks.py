"""Tensor forms of ``.item()``-driven checks and branches, as the ``side-effects`` pass writes them.

``if x.abs().max().item() > 1e4: ...`` copies a value to the host: a sync, and a
graph break under Dynamo. The pass rewrites such a condition over the tensor
itself, with ``scalar(t)`` in place of ``t.item()``, so the condition stays on the
device: a check becomes ``torch._assert_async(condition, message)`` and a branch
that only assigns tensors becomes ``select(condition, new, old)``.

``scalar`` compares in float64 because that is what ``.item()`` does: a float32
value becomes a Python float (a double) and is compared with a Python number in
double precision; comparing in float32 would round the number to float32 first
and could flip ``0.1``-style comparisons. (MPS has no float64, so there it stays
in float32.) Integers are exact in float64 up to 2**53.
"""

from __future__ import annotations

import torch
from torch import Tensor


def scalar(value: Tensor) -> Tensor:
    """``value.item()`` kept as a 0-dim tensor on its device: bool stays bool, other values become float64."""
    value = value.reshape(())
    if value.dtype == torch.bool:
        return value
    if value.is_complex():
        return value.to(torch.complex128)
    return value.to(torch.float32 if value.device.type == "mps" else torch.float64)


def select(condition: Tensor, new: object, old: object) -> object:
    """``new if condition else old`` without a host sync, when ``torch.where`` gives exactly that.

    ``torch.where`` would broadcast or promote two tensors that differ in shape or
    dtype (and fails across devices), so then, and for non-tensors, this falls back
    to the Python branch: the original behaviour, sync and graph break included.
    Under Dynamo the test is decided at trace time (shapes, dtypes and devices are
    static or guarded), so the fast path costs nothing.
    """
    if (isinstance(new, Tensor) and isinstance(old, Tensor) and new.shape == old.shape
            and new.dtype == old.dtype and new.device == old.device):
        return torch.where(condition, new, old)
    return new if bool(condition) else old
