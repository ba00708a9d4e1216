"""Verify steps' linears through graphfix's skinny-GEMM kernel instead of cuBLAS (opt-in, measured on the GPU).

A verify step of ``k + 1`` tokens at batch 1 multiplies 2 to 9 rows by every weight: the same
shape as a batched decode step, which ``kernels.fused_linear`` serves with ``_rows_kernel``
(each weight tile streamed once for all rows). The decoder's standard path (any step of more
than one token) calls its ``nn.Linear`` modules, i.e. cuBLAS, whose small-M GEMMs read the
weights less efficiently than the decode kernels do. ``use_rows_kernel`` switches those modules
to ``RowsLinear`` in place (the same parameters; ``undo_rows_kernel`` reverts): 1 to
``kernels.MAX_ROWS`` rows on CUDA go to ``fused_linear``, anything else stays ``F.linear``.
One-token decode steps with the decode kernels on never call the modules, so they are unchanged.
``benchmarks/bench_speculative.py --gpu`` measures the verify step both ways.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graphfix.engine.kernels import MAX_ROWS, GemvLinear, fused_linear, triton_gemv_applies


class RowsLinear(nn.Linear):
    """``nn.Linear`` whose 1 to ``MAX_ROWS``-row CUDA calls run ``kernels.fused_linear`` (the skinny GEMM)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton_gemv_applies(x, self.weight, MAX_ROWS):
            return fused_linear(x, self.weight, bias=self.bias)
        return F.linear(x, self.weight, self.bias)


def use_rows_kernel(model: nn.Module) -> int:
    """Switch ``model``'s ``nn.Linear`` (and ``GemvLinear``) modules to ``RowsLinear`` in place; returns how many."""
    return _swap_class(model, (nn.Linear, GemvLinear), RowsLinear)


def undo_rows_kernel(model: nn.Module) -> int:
    """``RowsLinear`` modules back to ``nn.Linear``; returns how many."""
    return _swap_class(model, (RowsLinear,), nn.Linear)


def _swap_class(model: nn.Module, sources: tuple[type, ...], target: type) -> int:
    """Same modules and parameters, another ``forward``: the class of each module of exactly a ``sources`` type."""
    swapped = [m for m in model.modules() if type(m) in sources]
    for module in swapped:
        module.__class__ = target
    return len(swapped)
