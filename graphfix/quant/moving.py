"""Moving quantized linears into a ``LlamaDecoder`` (``engine.loading`` on a model ``quantize`` already swapped).

``from_hf``/``from_meta`` move float weights; on a quantized model the projections are
``QuantLinear`` modules, so the decoder takes the modules themselves (or their packed rows
concatenated, for the fused q/k/v and gate/up) instead of a ``weight``. The rules are the
float ones: without ``share`` the source keeps meta placeholders (the memory moves), with
``share`` it keeps working on views of the fused storage.
"""

from __future__ import annotations

import torch
from torch import nn

from graphfix.quant.linear import QuantLinear, fuse_quant_linears

PACKED = ("qweight", "scales", "zeros", "bias")


def is_quant(module: nn.Module) -> bool:
    return isinstance(module, QuantLinear)


def _leave(source: QuantLinear, fused: QuantLinear | None, start: int, share: bool) -> None:
    """The source after the move: views of ``fused`` rows ``start..`` (``share``), or meta placeholders."""
    n = source.out_features
    for name in PACKED:
        t = getattr(source, name)
        if t is None:
            continue
        if share and fused is not None:
            new = getattr(fused, name).detach()[start:start + n]
        elif share:
            continue
        else:
            new = torch.empty_like(t, device="meta")
        setattr(source, name, nn.Parameter(new, requires_grad=False))


def take(source: QuantLinear, share: bool) -> QuantLinear:
    """A module holding ``source``'s packed tensors (the same storage)."""
    moved = QuantLinear(source.packed(), source.bias, source.dtype)
    if not share:
        _leave(source, None, 0, False)
    return moved


def fuse(sources: list[QuantLinear], share: bool) -> QuantLinear:
    """The sources' rows in one module (a copy of the packed bytes, as float fusing copies)."""
    fused = fuse_quant_linears(sources)
    start = 0
    for src in sources:
        _leave(src, fused, start, share)
        start += src.out_features
    return fused
