"""``optimize(model, quantize=...)``: the weight-only quantization step and the parity it is verified against.

The reference stays the **unquantized** original (recorded before anything changes), so
``verify`` says how far the optimized model is from what the user had, not from an
intermediate. Quantization changes the numbers by design, so the dtype's rounding cannot be
the yardstick: right after quantizing, the quantized model runs the same loop eagerly once.
That run takes the place of "the original in its dtype" in the parity check
(``optimize.parity``): ``e_orig`` becomes the eager quantized model's error against the
*unquantized* high-precision run, i.e. the quantization error, and the compiled model passes
when ``e_opt <= multiplier * e_orig + floor``, its greedy tokens checked only where the
reference's top-2 margin is wider than that error could move it. Without a high-precision run
(the fixed rule), the tolerance is the dtype's plus ``MARGIN`` times the measured error
(max |logit error| over the logit scale) and greedy tokens are reported, not required. The
parity summary says which.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

MARGIN = 2.0
"""The fixed rule's multiple of the quantization error (the reference method's multiplier plays this part there)."""


@dataclasses.dataclass
class QuantizationInfo:
    scheme: str
    modules: int
    error: float
    """max |logit error| / logit scale of the eager quantized model against the unquantized reference."""
    tolerance: float
    """The fixed rule's tolerance: the dtype's plus ``MARGIN`` x ``error``."""
    trace: Any = None
    """The eager quantized model's run (``verification.Trace``): the original's part in the reference method."""
    method: str = "rtn"
    """How the codes were chosen (``QuantizeReport.method``/``calibration``: gptq and its tokens, or the fallback)."""

    def basis(self) -> str:
        return (f"the {self.scheme} model ({self.method}) is checked against the unquantized original with its quantization error as "
                f"the allowance: the eager {self.scheme} model stands for the original in its dtype "
                f"(max |logit error| {self.error:.2e} of the logit scale from the unquantized run)")


def quantize_for_optimize(model: nn.Module, scheme: Any, runner: Any, reference: Any, prompt: torch.Tensor | None,
                          steps: int | None, dtype: torch.dtype,
                          progress: Callable[[str], None] | None = None) -> QuantizationInfo:
    """Quantize ``model`` in place and run it eagerly once through ``runner`` (see the module docstring)."""
    from graphfix.optimize.parity import compare, default_tolerance
    from graphfix.optimize.verification import quiet
    from graphfix.quant import quantize

    report = quantize(model, scheme, progress=progress)
    with quiet(), torch.no_grad():
        trace = runner.run(model, prompt, steps)
    error = compare(reference, trace, dtype, tolerance=math.inf).relative_error
    how = report.method + (f": {report.calibration}" if report.calibration else "")
    return QuantizationInfo(report.scheme.name, len(report.quantized), error,
                            default_tolerance(dtype) + MARGIN * error, trace, how)


def quantized_original(info: QuantizationInfo | None, reference: Any, high: Any, options: dict[str, Any],
                       shorten: Callable[[Any], Any]) -> tuple[Any, dict[str, Any]]:
    """The run that plays "the original in its dtype" in ``parity.compare``, and the options to compare with."""
    if info is None:
        return reference, options
    if high is None:  # the fixed rule: against the unquantized run, with the error's tolerance
        return reference, {"tolerance": info.tolerance, **options}
    # a quantization error is not an unreproducible original: no ceiling on e_orig
    return shorten(info.trace), {"max_original_error": math.inf, **options}


def adjust_parity(parity: Any, info: QuantizationInfo | None) -> Any:
    """The parity of a quantized model: the allowance's basis in its summary; the fixed rule reports tokens only."""
    if info is not None:
        if parity.method != "reference":
            parity.tokens_required = False
        parity.basis = info.basis()
    return parity
