"""A static KV cache: buffers allocated once, written at device-tensor positions (gpt-fast style).

Nothing in the traced path is a Python int derived from the position: ``update``
writes with ``index_copy_`` at ``input_pos`` (an int64 tensor), and attention runs
over the whole preallocated length with a mask computed from tensors. So a decode
step has the same shapes and guards at every position: one compile, no
recompiles, and addresses that stay fixed for CUDA graphs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graphfix.rewrite.blocks import attention


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


class PreallocatedCache(nn.Module):
    """What a growing ``self.cache_k = torch.cat([self.cache_k, k], dim)`` attribute becomes.

    ``buffer`` has the layout the attribute had, with ``max_batch`` rows and ``max_seq_len``
    positions along ``seq_dim``; ``length`` (a 0-d int64 tensor) counts the positions written.
    An append writes the new positions at ``length + arange(T)`` with ``index_copy_`` and
    advances ``length`` in place, so a decode step sees the same shapes, guards and addresses
    at every position. Readers attend over the whole buffer and mask positions
    ``>= length`` (``written_mask``); nothing is zeroed on reset because masked positions are
    never read. Both buffers are non-persistent: the state dict keeps its keys.
    """

    def __init__(self, shape: tuple[int, ...], seq_dim: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.seq_dim = seq_dim
        self.register_buffer("buffer", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("length", torch.zeros((), dtype=torch.int64, device=device), persistent=False)

    @classmethod
    def like(cls, example: torch.Tensor, seq_dim: int, max_batch: int, max_seq_len: int,
             dtype: torch.dtype | None = None, device: torch.device | str | None = None,
             content: torch.Tensor | None = None) -> PreallocatedCache:
        """A cache shaped like ``example`` (batch and sequence dims resized); ``content`` is copied in, if given."""
        shape = list(example.shape)
        shape[0], shape[seq_dim] = max(max_batch, shape[0]), max_seq_len
        cache = cls(tuple(shape), seq_dim, dtype or example.dtype, device or example.device)
        if content is not None and content.shape[seq_dim] > 0:
            cache.append(content.to(cache.buffer.device))
        return cache

    @property
    def max_seq_len(self) -> int:
        return self.buffer.shape[self.seq_dim]

    def append(self, x: torch.Tensor, restart: torch.Tensor | None = None) -> None:
        """Write ``x`` after the written positions (at 0 where the bool tensor ``restart`` holds), advance ``length``."""
        start = self.length if restart is None else self.length.masked_fill(restart, 0)
        positions = start + torch.arange(x.shape[self.seq_dim], device=self.length.device)
        self.buffer[: x.shape[0]].index_copy_(self.seq_dim, positions, x.to(self.buffer.dtype))
        self.length.copy_(start + x.shape[self.seq_dim])

    def replace(self, x: torch.Tensor) -> None:
        """The cache becomes ``x`` (``self.cache_k = k``)."""
        self.length.zero_()
        self.append(x)

    def reset(self, where: torch.Tensor | None = None) -> None:
        """Forget every position (``self.cache_k = None``), or only where the bool tensor ``where`` holds."""
        if where is None:
            self.length.zero_()
        else:
            self.length.masked_fill_(where, 0)

    def is_empty(self) -> torch.Tensor:
        """A bool tensor: nothing written (the original's ``self.cache_k is None``)."""
        return self.length == 0

    def seq_len(self) -> torch.Tensor:
        """The positions written, as a 0-d int64 tensor (a copy: later appends do not change it)."""
        return self.length.clone()


def written_mask(length: torch.Tensor, q_len: int, kv_len: int, is_causal: bool = False) -> torch.Tensor:
    """Boolean ``(q_len, kv_len)``: key ``j`` is written (``j < length``), and with ``is_causal`` also ``j <= i``.

    ``is_causal`` keeps SDPA's own definition (aligned to the top-left corner), so attending
    over a preallocated cache with this mask equals SDPA over the written prefix with
    ``is_causal``; for a prompt written into an empty cache that is the causal mask in
    absolute positions.
    """
    written = torch.arange(kv_len, device=length.device) < length
    if not is_causal:
        return written.expand(q_len, kv_len)
    return causal_mask(torch.arange(q_len, device=length.device), kv_len) & written


def take_positions(table: torch.Tensor, dim: int, start: torch.Tensor, count: int) -> torch.Tensor:
    """``table`` at positions ``start .. start + count - 1`` along ``dim``, with a tensor ``start``.

    The original's ``table[start : start + count]`` needs a Python int; ``index_select`` takes
    the device tensor, so the step keeps one graph for every position.
    """
    return table.index_select(dim, start.to(table.device) + torch.arange(count, device=table.device))


def shifted_arange(start: torch.Tensor, count: int, **arange_kwargs) -> torch.Tensor:
    """``torch.arange(start, start + count, **arange_kwargs)`` with a tensor ``start`` (on ``start``'s device
    unless a device is given)."""
    device = arange_kwargs.pop("device", start.device)
    return start.to(device) + torch.arange(count, device=device, **arange_kwargs)


def over_written(mask: torch.Tensor | None, length: torch.Tensor, q_len: int, kv_len: int,
                 is_causal: bool = False) -> torch.Tensor:
    """The mask that makes attention over a preallocated cache equal attention over its written prefix.

    ``mask`` is the original's own mask over the grown cache (bool, True = attend, or additive
    float), its last dim the written length or 1 (what SDPA accepts); it is widened to
    ``kv_len`` keys as "not attended" (a dim of 1 is broadcast) and combined with
    ``written_mask``. ``None`` gives ``written_mask`` itself.
    """
    written = written_mask(length, q_len, kv_len, is_causal)
    if mask is None:
        return written
    if mask.shape[-1] == 1:
        mask = mask.expand(*mask.shape[:-1], kv_len)
    elif mask.dtype == torch.bool:
        mask = F.pad(mask, (0, kv_len - mask.shape[-1]), value=False)
    else:
        mask = F.pad(mask, (0, kv_len - mask.shape[-1]), value=float("-inf"))
    if mask.dtype == torch.bool:
        return mask & written
    return mask.masked_fill(~written, float("-inf"))


def attend_written(length: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: torch.Tensor | None = None, is_causal: bool = False, **sdpa_kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` over the written positions of preallocated ``key``/``value``.

    ``key``/``value``: ``(max_batch, heads, max_seq_len, head_dim)``; the first ``query.shape[0]``
    rows are used, and keys at positions ``>= length`` are masked (``over_written``), so the
    result equals the original's SDPA over the grown cache with the same ``attn_mask`` and
    ``is_causal``. (Both together fail as they do in SDPA.)
    """
    batch = query.shape[0]
    key, value = key[:batch], value[:batch]
    if attn_mask is None:
        mask = written_mask(length, query.shape[-2], key.shape[-2], is_causal)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, **sdpa_kwargs)
    mask = over_written(attn_mask, length, query.shape[-2], key.shape[-2])
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal, **sdpa_kwargs)


def attend_written_grouped(length: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """``graphfix.rewrite.blocks.attention.sdpa(q, k, v, mask)`` over a preallocated cache's written positions."""
    batch = q.shape[0]
    return attention.sdpa(q, k[:batch], v[:batch], over_written(mask, length, q.shape[-2], k.shape[-2]))
