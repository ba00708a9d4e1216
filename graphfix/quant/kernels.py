"""Fused dequantizing decode kernels: ``graphfix::qgemv`` (and ``qgemv_pdl``) for int8 and int4 weights.

The bf16 decode GEMV (``graphfix.engine.kernels``) streams 2 bytes per weight; these stream
1 (int8) or half a byte plus the group's scale and zero (int4), dequantize in registers and
keep every prologue and epilogue of the bf16 kernel (RMSNorm of the input, SiLU of
``[gate | up]``, bias, residual add) and its PDL launch, so ``LlamaDecoder``'s kernel path runs
the same seven kernels a layer on quantized weights.

One row (``_qgemv_kernel``): each program owns ``BLOCK_N`` output rows and walks ``K`` in
``BLOCK_K`` tiles. Scales factor out of a group's dot product, so the tile is reduced per
group first and scaled once per group: ``sum_g(s_g * sum(q * x) + z_g * sum(x))`` (the
``z`` term only for int4). The int4 tile is loaded as ``(BLOCK_N, groups, GROUP / 2)`` bytes, so
the per-group sums reduce the last axis and nothing is reshaped; its low nibbles are the even
weights and its high nibbles the odd ones (``quant.scheme``), so the input is read as its even
and odd halves. Codes become float32 by the exponent trick, not by a conversion instruction.

2 to 16 rows: the weight tile is multiplied with every row's slice by ``tl.dot`` (rows padded
to 16), as the bf16 rows kernel does, so a batched step still reads the packed weights once;
int8 (``_qrows_kernel``) dequantizes the tile into the dtype first, int4 (``_qrows4_kernel``)
takes a group a step and applies its scale and zero to the dot's result.

``BLOCK_K`` is always a multiple of the group size (every offered tile has ``BLOCK_K >= 128``),
so a tile holds whole groups. Tested in Triton's interpreter on CPU against the
dequantize-then-``F.linear`` reference (``graphfix.bench.quant_check``).
"""

from __future__ import annotations

import torch

from graphfix.engine.kernels import (
    HAS_TRITON,
    INTERPRET,
    MAX_ROWS,
    ROW_BLOCK,
    fused_linear_reference,
    kernels_serve,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from graphfix.engine.kernels import launch_kernel, rows_prologue

INTERPRET_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 128}
QCONFIGS = [  # (BLOCK_N, BLOCK_K, num_warps, num_stages): BLOCK_K >= 128 so that a tile holds whole groups
    (4, 1024, 4, 3), (2, 1024, 4, 4), (8, 512, 4, 4), (4, 512, 4, 4), (8, 256, 4, 4), (16, 256, 4, 4),
    (16, 512, 8, 3), (32, 128, 4, 4), (32, 256, 8, 3), (2, 2048, 8, 3), (4, 2048, 8, 3), (16, 512, 4, 3),
    (8, 1024, 8, 3),
]
MAGIC_CODES = {torch.bfloat16: 1, torch.float16: 2}
"""``_nibble_code``'s exponent trick per dtype (0, any other: a conversion)."""
QROWS4_CONFIGS = [(32, 4, 4), (64, 4, 4), (16, 4, 4), (32, 4, 6), (64, 8, 4), (128, 8, 4)]
"""int4 rows: (BLOCK_N, num_warps, num_stages); the H200 sweep chose 64/4/4 for q/k/v and gate/up, 32/4/4 for
o and down."""
QROWS_CONFIGS = [(16, 256, 4, 4), (16, 512, 4, 3), (32, 128, 4, 4), (32, 256, 4, 4), (64, 128, 4, 4),
                 (32, 512, 8, 3)]


def _acc_width(meta: dict) -> int:
    """Columns of the one-row accumulator: one per group of the tile, or the whole tile (int8 per channel)."""
    return meta["BLOCK_K"] // meta["GROUP"] if meta["GROUP"] else meta["BLOCK_K"]


