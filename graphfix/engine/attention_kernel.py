"""Split-KV decode attention (flash-decoding) for one query token per row: ``graphfix::decode_attention``.

At batch 1 the fused SDPA kernels give each head one thread block: 32 blocks for
Llama-2-7B on a 132-SM H100, about 8 µs per layer for a 256-slot cache, a quarter of
the gap to the bandwidth floor (docs/benchmarks.md). Splitting the cache into chunks
gives ``heads x splits`` blocks; each writes a partial result with its running max
and sum, and a second kernel combines them.

The mask comes from the positions, not from a tensor: a row at position ``p`` attends
to slots ``s <= p`` (and ``s > p - window`` for sliding-window layers), the same rule
as ``LlamaDecoder._mask``. Blocks skip the slots above ``p`` altogether, so a long
static cache costs only the slots in use. Grouped-query heads read their KV head
directly (query head ``h`` uses KV head ``h // n_rep``, the Hugging Face order).

``decode_attention`` is what the decoder calls: the Triton kernels on CUDA and
``decode_attention_reference`` (SDPA with the equivalent additive mask) elsewhere.
``decode_attention(pdl=True)`` launches both kernels with programmatic dependent launch
(``graphfix::decode_attention_pdl``, an opaque op as ``kernels.fused_gemv_pdl``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graphfix.engine.kernels import HAS_TRITON, INTERPRET, kernels_serve

if HAS_TRITON:
    import triton
    import triton.language as tl

BLOCK_S = 32
"""Cache slots a program loads per step (read at each launch, so ``benchmarks/bench_attention.py`` can sweep it)."""
NUM_WARPS = 1
"""Warps of the split kernel's programs. One warp per program, and more programs: on an H200 (Llama-2-7B heads,
32 layers, ``bench_attention.py``) batch 8 went from 0.54 to 0.31 ms a step, a verify step's 5 shared rows from
0.41 to 0.25 ms, batch 1 at position 700 from 0.58 to 0.37 ms; batch 1 at position 100 stayed at 0.24 ms. Why
is not profiled; a program's work is a 32 x 128 product and two reductions, which one warp does without crossing
warps."""
TARGET_PROGRAMS = 512
"""Splits are chosen so that heads x splits is about this many programs (one-warp programs: several per SM)."""


MIN_SPLITS = 8
"""Splits per row and head wherever the cache has that many tiles: a batch-8 step already has 256 rows x heads, and
with one split each a program walked its slots tile after tile (0.49 ms a step over 32 layers on an H200 against
0.15 ms at batch 1, docs/benchmarks.md); 8 was the best of 1, 2, 4, 8 at batch 8 and 16 (``bench_attention.py``)."""
MAX_CHUNK = 512
"""Slots one program streams at most. Batched steps fill ``TARGET_PROGRAMS`` with rows x heads alone (256 on
Llama-2-7B at batch 8), which would leave a long cache to one program per row and head; this keeps several
per row there (reasoning, not measured separately: one program has few loads in flight)."""


def split_plan(rows_x_heads: int, kv_len: int) -> tuple[int, int]:
    """``(splits, chunk)``: ``chunk`` slots per split (a multiple of ``BLOCK_S``, at most ``MAX_CHUNK``) covering
    ``kv_len`` slots."""
    tiles = -(-kv_len // BLOCK_S)
    target = max(TARGET_PROGRAMS, MIN_SPLITS * rows_x_heads)
    splits = max(1, min(tiles, -(-target // max(1, rows_x_heads))), -(-tiles // (MAX_CHUNK // BLOCK_S)))
    chunk = -(-tiles // splits) * BLOCK_S
    return -(-kv_len // chunk), chunk


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                               window: int | None, scale: float | None = None) -> torch.Tensor:
    """``q``: ``(B, H, D)``; ``k``, ``v``: ``(B, KV, S, D)``; ``pos``: ``(B,)``. Returns ``(B, H, D)``."""
    bsz, n_heads, head_dim = q.shape
    n_kv, slots = k.shape[1], k.shape[2]
    n_rep = n_heads // n_kv
    idx = torch.arange(slots, device=q.device)
    allowed = idx <= pos[:, None]
    if window is not None:
        allowed = allowed & (idx > pos[:, None] - window)
    mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
    qg = q.view(bsz, n_kv, n_rep, head_dim)  # query head h = j * n_rep + r uses KV head j
    y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return y.reshape(bsz, n_heads, head_dim)


if HAS_TRITON:

    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, po_ptr, pm_ptr, pl_ptr,
                      stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                      n_heads, n_rep, kv_len, chunk, window, scale, splits,
                      HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr, PDL: tl.constexpr):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        if PDL:  # q and the newest cache slot come from the kernel before
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        b = bh // n_heads
        h = bh % n_heads
        kvh = h // n_rep
        pos = tl.load(pos_ptr + b)
        rd = tl.arange(0, HEAD_DIM)
        rs = tl.arange(0, BLOCK)
        # scalars may arrive as float64 constants when Inductor specializes them: keep the loop state float32
        q = (tl.load(q_ptr + b * stride_qb + h * stride_qh + rd).to(tl.float32) * scale).to(tl.float32)
        start = split * chunk
        end = tl.minimum(tl.minimum(start + chunk, kv_len), pos + 1)
        lo = start
        if HAS_WINDOW:
            lo = tl.maximum(start, pos - window + 1)
            lo = start + ((tl.maximum(lo, start) - start) // BLOCK) * BLOCK  # tile-aligned within the split
        k_base = k_ptr + b * stride_kb + kvh * stride_kh
        v_base = v_ptr + b * stride_vb + kvh * stride_vh
        m_i = tl.full((), -float("inf"), tl.float32)
        l_i = tl.full((), 0.0, tl.float32)
        acc = tl.zeros((HEAD_DIM,), dtype=tl.float32)
        for s0 in range(lo, end, BLOCK):
            slot = s0 + rs
            valid = slot < end
            if HAS_WINDOW:
                valid = valid & (slot > pos - window)
            kt = tl.load(k_base + slot[:, None] * stride_ks + rd[None, :], mask=valid[:, None], other=0.0)
            scores = tl.sum(kt.to(tl.float32) * q[None, :], axis=1)
            scores = tl.where(valid, scores, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0)).to(tl.float32)
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new).to(tl.float32)
            p = tl.exp(scores - m_safe)
            alpha = tl.exp(m_i - m_safe).to(tl.float32)
            vt = tl.load(v_base + slot[:, None] * stride_vs + rd[None, :], mask=valid[:, None], other=0.0)
            acc = (acc * alpha + tl.sum(p[:, None] * vt.to(tl.float32), axis=0)).to(tl.float32)
            l_i = (l_i * alpha + tl.sum(p, axis=0)).to(tl.float32)
            m_i = m_new
        out = bh * splits + split
        tl.store(po_ptr + out * HEAD_DIM + rd, acc)
        tl.store(pm_ptr + out, m_i)
        tl.store(pl_ptr + out, l_i)

    @triton.jit
    def _combine_kernel(po_ptr, pm_ptr, pl_ptr, out_ptr, splits, stride_ob, stride_oh, n_heads,
                        HEAD_DIM: tl.constexpr, SPLITS_P2: tl.constexpr, PDL: tl.constexpr):
        bh = tl.program_id(0)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        b = bh // n_heads
        h = bh % n_heads
        rsp = tl.arange(0, SPLITS_P2)
        rd = tl.arange(0, HEAD_DIM)
        live = rsp < splits
        m = tl.load(pm_ptr + bh * splits + rsp, mask=live, other=-float("inf"))
        l_part = tl.load(pl_ptr + bh * splits + rsp, mask=live, other=0.0)
        m_max = tl.max(m, axis=0)
        w = tl.where(m == -float("inf"), 0.0, tl.exp(m - m_max))
        parts = tl.load(po_ptr + (bh * splits + rsp)[:, None] * HEAD_DIM + rd[None, :], mask=live[:, None], other=0.0)
        num = tl.sum(parts * w[:, None], axis=0)
        den = tl.sum(l_part * w, axis=0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + rd, (num / den).to(out_ptr.dtype.element_ty))

    def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, window: int, scale: float,
                pdl: bool) -> torch.Tensor:
        bsz, n_heads, head_dim = q.shape
        n_kv, kv_len = k.shape[1], k.shape[2]
        splits, chunk = split_plan(bsz * n_heads, kv_len)
        part_out = torch.empty((bsz * n_heads * splits, head_dim), dtype=torch.float32, device=q.device)
        part_m = torch.empty((bsz * n_heads * splits,), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        out = torch.empty((bsz, n_heads, head_dim), dtype=q.dtype, device=q.device)
        # pdl: direct launches with the PDL attribute; otherwise through wrap_triton, so Inductor sees the kernels
        split_kernel = _split_kernel if pdl else torch.library.wrap_triton(_split_kernel)
        combine_kernel = _combine_kernel if pdl else torch.library.wrap_triton(_combine_kernel)
        extra = {"launch_pdl": True} if pdl else {}
        split_kernel[(bsz * n_heads, splits)](
            q, k, v, pos, part_out, part_m, part_l, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            k.stride(2), v.stride(0), v.stride(1), v.stride(2), n_heads, n_heads // n_kv, kv_len, chunk,
            max(window, 1), scale, splits, HEAD_DIM=head_dim, BLOCK=BLOCK_S, HAS_WINDOW=window > 0, PDL=pdl,
            num_warps=NUM_WARPS, **extra)
        combine_kernel[(bsz * n_heads,)](
            part_out, part_m, part_l, out, splits, out.stride(0), out.stride(1), n_heads, HEAD_DIM=head_dim,
            SPLITS_P2=triton.next_power_of_2(splits), PDL=pdl, num_warps=4, **extra)
        return out

    @torch.library.triton_op("graphfix::decode_attention", mutates_args={})
    def decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, window: int,
                            scale: float) -> torch.Tensor:
        """Split-KV attention of ``q`` ``(B, H, D)`` over ``k``/``v`` ``(B, KV, S, D)``; ``window <= 0``: none."""
        return _launch(q, k, v, pos, window, scale, pdl=False)

    @torch.library.custom_op("graphfix::decode_attention_pdl", mutates_args=())
    def decode_attention_pdl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, window: int,
                             scale: float) -> torch.Tensor:
        """``decode_attention`` with both kernels launched with programmatic dependent launch (an opaque op,
        as ``kernels.fused_gemv_pdl``: Inductor's launcher has no PDL attribute). Under the interpreter
        it stands in for ``decode_attention`` without PDL (see ``kernels.fused_linear``)."""
        return _launch(q, k, v, pos, window, scale, pdl=not INTERPRET)

    @decode_attention_pdl.register_fake
    def _decode_attention_pdl_fake(q, k, v, pos, window, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)


def triton_attention_applies(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Where ``kernels.kernels_serve`` (CUDA bf16/fp16), a power-of-two head size with unit stride
    (``tl.arange`` needs one). Any number of rows, each at its own position."""
    head_dim = q.shape[-1]
    return (kernels_serve(q) and k.dtype == q.dtype
            and head_dim >= 16 and head_dim & (head_dim - 1) == 0 and q.stride(-1) == 1 and k.stride(-1) == 1)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, window: int | None,
                     scale: float | None = None, pdl: bool = False) -> torch.Tensor:
    """One query per row: ``q`` ``(B, H, D)`` over ``k``/``v`` ``(B, KV, S, D)`` at positions ``pos`` ``(B,)``.

    ``pdl``: launch with programmatic dependent launch (the caller checks ``kernels.pdl_supported``).
    """
    if triton_attention_applies(q, k):
        s = scale if scale is not None else q.shape[-1] ** -0.5
        op = torch.ops.graphfix.decode_attention_pdl if pdl or INTERPRET else torch.ops.graphfix.decode_attention
        return op(q, k, v, pos, window or 0, s)
    return decode_attention_reference(q, k, v, pos, window, scale)
