"""RoPE and the KV-cache write of a decode step in one kernel: ``graphfix::rope_cache``.

Between the q/k/v GEMV and attention, a decode step rotates q and k and writes k and v
into the cache. Inductor makes three small kernels of that per layer (about 0.11 ms of a
3.6 ms Llama-2-7B step on an H200, docs/benchmarks.md): each is a launch and a wait for
a few kilobytes of work. Here it is one kernel over ``(rows, heads + 2 * kv heads)``
programs: a q head is rotated into the output, a k head is rotated into its cache slot,
a v head is copied into its cache slot.

The arithmetic is eager's: ``half`` layout (Hugging Face) rounds ``x * cos`` and
``rotate_half(x) * sin`` to the dtype and adds them, as bf16 eager ops do with the
tables cast to the activations' dtype; ``interleaved`` (Meta) rotates in float32 and
casts back. ``rope_cache`` is what the decoder calls: the Triton kernel on CUDA, and
``rope_cache_reference`` (``blocks.rope`` and ``RowKVCache.update_rows``) elsewhere.

The op is an opaque ``custom_op`` that mutates the two cache buffers: Inductor calls it
in place (the caches are the module's buffers, so no copy) and CUDA graphs record it. It
launches with programmatic dependent launch when asked (``pdl``, sm_90+): the program
waits for the q/k/v GEMV's results (``griddepcontrol.wait``) before it reads them.
"""

from __future__ import annotations

import torch

from graphfix.engine.kernels import HAS_TRITON, kernels_serve
from graphfix.rewrite.blocks.rope import apply_rotary_half, apply_rotary_interleaved

if HAS_TRITON:
    import triton
    import triton.language as tl


def rope_cache_reference(qkv: torch.Tensor, pos: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv_heads: int,
                         interleaved: bool, shared_row: bool = False) -> torch.Tensor:
    """Eager ops: rotate q and k of ``qkv`` ``(B, 1, (H + 2 KV) D)`` at ``pos`` ``(B,)``, write k and v; return q
    ``(B, H, D)``.

    ``shared_row``: every row is a token of the one sequence in cache row 0 (``rope_cache``)."""
    bsz = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    q, k, v = qkv.view(bsz, 1, -1).split((n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim), dim=-1)
    cos, sin = cos_table[pos].view(bsz, 1, 1, -1), sin_table[pos].view(bsz, 1, 1, -1)
    rotate = apply_rotary_interleaved if interleaved else apply_rotary_half
    q = rotate(q.view(bsz, 1, n_heads, head_dim), cos, sin)
    k = rotate(k.view(bsz, 1, n_kv_heads, head_dim), cos, sin)
    rows = torch.arange(bsz, device=pos.device)
    if shared_row:
        rows = torch.zeros_like(rows)
    k_cache[rows, :, pos] = k.view(bsz, n_kv_heads, head_dim).to(k_cache.dtype)
    v_cache[rows, :, pos] = v.view(bsz, n_kv_heads, head_dim).to(v_cache.dtype)
    return q.view(bsz, n_heads, head_dim)


