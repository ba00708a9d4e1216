"""``optimize(model, quantize=...)``: the weight-only quantization step and the parity it is verified against.

The reference stays the **unquantized** original (recorded before anything changes), so
``verify`` says how far the optimized model is from what the user had, not from an
intermediate. Quantization changes the numbers by design, so the tolerance cannot be the
dtype's rounding tolerance: right after quantizing, the quantized model runs the same loop
eagerly once, and its distance from the reference (max |logit error| over the logit scale)
is the *quantization error*. The compiled model must then be within the dtype's tolerance
plus ``MARGIN`` times that error, and greedy tokens are reported but not required (a
quantized model may choose another token where two were close). The parity summary says so.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

MARGIN = 2.0
"""Compiled kernels round differently from the eager quantized run: their difference adds to the quantization
error, and stays well below it (float32 compile parity is 1e-4 where int8 moves logits by about 1e-2)."""


@dataclasses.dataclass
class QuantizationInfo:
    scheme: str
    modules: int
    error: float
    """max |logit error| / logit scale of the eager quantized model against the unquantized reference."""
    tolerance: float

    def basis(self) -> str:
        return (f"tolerance derived from the {self.scheme} quantization error: the eager quantized model is "
                f"{self.error:.2e} from the unquantized original, so the dtype tolerance plus {MARGIN:g} x that")


def quantize_for_optimize(model: nn.Module, scheme: Any, runner: Any, reference: Any, prompt: torch.Tensor | None,
                          steps: int | None, dtype: torch.dtype) -> QuantizationInfo:
    """Quantize ``model`` in place and measure the quantization error against ``reference`` (see the docstring)."""
    from graphfix.optimize.verification import compare, default_tolerance, quiet
    from graphfix.quant import quantize

    report = quantize(model, scheme)
    with quiet(), torch.no_grad():
        trace = runner.run(model, prompt, steps)
    error = compare(reference, trace, float("inf"), dtype).relative_error
    return QuantizationInfo(report.scheme.name, len(report.quantized), error,
                            default_tolerance(dtype) + MARGIN * error)


def adjust_parity(parity: Any, info: QuantizationInfo | None) -> Any:
    """The parity of a quantized model: tokens reported, not required; the tolerance's basis in its summary."""
    if info is not None:
        parity.tokens_required = False
        parity.basis = info.basis()
    return parity
