"""A static KV cache: buffers allocated once, written at device-tensor positions (gpt-fast style).

Nothing in the traced path is a Python int derived from the position: ``update``
writes with ``index_copy_`` at ``input_pos`` (an int64 tensor), and attention runs
over the whole preallocated length with a mask computed from tensors. So a decode
step has the same shapes and guards at every position: one compile, no
recompiles, and addresses that stay fixed for CUDA graphs.
"""

from __future__ import annotations

import torch
from torch import nn


class StaticKVCache(nn.Module):
    """``k_cache``/``v_cache`` of shape ``(max_batch, n_kv_heads, max_seq_len, head_dim)``.

    The buffers are non-persistent: they are not part of the state dict, so a
    checkpoint loads with ``strict=True`` before and after the rewrite.
    """

    def __init__(
        self,
        max_batch: int,
        max_seq_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.shape[2]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` (``(bsz, n_kv_heads, seqlen, head_dim)``) at ``input_pos`` (``(seqlen,)``).

        Returns the caches of the first ``bsz`` rows over the whole length; the caller
        masks positions that are not written yet (``causal_mask``).
        """
        bsz = k.shape[0]
        k_out = self.k_cache[:bsz]
        v_out = self.v_cache[:bsz]
        k_out.index_copy_(2, input_pos, k.to(k_out.dtype))
        v_out.index_copy_(2, input_pos, v.to(v_out.dtype))
        return k_out, v_out

    def reset(self) -> None:
        """Zero the caches in place (addresses are kept)."""
        self.k_cache.zero_()
        self.v_cache.zero_()


def causal_mask(input_pos: torch.Tensor, kv_len: int, sliding_window: int | None = None) -> torch.Tensor:
    """Boolean ``(seqlen, kv_len)`` mask, True where query at ``input_pos[i]`` may attend key ``j``.

    ``j <= input_pos[i]``, and with a window also ``input_pos[i] - j < sliding_window``.
    ``kv_len`` and ``sliding_window`` are configuration (fixed per model), not state.
    """
    k_pos = torch.arange(kv_len, device=input_pos.device)
    q_pos = input_pos.unsqueeze(-1)
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask = mask & (q_pos - k_pos < sliding_window)
    return mask
