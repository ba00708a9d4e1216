"""``QuantLinear`` and ``QuantEmbedding``: modules that hold packed weights and read them back in their forward.

The forward is plain PyTorch (dequantize, then ``F.linear``), so it traces with
``fullgraph=True`` on any backend and prefill runs as dequantize-then-GEMM. Decode
steps of 1 to 16 rows take the fused dequantizing kernels instead
(``graphfix.quant.kernels``), which ``LlamaDecoder`` calls through ``fused``.

The packed tensors are ``nn.Parameter`` objects without gradients (integer parameters are
allowed when they need no grad), not buffers: ``model.parameters()``, ``.to()``,
``state_dict`` and the engine's ``weight_bytes`` see them like the float weights they
replace. There is no ``weight`` attribute on purpose: code that would read a float weight
fails loudly instead of reading codes as numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graphfix.quant.scheme import Packed, QuantScheme, dequantize, quantize_weight


def _frozen(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t, requires_grad=False)


class QuantLinear(nn.Module):
    """A linear layer over packed weights (``graphfix.quant.scheme``); ``dtype`` is what it computes in."""

    method: str = "rtn"
    """How ``quantize`` chose the codes (``gptq``, ``mse``, ``rtn``; ``quant.gptq``): the format is the same."""

    def __init__(self, packed: Packed, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.scheme: QuantScheme = packed.scheme
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.dtype = dtype
        self.qweight = _frozen(packed.codes)
        self.scales = _frozen(packed.scales)
        self.zeros = _frozen(packed.zeros)
        self.bias = _frozen(bias)

    @classmethod
    def from_linear(cls, linear: nn.Module, scheme: QuantScheme) -> QuantLinear:
        w = linear.weight
        return cls(quantize_weight(w, scheme), linear.bias, w.dtype)

    def packed(self) -> Packed:
        return Packed(self.scheme, self.qweight, self.scales, self.zeros, self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.zeros, self.scheme.bits, dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def fused(self, x: torch.Tensor, *, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
              silu: bool = False, residual: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
        """``linear(prologue(x)) + epilogue`` as one dequantizing kernel where it applies (``quant.kernels``)."""
        from graphfix.quant.kernels import fused_quant_linear

        return fused_quant_linear(x, self, norm_weight=norm_weight, eps=eps, silu=silu, residual=residual, pdl=pdl)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}, " \
               f"bias={self.bias is not None}"


class QuantEmbedding(nn.Module):
    """An embedding table stored packed; a lookup dequantizes only the rows it gathers."""

    def __init__(self, packed: Packed, dtype: torch.dtype) -> None:
        super().__init__()
        self.scheme = packed.scheme
        self.num_embeddings, self.embedding_dim = packed.out_features, packed.in_features
        self.dtype = dtype
        self.qweight = _frozen(packed.codes)
        self.scales = _frozen(packed.scales)
        self.zeros = _frozen(packed.zeros)

    @classmethod
    def from_embedding(cls, emb: nn.Module, scheme: QuantScheme) -> QuantEmbedding:
        return cls(quantize_weight(emb.weight, scheme), emb.weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        zeros = None if self.zeros is None else self.zeros[ids]
        return dequantize(self.qweight[ids], self.scales[ids], zeros, self.scheme.bits, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme.name}"


def fuse_quant_linears(sources: list[QuantLinear]) -> QuantLinear:
    """One ``QuantLinear`` whose rows are the sources' rows in order (q/k/v -> wqkv, gate/up -> w13): packed rows
    concatenate as they are (every scheme packs along ``K``), so nothing is re-quantized."""
    first = sources[0]
    if any(s.scheme != first.scheme or s.in_features != first.in_features for s in sources):
        raise ValueError("fusing quantized linears needs one scheme and one input size")

    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(s, name) for s in sources]
        return None if parts[0] is None else torch.cat([p.detach() for p in parts])

    packed = Packed(first.scheme, cat("qweight"), cat("scales"), cat("zeros"), first.in_features)
    fused = QuantLinear(packed, cat("bias"), first.dtype)
    fused.method = first.method
    return fused