if HAS_TRITON:

    @triton.jit
    def _prologue(xp, mask, nw, K, dtype: tl.constexpr, NORM: tl.constexpr, SILU: tl.constexpr):
        """The input slice at ``xp``: ``silu(gate) * up`` rounded like eager (``SILU``), times the norm weight
        (``NORM``); also its squares for RMSNorm's statistics (before the weight)."""
        if SILU:
            g = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(xp + K, mask=mask, other=0.0).to(tl.float32)
            a = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
            xv = (a * u).to(dtype).to(tl.float32)
        else:
            xv = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        sq = xv * xv
        if NORM:
            xv = xv * nw
        return xv, sq

    @triton.jit
    def _group_params(s_ptr, z_ptr, rn, mask_n, k, stride_sn, K, NG: tl.constexpr, GROUP: tl.constexpr,
                      ZERO: tl.constexpr):
        """Scales (and zeros) of the tile's ``NG`` groups, ``(BLOCK_N, NG)`` float32."""
        rg = k // GROUP + tl.arange(0, NG)
        gmask = mask_n[:, None] & (rg < K // GROUP)[None, :]
        offs = rn[:, None].to(tl.int64) * stride_sn + rg[None, :]
        s = tl.load(s_ptr + offs, mask=gmask, other=0.0).to(tl.float32)
        z = s
        if ZERO:
            z = tl.load(z_ptr + offs, mask=gmask, other=0.0).to(tl.float32)
        return s, z

    @triton.jit
    def _codes(q_ptr, rn, mask_n, k, K, stride_qn, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
        """The packed tile at column ``k``: ``(BLOCK_N, BLOCK_K // 2)`` bytes (int4) or ``(BLOCK_N, BLOCK_K)`` int8,
        streamed once (evict-first)."""
        if BITS == 4:
            rb = tl.arange(0, BLOCK_K // 2)
            mask_k = k + 2 * rb < K
            offs = (k // 2 + rb)[None, :]
        else:
            rb = tl.arange(0, BLOCK_K)
            mask_k = k + rb < K
            offs = (k + rb)[None, :]
        return tl.load(q_ptr + rn[:, None].to(tl.int64) * stride_qn + offs, mask=mask_n[:, None] & mask_k[None, :],
                       other=0, eviction_policy="evict_first")

    @triton.jit
    def _nibble_float(u):
        """``u`` in [0, 15] (int32) as float32 by the exponent trick: ``u | 0x4B000000`` read as float32 is
        ``2**23 + u``, an integer OR and one subtraction where a conversion (``I2F``, an eighth of the FMA rate on
        Hopper) would be (with the grouped tiles, the int4:128 linears 1.42x faster on an H200,
        ``bench_quant.py --parts gemv``)."""
        return (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _int8_float(q):
        """int8 codes as float32 by the exponent trick (``q + 128`` as the low byte of ``2**23``)."""
        u = q.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x80
        return (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0

    @triton.jit
    def _codes_grouped(q_ptr, rn, mask_n, k, K, stride_qn, GROUP: tl.constexpr, NG: tl.constexpr):
        """The one-row int4 tile at column ``k``: ``(BLOCK_N, NG, GROUP // 2)`` bytes, streamed once (evict-first)."""
        rg = tl.arange(0, NG)
        rh = tl.arange(0, GROUP // 2)
        offs = (k // 2 + rg[:, None] * (GROUP // 2) + rh[None, :])[None, :, :]
        mask = mask_n[:, None, None] & ((k // GROUP + rg) < K // GROUP)[None, :, None]
        return tl.load(q_ptr + rn[:, None, None].to(tl.int64) * stride_qn + offs, mask=mask, other=0,
                       eviction_policy="evict_first")

    @triton.jit
    def _one_row_codes(q_ptr, rn, mask_n, k, K, stride_qn, BITS: tl.constexpr, GROUP: tl.constexpr,
                       BLOCK_K: tl.constexpr, NG: tl.constexpr):
        """The one-row kernel's tile: grouped for int4 (one return: Triton wants a single return type)."""
        if BITS == 4:
            codes = _codes_grouped(q_ptr, rn, mask_n, k, K, stride_qn, GROUP, NG)
        else:
            codes = _codes(q_ptr, rn, mask_n, k, K, stride_qn, BITS, BLOCK_K)
        return codes

    @triton.jit
    def _qtile(acc, sq, codes, q_ptr, s_ptr, z_ptr, x_ptr, nw_ptr, rn, mask_n, k, K, stride_qn, stride_sn,
               dtype: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, NORM: tl.constexpr,
               SILU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC_W: tl.constexpr):
        """One ``BLOCK_K`` step of the one-row kernel: ``acc`` is ``(BLOCK_N, ACC_W)``."""
        if BITS == 4:  # codes (BLOCK_N, ACC_W, GROUP // 2): a group's bytes along the last axis, no reshape
            rg = tl.arange(0, ACC_W)
            rh = tl.arange(0, GROUP // 2)
            ke = k + rg[:, None] * GROUP + 2 * rh[None, :]
            mask_k = ((k // GROUP + rg) < K // GROUP)[:, None] & (rh < GROUP // 2)[None, :]
            nwe = 1.0
            nwo = 1.0
            if NORM:
                nwe = tl.load(nw_ptr + ke, mask=mask_k, other=0.0).to(tl.float32)
                nwo = tl.load(nw_ptr + ke + 1, mask=mask_k, other=0.0).to(tl.float32)
            xe, sqe = _prologue(x_ptr + ke, mask_k, nwe, K, dtype, NORM, SILU)
            xo, sqo = _prologue(x_ptr + ke + 1, mask_k, nwo, K, dtype, NORM, SILU)
            sq += sqe + sqo
            b = codes.to(tl.int32)
            lo = _nibble_float(b & 0xF)
            hi = _nibble_float(b >> 4)
            qx = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)
            xs = tl.sum(xe + xo, axis=1)
            s, z = _group_params(s_ptr, z_ptr, rn, mask_n, k, stride_sn, K, ACC_W, GROUP, True)
            acc += qx * s + z * xs[None, :]
        else:
            rk = tl.arange(0, BLOCK_K)
            mask_k = k + rk < K
            w = codes
            nw = 1.0
            if NORM:
                nw = tl.load(nw_ptr + k + rk, mask=mask_k, other=0.0).to(tl.float32)
            xv, sqv = _prologue(x_ptr + k + rk, mask_k, nw, K, dtype, NORM, SILU)
            sq += sqv
            part = _int8_float(w) * xv[None, :]
            if GROUP == 0:  # per channel: the row's one scale is applied after the loop
                acc += part
            else:
                s, z = _group_params(s_ptr, z_ptr, rn, mask_n, k, stride_sn, K, ACC_W, GROUP, False)
                acc += tl.sum(tl.reshape(part, (BLOCK_N, ACC_W, GROUP)), axis=2) * s
        return acc, sq

    @triton.jit
    def _epilogue(out, rn, mask_n, sq, s_ptr, b_ptr, res_ptr, out_ptr, out_offs, out_mask, K, stride_sn, eps,
                  dtype: tl.constexpr, GROUP: tl.constexpr, NORM: tl.constexpr, BIAS: tl.constexpr,
                  RESIDUAL: tl.constexpr, ROWS: tl.constexpr):
        """``out`` is ``(BLOCK_N,)`` (one row) or ``(BLOCK_N, BLOCK_M)``; ``sq`` the rows' sums of squares."""
        if GROUP == 0:
            scale = tl.load(s_ptr + rn.to(tl.int64) * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
            if ROWS:
                out = out * scale[:, None]
            else:
                out = out * scale
        if NORM:
            rstd = 1.0 / tl.sqrt(sq / K + eps)
            if ROWS:
                out = out * rstd[None, :]
            else:
                out = out * rstd
        if BIAS:
            b = tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
            if ROWS:
                out += b[:, None]
            else:
                out += b
        if RESIDUAL:
            out = out.to(dtype).to(tl.float32) + tl.load(res_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_offs, out.to(dtype), mask=out_mask)

    @triton.jit
    def _qgemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, nw_ptr, b_ptr, res_ptr, N, K, stride_qn, stride_sn, eps,
                      BITS: tl.constexpr, GROUP: tl.constexpr, NORM: tl.constexpr, SILU: tl.constexpr,
                      BIAS: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      ACC_W: tl.constexpr, PDL: tl.constexpr):
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        dtype = out_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_N, ACC_W), dtype=tl.float32)
        if BITS == 4:
            sq = tl.zeros((ACC_W, GROUP // 2), dtype=tl.float32)
        else:
            sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
        # the first packed tile is loaded before anything the previous kernel writes: with PDL this program
        # streams it while that kernel drains, then waits (griddepcontrol.wait) before reading x or the residual
        codes = _one_row_codes(q_ptr, rn, mask_n, 0, K, stride_qn, BITS, GROUP, BLOCK_K, ACC_W)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        acc, sq = _qtile(acc, sq, codes, q_ptr, s_ptr, z_ptr, x_ptr, nw_ptr, rn, mask_n, 0, K, stride_qn, stride_sn,
                         dtype, BITS, GROUP, NORM, SILU, BLOCK_N, BLOCK_K, ACC_W)
        for k in range(BLOCK_K, K, BLOCK_K):
            codes = _one_row_codes(q_ptr, rn, mask_n, k, K, stride_qn, BITS, GROUP, BLOCK_K, ACC_W)
            acc, sq = _qtile(acc, sq, codes, q_ptr, s_ptr, z_ptr, x_ptr, nw_ptr, rn, mask_n, k, K, stride_qn, stride_sn,
                             dtype, BITS, GROUP, NORM, SILU, BLOCK_N, BLOCK_K, ACC_W)
        out = tl.sum(acc, axis=1)
        if BITS == 4:
            sq_row = tl.sum(tl.sum(sq, axis=1), axis=0)
        else:
            sq_row = tl.sum(sq, axis=0)
        _epilogue(out, rn, mask_n, sq_row, s_ptr, b_ptr, res_ptr, out_ptr, rn, mask_n, K, stride_sn,
                  eps, dtype, GROUP, NORM, BIAS, RESIDUAL, False)

    qgemv_kernel_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in QCONFIGS],
        key=["N", "K", "BITS", "GROUP", "NORM", "SILU", "BIAS", "RESIDUAL"],
    )(triton.heuristics({"ACC_W": _acc_width})(_qgemv_kernel))

    @triton.jit
    def _rows_x(x_ptr, nw_ptr, kk, mask_k, rm, mask_m, K, stride_xm, dtype: tl.constexpr, NORM: tl.constexpr,
                SILU: tl.constexpr):
        """The rows' slice at columns ``kk``, transposed: ``(len(kk), BLOCK_M)``; and its per-row sum of squares."""
        nw = 1.0
        if NORM:
            nw = tl.load(nw_ptr + kk, mask=mask_k, other=0.0).to(tl.float32)[:, None]
        xv, sqv = _prologue(x_ptr + rm[None, :] * stride_xm + kk[:, None], mask_k[:, None] & mask_m[None, :], nw, K,
                            dtype, NORM, SILU)
        return xv, tl.sum(sqv, axis=0)

    @triton.jit
    def _dot(w, xv, acc, F32_DOT: tl.constexpr):
        if F32_DOT:
            return tl.dot(w.to(tl.float32), xv.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(w, xv.to(w.dtype), acc)

    @triton.jit
    def _qrows_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, nw_ptr, b_ptr, res_ptr, M, N, K, stride_xm, stride_qn,
                      stride_sn, eps, BITS: tl.constexpr, GROUP: tl.constexpr, NORM: tl.constexpr, SILU: tl.constexpr,
                      BIAS: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, F32_DOT: tl.constexpr, PDL: tl.constexpr):
        """int8, ``M`` rows (2 to 16) at once: each tile is dequantized once, then ``tl.dot`` with every row (int4 has
        ``_qrows4_kernel``)."""
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        mask_n = rn < N
        mask_m = rm < M
        dtype = out_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        codes = _codes(q_ptr, rn, mask_n, 0, K, stride_qn, BITS, BLOCK_K)  # before the wait, as in _qgemv_kernel
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        for k in range(0, K, BLOCK_K):
            if k > 0:
                codes = _codes(q_ptr, rn, mask_n, k, K, stride_qn, BITS, BLOCK_K)
            rk = tl.arange(0, BLOCK_K)
            mask_k = k + rk < K
            q = codes
            xv, sqv = _rows_x(x_ptr, nw_ptr, k + rk, mask_k, rm, mask_m, K, stride_xm, dtype, NORM, SILU)
            sq += sqv
            if GROUP == 0:  # codes are exact in the dtype; the row's scale comes after the loop
                w = q.to(tl.float32).to(dtype)
            else:
                s, _ = _group_params(s_ptr, z_ptr, rn, mask_n, k, stride_sn, K, BLOCK_K // GROUP, GROUP, False)
                se = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, BLOCK_K // GROUP, GROUP)),
                                (BLOCK_N, BLOCK_K))
                w = (q.to(tl.float32) * se).to(dtype)
            acc = _dot(w, xv, acc, F32_DOT)
        offs = rm[None, :] * N + rn[:, None]
        _epilogue(acc, rn, mask_n, sq, s_ptr, b_ptr, res_ptr, out_ptr, offs, mask_n[:, None] & mask_m[None, :], K,
                  stride_sn, eps, dtype, GROUP, NORM, BIAS, RESIDUAL, True)

    qrows_kernel_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                 for n, k, w, s in QROWS_CONFIGS],
        key=["N", "K", "BITS", "GROUP", "NORM", "SILU", "BIAS", "RESIDUAL"],
    )(_qrows_kernel)

    @triton.jit
    def _nibble_code(u, MAGIC: tl.constexpr, dtype: tl.constexpr):
        """Codes ``u`` in [0, 15] (int16) as the dot's operand: bf16 ``128 + u`` (``MAGIC`` 1: ``u | 0x4300`` read as
        bf16) or fp16 ``1024 + u`` (2: ``u | 0x6400``), no conversion instruction; float32 ``u`` otherwise (0)."""
        if MAGIC == 1:
            w = (u | 0x4300).to(tl.bfloat16, bitcast=True)
        elif MAGIC == 2:
            w = (u | 0x6400).to(tl.float16, bitcast=True)
        else:
            w = u.to(tl.float32).to(dtype)
        return w

    @triton.jit
    def _qrows4_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, b_ptr, res_ptr, M, N, K, stride_xm, stride_qn, stride_sn,
                       GROUP: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_M: tl.constexpr, MAGIC: tl.constexpr, F32_DOT: tl.constexpr, PDL: tl.constexpr):
        """int4, ``M`` rows (2 to 16; their prologue already ran): a group a step. The group's codes become the
        dtype's ``OFFSET + q`` (``_nibble_code``), interleaved into weight order, and multiply every row on tensor cores
        with the weight tile as the dot's first operand; ``sum(w x) = s (t - OFFSET sum(x)) + z sum(x)`` applies the
        scale, zero and offset to the dot's result. On an H200 this read the Llama-2-7B linears at 8 rows twice as fast
        as dequantizing every weight with its group's scale (``benchmarks/bench_quant_variants.py``, ``dotw``)."""
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        rk = tl.arange(0, GROUP)
        mask_n = rn < N
        mask_m = rm < M
        dtype = out_ptr.dtype.element_ty
        if MAGIC == 1:
            offset = 128.0
        elif MAGIC == 2:
            offset = 1024.0
        else:
            offset = 0.0
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        codes = _codes(q_ptr, rn, mask_n, 0, K, stride_qn, 4, GROUP)  # before the wait, as in _qgemv_kernel
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        for k in range(0, K, GROUP):
            if k > 0:
                codes = _codes(q_ptr, rn, mask_n, k, K, stride_qn, 4, GROUP)
            b = codes.to(tl.int16)
            w = tl.interleave(_nibble_code(b & 0xF, MAGIC, dtype), _nibble_code(b >> 4, MAGIC, dtype))
            xt = tl.load(x_ptr + rm[None, :] * stride_xm + (k + rk)[:, None], mask=mask_m[None, :], other=0.0)
            s, z = _group_params(s_ptr, z_ptr, rn, mask_n, k, stride_sn, K, 1, GROUP, True)
            t = _dot(w, xt, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), F32_DOT)
            xs = tl.sum(xt.to(tl.float32), axis=0)
            acc += t * s + (z - offset * s) * xs[None, :]
        offs = rm[None, :] * N + rn[:, None]
        _epilogue(acc, rn, mask_n, tl.zeros((BLOCK_M,), dtype=tl.float32), s_ptr, b_ptr, res_ptr, out_ptr, offs,
                  mask_n[:, None] & mask_m[None, :], K, stride_sn, 0.0, dtype, GROUP, False, BIAS, RESIDUAL, True)

    qrows4_kernel_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in QROWS4_CONFIGS],
        key=["N", "K", "GROUP", "BIAS", "RESIDUAL"],
    )(_qrows4_kernel)

    def _qlaunch(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, nw: torch.Tensor | None,
                 eps: float, silu: bool, bias: torch.Tensor | None, residual: torch.Tensor | None, bits: int,
                 group: int, pdl: bool) -> torch.Tensor:
        n = q.shape[0]
        k = q.shape[1] * (2 if bits == 4 else 1)
        rows = x.shape[:-1].numel()
        x = x.reshape(rows, -1).contiguous()
        out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
        res = residual.reshape(rows, n).contiguous() if residual is not None else out
        z_arg, nw_arg, b_arg = (out if t is None else t for t in (z, nw, bias))
        flags = {"BITS": bits, "GROUP": group, "NORM": nw is not None, "SILU": silu, "BIAS": bias is not None,
                 "RESIDUAL": residual is not None}

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]),)

        if rows > 1:
            if nw is not None or silu:  # once per row before the GEMM, as the bf16 rows kernel does (its docstring)
                x = rows_prologue(x, nw, eps, silu, pdl)
                flags["NORM"] = flags["SILU"] = False
            f32_dot = INTERPRET or x.dtype == torch.float32
            if bits == 4:
                magic = MAGIC_CODES.get(x.dtype, 0)
                args = (x, q, s, z_arg, out, b_arg, res, rows, n, k, x.stride(0), q.stride(0), s.stride(0))
                fixed = {"GROUP": group, "BIAS": bias is not None, "RESIDUAL": residual is not None,
                         "BLOCK_M": ROW_BLOCK, "MAGIC": magic, "F32_DOT": f32_dot}
                launch_kernel(_qrows4_kernel, qrows4_kernel_tuned, grid, args, fixed, {"BLOCK_N": 16}, pdl)
                return out
            args = (x, q, s, z_arg, out, nw_arg, b_arg, res, rows, n, k, x.stride(0), q.stride(0), s.stride(0), eps)
            fixed = {**flags, "BLOCK_M": ROW_BLOCK, "F32_DOT": f32_dot}
            launch_kernel(_qrows_kernel, qrows_kernel_tuned, grid, args, fixed, INTERPRET_CONFIG, pdl)
            return out
        args = (x, q, s, z_arg, out, nw_arg, b_arg, res, n, k, q.stride(0), s.stride(0), eps)
        tile = dict(INTERPRET_CONFIG, ACC_W=_acc_width({**INTERPRET_CONFIG, **flags}))
        launch_kernel(_qgemv_kernel, qgemv_kernel_tuned, grid, args, flags, tile, pdl)
        return out

    @torch.library.triton_op("graphfix::qgemv", mutates_args={})
    def qgemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              norm_weight: torch.Tensor | None, eps: float, silu: bool, bias: torch.Tensor | None,
              residual: torch.Tensor | None, bits: int, group: int) -> torch.Tensor:
        """``fused_linear_reference(x, dequantize(qweight, scales, zeros), ...)`` for 1 to 16 rows: ``(rows, N)``.

        ``group`` 0: int8 with one scale per output row."""
        return _qlaunch(x, qweight, scales, zeros, norm_weight, eps, silu, bias, residual, bits, group, False)

    @torch.library.custom_op("graphfix::qgemv_pdl", mutates_args=())
    def qgemv_pdl(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  norm_weight: torch.Tensor | None, eps: float, silu: bool, bias: torch.Tensor | None,
                  residual: torch.Tensor | None, bits: int, group: int) -> torch.Tensor:
        """``qgemv`` launched with programmatic dependent launch: an opaque op, as ``fused_gemv_pdl`` is."""
        return _qlaunch(x, qweight, scales, zeros, norm_weight, eps, silu, bias, residual, bits, group, True)

    @qgemv_pdl.register_fake
    def _qgemv_pdl_fake(x, qweight, scales, zeros, norm_weight, eps, silu, bias, residual, bits, group):
        return x.new_empty((x.shape[:-1].numel(), qweight.shape[0]))


def quant_kernel_applies(x: torch.Tensor, module) -> bool:
    """Whether the fused kernel serves this call: 1 to ``MAX_ROWS`` rows where the Triton kernels run, packed rows
    with unit stride, the module computing in ``x``'s dtype."""
    return (kernels_serve(x) and x.dtype == module.dtype and module.qweight.stride(1) == 1
            and 1 <= x.shape[:-1].numel() <= MAX_ROWS)


def fused_quant_linear(x: torch.Tensor, module, *, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                       silu: bool = False, residual: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """``QuantLinear.fused``: the kernel where it applies, else dequantize and ``fused_linear_reference``."""
    if quant_kernel_applies(x, module):
        op = torch.ops.graphfix.qgemv_pdl if pdl or INTERPRET else torch.ops.graphfix.qgemv
        out = op(x, module.qweight, module.scales, module.zeros, norm_weight, eps, silu, module.bias, residual,
                 module.scheme.bits, module.scheme.group_size or 0)
        return out.view(*x.shape[:-1], module.out_features)
    return fused_linear_reference(x, module.dequantize(x.dtype), norm_weight=norm_weight, eps=eps, silu=silu,
                                  bias=module.bias, residual=residual)