if HAS_TRITON:

    @triton.jit
    def _rope_cache_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                           stride_xb, stride_pos, stride_t, stride_kb, stride_kh, stride_ks,
                           stride_vb, stride_vh, stride_vs, n_heads, n_kv,
                           HEAD_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, PDL: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)  # q heads, then k heads, then v heads: the order of the fused q/k/v output
        rd = tl.arange(0, HEAD_DIM)
        if PDL:  # everything read below comes from the q/k/v GEMV
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pos = tl.load(pos_ptr + b * stride_pos)
        src = qkv_ptr + b * stride_xb + h * HEAD_DIM
        dtype = q_ptr.dtype.element_ty
        if h < n_heads + n_kv:
            if INTERLEAVED:  # pairs (2i, 2i+1), float32 tables of head_dim // 2 angles
                partner = rd ^ 1
                sign = tl.where(rd % 2 == 0, -1.0, 1.0)
                col = rd // 2
            else:  # pairs (i, i + head_dim / 2), tables of head_dim angles in the activations' dtype
                partner = (rd + HEAD_DIM // 2) % HEAD_DIM
                sign = tl.where(rd < HEAD_DIM // 2, -1.0, 1.0)
                col = rd
            x = tl.load(src + rd).to(tl.float32)
            xp = tl.load(src + partner).to(tl.float32) * sign
            c = tl.load(cos_ptr + pos * stride_t + col).to(tl.float32)
            s = tl.load(sin_ptr + pos * stride_t + col).to(tl.float32)
            if INTERLEAVED:
                out = x * c + xp * s
            else:  # eager bf16: each product rounded to the dtype, then the sum
                out = (x * c).to(dtype).to(tl.float32) + (xp * s).to(dtype).to(tl.float32)
            if h < n_heads:
                tl.store(q_ptr + (b * n_heads + h) * HEAD_DIM + rd, out.to(dtype))
            else:
                dst = k_ptr + b * stride_kb + (h - n_heads) * stride_kh + pos * stride_ks + rd
                tl.store(dst, out.to(dtype).to(k_ptr.dtype.element_ty))
        else:
            dst = v_ptr + b * stride_vb + (h - n_heads - n_kv) * stride_vh + pos * stride_vs + rd
            tl.store(dst, tl.load(src + rd).to(v_ptr.dtype.element_ty))

    def _launch(qkv: torch.Tensor, pos: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv_heads: int, interleaved: bool,
                pdl: bool, shared_row: bool = False) -> torch.Tensor:
        bsz = qkv.shape[0]
        head_dim = k_cache.shape[-1]
        qkv = qkv.reshape(bsz, -1)
        q = torch.empty((bsz, n_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
        grid = (bsz, n_heads + 2 * n_kv_heads)
        extra = {"launch_pdl": True} if pdl else {}
        _rope_cache_kernel[grid](qkv, pos, cos_table, sin_table, q, k_cache, v_cache, qkv.stride(0), pos.stride(0),
                                 cos_table.stride(0), 0 if shared_row else k_cache.stride(0), k_cache.stride(1),
                                 k_cache.stride(2), 0 if shared_row else v_cache.stride(0), v_cache.stride(1),
                                 v_cache.stride(2), n_heads, n_kv_heads,
                                 HEAD_DIM=head_dim, INTERLEAVED=interleaved, PDL=pdl, num_warps=1, **extra)
        return q

    @torch.library.custom_op("graphfix::rope_cache", mutates_args=("k_cache", "v_cache"))
    def rope_cache_op(qkv: torch.Tensor, pos: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv_heads: int, interleaved: bool,
                      pdl: bool, shared_row: bool) -> torch.Tensor:
        """``rope_cache_reference`` as one kernel; ``pdl``: launched with programmatic dependent launch."""
        return _launch(qkv, pos, cos_table, sin_table, k_cache, v_cache, n_heads, n_kv_heads, interleaved, pdl,
                       shared_row)

    @rope_cache_op.register_fake
    def _rope_cache_fake(qkv, pos, cos_table, sin_table, k_cache, v_cache, n_heads, n_kv_heads, interleaved, pdl,
                         shared_row):
        return qkv.new_empty((qkv.shape[0], n_heads, k_cache.shape[-1]))


def triton_rope_applies(qkv: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Where ``kernels.kernels_serve`` (CUDA bf16/fp16), one token per row (any number of rows, each at its own
    position), a power-of-two head size, unit stride along the head dim."""
    head_dim = k_cache.shape[-1]
    return (kernels_serve(qkv) and k_cache.dtype == qkv.dtype
            and head_dim >= 2 and head_dim & (head_dim - 1) == 0 and qkv.dim() == 3 and qkv.shape[1] == 1
            and qkv.stride(-1) == 1 and k_cache.stride(-1) == 1)


def rope_cache(qkv: torch.Tensor, pos: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv_heads: int, interleaved: bool,
               pdl: bool = False, shared_row: bool = False) -> torch.Tensor:
    """Rotate q and k of one decode token per row and write k and v at ``pos``: returns q ``(B, H, D)``.

    ``shared_row``: the rows are consecutive tokens of one sequence (a verify step at batch 1,
    ``LlamaDecoder.step(shared_rows=True)``): all of them are written to cache row 0, each at its own position.

    ``qkv``: ``(B, 1, (H + 2 KV) * D)``, the fused projection's output; ``pos``: ``(B,)``;
    ``cos_table``/``sin_table``: the decoder's whole tables (indexed here by ``pos``);
    ``k_cache``/``v_cache``: ``(B_max, KV, S, D)``, written in place.
    """
    if triton_rope_applies(qkv, k_cache):
        return torch.ops.graphfix.rope_cache(qkv, pos, cos_table, sin_table, k_cache, v_cache, n_heads, n_kv_heads,
                                             interleaved, pdl, shared_row)
    return rope_cache_reference(qkv, pos, cos_table, sin_table, k_cache, v_cache, n_heads, n_kv_heads, interleaved,
                                shared_row)
