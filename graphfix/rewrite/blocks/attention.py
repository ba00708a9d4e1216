"""Attention kernels on ``(batch, heads, seqlen, head_dim)`` tensors, with grouped KV heads.

``sdpa`` is the fused path (``F.scaled_dot_product_attention`` with native GQA);
``manual_attention`` is Meta's reference arithmetic (matmul, float32 softmax,
matmul) kept for parity when the ``sdpa-attention`` pass is not applied.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")
"""Whether this torch's SDPA takes ``enable_gqa`` (torch >= 2.5)."""


def repeat_kv_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``(b, n_kv, s, d) -> (b, n_kv * n_rep, s, d)``; KV head ``j`` serves query heads ``j*n_rep ..``."""
    if n_rep == 1:
        return x
    b, n_kv, s, d = x.shape
    return x[:, :, None].expand(b, n_kv, n_rep, s, d).reshape(b, n_kv * n_rep, s, d)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with ``q`` having a multiple of ``k``'s heads.

    ``mask``: boolean (True = attend) or additive float, broadcasting to
    ``(b, heads, q_len, kv_len)``; ``None`` attends everywhere.
    """
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1 and SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    k, v = repeat_kv_heads(k, n_rep), repeat_kv_heads(v, n_rep)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Meta's ``Attention.forward`` arithmetic: ``softmax(q k^T / sqrt(d) + mask)`` in float32, times ``v``."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv_heads(k, n_rep), repeat_kv_heads(v, n_rep)
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
    mask = _additive(mask, scores.dtype)
    if mask is not None:
        scores = scores + mask
    scores = F.softmax(scores.float(), dim=-1).type_as(q)
    return torch.matmul(scores, v)
