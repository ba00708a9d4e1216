"""Triton GEMV kernels for decode steps of 1 to 16 rows: ``graphfix::gemv`` and ``graphfix::fused_gemv``.

A decode step at batch 1 is a chain of matrix-vector products that stream every
weight once: their speed is the achieved read bandwidth. On an H100 (torch 2.11,
cuBLAS "nvjet" kernels) the decode's linears alone ran at 2.57 TB/s, 0.86 of the
card's 2.98 TB/s copy bandwidth (docs/benchmarks.md). The GEMV here is the answer
to that: each program owns ``BLOCK_N`` output rows and walks ``K`` in ``BLOCK_K``
tiles of 16-byte loads (weights marked evict-first, so they do not push the
activations out of L2), accumulating in float32; tile sizes are autotuned per shape.

``fused_gemv`` of 2 to ``MAX_ROWS`` rows (a batched decode step, or a verify step's tokens)
runs the prologue once per row (``_prologue_kernel``) and then a skinny GEMM
(``_rows_kernel``): each program still owns ``BLOCK_N`` output features and streams
their weights once, and multiplies each weight tile with every row at once (``tl.dot``
with the rows padded to 16, fp32 accumulation), so a step of 8 rows reads the weights
once, as a step of one does. The epilogues apply per row.

``fused_gemv`` folds the small element-wise kernels around a linear into the GEMV,
because at batch 1 each of them costs a launch and a round trip through memory
(about a third of the gap to the bandwidth floor in the H100 profile):

- prologue ``norm_weight``: RMSNorm of ``x``. Each program gathers the float32 sum of
  squares of the one input row (L2-resident) in the same pass that streams the weights
  and scales its dot products by ``rsqrt(mean(x^2) + eps)`` at the end. A first version
  normalized ``x`` before the pass, with eager's bf16 rounding of ``x * rstd``: the
  pre-pass delayed every program's weight stream and made the GEMVs 5% slower on an
  H100. So this prologue is not bit-exact with eager RMSNorm (its intermediate is not
  rounded to the dtype); ``kernel_check`` bounds the difference;
- prologue ``silu``: ``x`` is ``[gate | up]`` (the fused ``w13`` output) and the
  GEMV input is ``silu(gate) * up``, each rounded to the dtype as eager does;
- epilogue ``bias`` and ``residual``: ``(x @ w.T + bias).to(dtype) + residual``.

``fused_linear`` is what the decoder calls: the Triton op for 1 to ``MAX_ROWS`` rows on
CUDA in bf16/fp16 (and on CPU tensors under Triton's interpreter, for the tests), and
``fused_linear_reference`` (the same arithmetic in eager ops)
everywhere else, so the model's code path is the same on CPU and GPU and the CPU
tests exercise it. ``gemv`` and ``fused_gemv`` are registered with
``torch.library.triton_op``, so ``torch.compile`` (fullgraph, CUDA graphs) keeps them as
kernel calls in the graph; ``fused_gemv_pdl``, the same kernel launched with programmatic
dependent launch, is an opaque ``custom_op`` (Inductor's launcher has no PDL attribute).
``use_triton_gemv(model)`` switches a model's bias-free ``nn.Linear`` modules to
``GemvLinear`` (plain GEMV, no fusion); nothing moves.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference implementations run instead
    triton = None
    tl = None

HAS_TRITON = triton is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
"""Triton's interpreter (CPU tests): it cannot time configurations, so one fixed small tile is used."""
INTERPRET_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 64}
MAX_ROWS = 16
"""The most rows ``fused_gemv`` serves: the rows kernel pads them to one 16-row ``tl.dot`` operand. Above it a
step is a GEMM, where cuBLAS wins."""
ROW_BLOCK = 16
PROLOGUE_CHUNK = 1024
"""Elements of a row each program of the rows steps' SiLU prologue handles."""

CONFIGS = [  # (BLOCK_N, BLOCK_K, num_warps, num_stages); the first three won the H200 sweep for N = 4096 (o, down)
    (4, 1024, 4, 3), (2, 1024, 4, 4), (8, 512, 8, 4),
    (4, 512, 4, 4), (8, 256, 4, 4), (8, 512, 4, 3), (16, 256, 4, 4), (16, 512, 8, 3), (32, 128, 4, 4),
    (32, 256, 8, 3), (64, 128, 8, 3),
]
ROWS_CONFIGS = [  # (BLOCK_N, BLOCK_K, num_warps, num_stages) of the rows kernel: BLOCK_N >= 16 (tl.dot's minimum);
    # the first five won the H200 sweep of 4 and 8 rows over the Llama-2-7B linears (gpu_sweep, 2026-12-03)
    (32, 128, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4), (32, 256, 4, 4), (16, 128, 4, 6), (16, 256, 4, 4),
    (32, 128, 4, 5), (64, 64, 4, 6),
]
FUSED_DTYPES = (torch.bfloat16, torch.float16)


def fused_linear_reference(x: torch.Tensor, weight: torch.Tensor, *, norm_weight: torch.Tensor | None = None,
                           eps: float = 0.0, silu: bool = False, bias: torch.Tensor | None = None,
                           residual: torch.Tensor | None = None) -> torch.Tensor:
    """The arithmetic of ``fused_gemv`` in eager ops, in the order the Hugging Face and Meta models use."""
    if silu:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    if norm_weight is not None:
        xf = x.float()
        x = norm_weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    out = F.linear(x, weight, bias)
    return out if residual is None else residual + out


if HAS_TRITON:

    @triton.jit
    def _weight_tile(w_ptrs, mask_n, k, rk, K, EVEN_K: tl.constexpr):
        """The ``BLOCK_N x BLOCK_K`` weight tile at column ``k``, streamed once (evict-first)."""
        if EVEN_K:
            return tl.load(w_ptrs, mask=mask_n[:, None], other=0.0, eviction_policy="evict_first")
        return tl.load(w_ptrs, mask=mask_n[:, None] & (k + rk < K)[None, :], other=0.0, eviction_policy="evict_first")

    @triton.jit
    def _gemv_tile(acc, sq, w, x_ptr, nw_ptr, k, rk, K, dtype: tl.constexpr, NORM: tl.constexpr,
                   SILU: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
        """One ``BLOCK_K`` step: the prologue on the input slice, then ``acc += w * x``."""
        if EVEN_K:
            mask_k = rk < BLOCK_K
        else:
            mask_k = k + rk < K
        if SILU:  # x = [gate | up]: silu(gate) * up, each rounded to the dtype like eager
            g = tl.load(x_ptr + k + rk, mask=mask_k, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + K + k + rk, mask=mask_k, other=0.0).to(tl.float32)
            a = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
            xv = (a * u).to(dtype).to(tl.float32)
        else:
            xv = tl.load(x_ptr + k + rk, mask=mask_k, other=0.0).to(tl.float32)
        if NORM:
            sq += xv * xv
            xv = xv * tl.load(nw_ptr + k + rk, mask=mask_k, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * xv[None, :]
        return acc, sq

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, nw_ptr, b_ptr, res_ptr, N, K, stride_wn, eps,
                     NORM: tl.constexpr, SILU: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr = False):
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mask_n = rn < N
        dtype = out_ptr.dtype.element_ty
        sq = tl.zeros((BLOCK_K,), dtype=tl.float32)  # NORM: sum of squares, gathered in the main loop
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        # The first weight tile is loaded before anything the previous kernel writes: with programmatic
        # dependent launch (PDL) this program starts while that kernel drains, streams its first tile, and
        # only then waits for the previous grid's results (griddepcontrol.wait) before it reads x or the residual.
        w = _weight_tile(w_ptrs, mask_n, 0, rk, K, EVEN_K)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        acc, sq = _gemv_tile(acc, sq, w, x_ptr, nw_ptr, 0, rk, K, dtype, NORM, SILU, EVEN_K, BLOCK_K)
        for k in range(BLOCK_K, K, BLOCK_K):
            w_ptrs += BLOCK_K
            w = _weight_tile(w_ptrs, mask_n, k, rk, K, EVEN_K)
            acc, sq = _gemv_tile(acc, sq, w, x_ptr, nw_ptr, k, rk, K, dtype, NORM, SILU, EVEN_K, BLOCK_K)
        out = tl.sum(acc, axis=1)
        if NORM:  # w . (nw * x) * rstd: the statistics come with the same pass over x, no pre-pass before streaming
            out = out * (1.0 / tl.sqrt(tl.sum(sq, axis=0) / K + eps)).to(tl.float32)
        if BIAS:
            out += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
        if RESIDUAL:
            out = out.to(dtype).to(tl.float32) + tl.load(res_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(out_ptr + rn, out.to(dtype), mask=mask_n)

    # the directly launched PDL op autotunes when it first runs, in every process: CompileCache keeps the chosen
    # tiles for the next one (tile_choices); Inductor bakes its own choice into its code for the triton_op
    gemv_kernel_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in CONFIGS],
        key=["N", "K", "NORM", "SILU", "BIAS", "RESIDUAL"],
    )(triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_gemv_kernel))

    @triton.jit
    def _prologue_kernel(x_ptr, nw_ptr, out_ptr, K, stride_xm, eps, NORM: tl.constexpr, SILU: tl.constexpr,
                         BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        """A rows step's input, once for all programs of the GEMM after it: ``silu(gate) * up`` (``SILU``, ``x`` is
        ``[gate | up]``; program ``(row, chunk)``) or RMSNorm (``NORM``; program ``(row, 0)`` holds the whole row),
        each rounded to the dtype as eager rounds it.

        In the one-row GEMV each program redoes its prologue while it streams weights, at no cost. In the
        rows kernel the same prologue, on a ``(16, BLOCK_K)`` tile feeding ``tl.dot``, kept the row tile out
        of Triton's load pipeline: on an H200 the fused q/k/v call of 8 rows took 60 us instead of 27, the
        SiLU down projection 186 us instead of about 25 (gpu_sweep2, 2026-12-03). A separate kernel per
        row costs one more launch (overlapped with PDL) and leaves the GEMM a plain pipelined loop.
        """
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        if PDL:  # x comes from the kernel before
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        rk = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = rk < K
        src = x_ptr + row * stride_xm
        dtype = out_ptr.dtype.element_ty
        if SILU:  # element-wise: one chunk of the row per program
            g = tl.load(src + rk, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(src + K + rk, mask=mask, other=0.0).to(tl.float32)
            a = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
            y = a * u
        else:  # NORM: the whole row in one program (BLOCK_K >= K), one load, no loop
            xv = tl.load(src + rk, mask=mask, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(xv * xv, axis=0) / K + eps)
            y = (xv * rstd).to(dtype).to(tl.float32) * tl.load(nw_ptr + rk, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * K + rk, y.to(dtype), mask=mask)

    @triton.jit
    def _rows_tile(acc, w, x_ptrs, mask_m, mask_k, F32_DOT: tl.constexpr):
        """``acc += x @ w.T`` for one ``BLOCK_K`` step of every row (rows padded to ``BLOCK_M`` with zeros)."""
        xv = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if F32_DOT:  # the same products in float32 (exact for bf16/fp16 operands), no TF32 rounding
            return tl.dot(xv.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        return tl.dot(xv, tl.trans(w), acc)

    @triton.jit
    def _rows_kernel(x_ptr, w_ptr, out_ptr, b_ptr, res_ptr, M, N, K, stride_xm, stride_wn,
                     BIAS: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, F32_DOT: tl.constexpr, PDL: tl.constexpr):
        """``x @ w.T (+ bias) (+ residual)`` for ``M <= BLOCK_M`` rows: each weight tile is read once for all.

        The rows are the dot's first operand (``(BLOCK_M, BLOCK_K)``, padded with zero rows up to
        ``BLOCK_M`` = 16, the MMA's row count), loaded as they are (any prologue ran before, in
        ``_prologue_kernel``), and the weight tile, transposed, the second: the accumulator is
        ``(BLOCK_M, BLOCK_N)``. Without PDL the loop starts at 0, so Triton's pipeliner owns every
        load; with PDL the first weight tile is loaded before ``griddepcontrol.wait``, as in ``_gemv_kernel``.
        """
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        rm = tl.arange(0, BLOCK_M)
        mask_n = rn < N
        mask_m = rm < M
        dtype = out_ptr.dtype.element_ty
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        start = 0
        if PDL:  # the first weight tile before the wait, as in _gemv_kernel
            w = _weight_tile(w_ptrs, mask_n, 0, rk, K, EVEN_K)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
            acc = _rows_tile(acc, w, x_ptrs, mask_m, rk < K, F32_DOT)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            start = BLOCK_K
        for k in range(start, K, BLOCK_K):
            w = _weight_tile(w_ptrs, mask_n, k, rk, K, EVEN_K)
            acc = _rows_tile(acc, w, x_ptrs, mask_m, k + rk < K, F32_DOT)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        if BIAS:
            acc += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        offsets = rm[:, None] * N + rn[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        if RESIDUAL:
            acc = acc.to(dtype).to(tl.float32) + tl.load(res_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, acc.to(dtype), mask=mask)

    rows_kernel_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                 for n, k, w, s in ROWS_CONFIGS],
        key=["N", "K", "BIAS", "RESIDUAL"],  # not M: the weights' stream decides the tile
    )(triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_rows_kernel))

    def launch_kernel(kernel: Any, tuned: Any, grid: Any, args: tuple, consts: dict, interpret_tile: dict,
                      pdl: bool) -> None:
        """One GEMV-family kernel, launched the way its context needs: under Triton's interpreter ``kernel`` with
        the fixed ``interpret_tile`` (it cannot time tiles); with ``pdl`` the autotuned ``tuned`` directly (Inductor's
        launcher for ``triton_op`` kernels has no PDL attribute); otherwise ``tuned`` through ``wrap_triton``, so
        a traced graph keeps it as a kernel call. Every constexpr is passed explicitly: Inductor's launcher for
        user kernels does not fill in defaults."""
        if INTERPRET:
            torch.library.wrap_triton(kernel)[grid(interpret_tile)](*args, **consts, **interpret_tile, PDL=False)
        elif pdl:
            tuned[grid](*args, **consts, PDL=True, launch_pdl=True)
        else:
            torch.library.wrap_triton(tuned)[grid](*args, **consts, PDL=False)

    def rows_prologue(x: torch.Tensor, nw: torch.Tensor | None, eps: float, silu: bool, pdl: bool) -> torch.Tensor:
        """``(M, K)`` rows ready for the GEMM: ``silu(gate) * up`` of ``(M, 2K)`` and/or RMSNorm, one program a row."""
        if silu:
            k = x.shape[1] // 2
            out = torch.empty((x.shape[0], k), dtype=x.dtype, device=x.device)
            _launch_row_kernel(x, out, out, k, eps, False, True, pdl)
            x = out
        if nw is not None:
            out = torch.empty_like(x)
            _launch_row_kernel(x, nw, out, x.shape[1], eps, True, False, pdl)
            x = out
        return x

    def _launch_row_kernel(x: torch.Tensor, nw: torch.Tensor, out: torch.Tensor, k: int, eps: float, norm: bool,
                           silu: bool, pdl: bool) -> None:
        """RMSNorm: one program a row holding all of it; SiLU: one program per ``PROLOGUE_CHUNK`` of a row.
        Latency is what counts for these small jobs (a first looped version took 3.7 us a call on an H200)."""
        block = triton.next_power_of_2(k) if norm else PROLOGUE_CHUNK
        grid = (x.shape[0], triton.cdiv(k, block))
        args = (x, nw, out, k, x.stride(0), eps)
        consts = {"NORM": norm, "SILU": silu, "BLOCK_K": block}
        warps = max(1, min(16, block // 512))
        if pdl and not INTERPRET:
            _prologue_kernel[grid](*args, **consts, PDL=True, num_warps=warps, launch_pdl=True)
        else:
            torch.library.wrap_triton(_prologue_kernel)[grid](*args, **consts, PDL=False, num_warps=warps)

    def _launch_rows(x: torch.Tensor, w: torch.Tensor, nw: torch.Tensor | None, b: torch.Tensor | None, flags: dict,
                     eps: float, residual: torch.Tensor | None, pdl: bool) -> torch.Tensor:
        """``M`` rows (2 to ``MAX_ROWS``): ``x`` is ``(M, K)`` or ``(M, 2K)`` (SiLU), returns ``(M, N)``."""
        if flags["NORM"] or flags["SILU"]:
            x = rows_prologue(x, nw, eps, flags["SILU"], pdl)
        m = x.shape[0]
        n, k = w.shape
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        res = residual.reshape(m, n).contiguous() if residual is not None else out
        b = out if b is None else b
        args = (x, w, out, b, res, m, n, k, x.stride(0), w.stride(0))
        # float32 dots for fp32 weights, and in the interpreter, whose tl.dot multiplies bf16 as raw integer bits
        fixed = {"BIAS": flags["BIAS"], "RESIDUAL": flags["RESIDUAL"], "BLOCK_M": ROW_BLOCK,
                 "F32_DOT": INTERPRET or w.dtype == torch.float32}

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]),)

        tile = dict(INTERPRET_CONFIG, EVEN_K=k % INTERPRET_CONFIG["BLOCK_K"] == 0)
        launch_kernel(_rows_kernel, rows_kernel_tuned, grid, args, fixed, tile, pdl)
        return out

    def _launch(x: torch.Tensor, w: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, silu: bool,
                bias: torch.Tensor | None, residual: torch.Tensor | None, pdl: bool = False) -> torch.Tensor:
        n, k = w.shape
        flags = {"NORM": norm_weight is not None, "SILU": silu, "BIAS": bias is not None,
                 "RESIDUAL": residual is not None}
        rows = x.shape[:-1].numel()
        if rows > 1:
            return _launch_rows(x.reshape(rows, -1).contiguous(), w, norm_weight, bias, flags, eps, residual, pdl)
        x = x.reshape(-1).contiguous()
        out = torch.empty((1, n), dtype=x.dtype, device=x.device)
        res = residual.reshape(-1).contiguous() if residual is not None else out
        nw = norm_weight if norm_weight is not None else out
        b = bias if bias is not None else out

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]),)

        tile = dict(INTERPRET_CONFIG, EVEN_K=k % INTERPRET_CONFIG["BLOCK_K"] == 0)
        launch_kernel(_gemv_kernel, gemv_kernel_tuned, grid, (x, w, out, nw, b, res, n, k, w.stride(0), eps), flags,
                      tile, pdl)
        return out

    @torch.library.triton_op("graphfix::gemv", mutates_args={})
    def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x @ w.T`` for one row ``x`` (``(1, K)``) and ``w`` ``(N, K)`` with unit stride along K."""
        return _launch(x, w, None, 0.0, False, None, None)

    @torch.library.triton_op("graphfix::fused_gemv", mutates_args={})
    def fused_gemv(x: torch.Tensor, w: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, silu: bool,
                   bias: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor:
        """``fused_linear_reference`` for 1 to ``MAX_ROWS`` rows of ``x`` (``(..., K)``), as one kernel: ``(rows, N)``."""
        return _launch(x, w, norm_weight, eps, silu, bias, residual)

    @torch.library.custom_op("graphfix::fused_gemv_pdl", mutates_args=())
    def fused_gemv_pdl(x: torch.Tensor, w: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, silu: bool,
                       bias: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor:
        """``fused_gemv`` launched with programmatic dependent launch (Hopper and newer).

        An opaque op (``custom_op``, not ``triton_op``): Inductor calls it as it is, so the
        launch keeps its PDL attribute, and CUDA-graph capture records it. Its kernel loads
        its first weight tile, then waits for the previous kernel (``griddepcontrol.wait``)
        before it reads anything that kernel may write, so the next GEMV's weight stream
        starts while the previous one drains.
        """
        return _launch(x, w, norm_weight, eps, silu, bias, residual, pdl=True)

    @fused_gemv_pdl.register_fake
    def _fused_gemv_pdl_fake(x, w, norm_weight, eps, silu, bias, residual):
        return x.new_empty((x.shape[:-1].numel(), w.shape[0]))


TILES_SCHEMA = 1


def tile_choices(device: torch.device | str = "cuda") -> dict | None:
    """The GEMV tiles the autotuner chose in this process, as JSON (``use_tile_choices`` reads it back).

    A warm start would otherwise time every tile again for each shape the directly launched
    (PDL) GEMV meets: 12.7 of a 25 s second-process start on an H200. Triton's own autotuning
    cache (``cache_results``) had the first process's timings on disk, and its lookup missed
    in the second process (docs/benchmarks.md, runs C and D). ``CompileCache`` keeps this file
    instead.
    """
    if not HAS_TRITON or INTERPRET or not torch.cuda.is_available():
        return None
    tiles = [{"kernel": name, "key": list(key), "kwargs": cfg.kwargs, "num_warps": cfg.num_warps,
              "num_stages": cfg.num_stages}
             for name, tuner in _tuners().items() for key, cfg in tuner.cache.items()]
    return {"schema": TILES_SCHEMA, "triton": triton.__version__, "device": torch.cuda.get_device_name(device),
            "tiles": tiles}


def _tuners() -> dict:
    """The directly launched (PDL) kernels' autotuners by the name ``tile_choices`` files them under."""
    return {"gemv": gemv_kernel_tuned, "rows": rows_kernel_tuned}


def use_tile_choices(choices: dict, device: torch.device | str = "cuda") -> int:
    """Give the autotuners ``tile_choices``'s tiles (same Triton and GPU only); returns how many they took.

    A tile without a ``kernel`` name (files written before the rows kernel) is the one-row GEMV's.
    """
    if not HAS_TRITON or INTERPRET or not torch.cuda.is_available():
        return 0
    if (choices.get("schema"), choices.get("triton"), choices.get("device")) != (
            TILES_SCHEMA, triton.__version__, torch.cuda.get_device_name(device)):
        return 0
    tuners = _tuners()
    offered = {name: {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages): c for c in t.configs}
               for name, t in tuners.items()}
    taken = 0
    for tile in choices.get("tiles", []):
        name = tile.get("kernel", "gemv")
        config = offered.get(name, {}).get((tile["kwargs"].get("BLOCK_N"), tile["kwargs"].get("BLOCK_K"),
                                            tile["num_warps"], tile["num_stages"]))
        if config is None:
            continue  # a tile (or kernel) this version no longer offers: let the autotuner choose again
        tuners[name].cache.setdefault(tuple(tile["key"]), config)
        taken += 1
    return taken


def kernels_serve(t: torch.Tensor) -> bool:
    """Whether the Triton kernels run on ``t``'s device and dtype: CUDA tensors in bf16/fp16; under Triton's
    interpreter (``TRITON_INTERPRET=1``: the CPU tests), CPU tensors in bf16/fp16/fp32, so that the decoder's
    kernel path runs the kernels' own code on a machine without a GPU."""
    if not HAS_TRITON:
        return False
    if t.is_cuda:
        return t.dtype in FUSED_DTYPES
    return INTERPRET and t.device.type == "cpu" and t.dtype in (*FUSED_DTYPES, torch.float32)


def triton_gemv_applies(x: torch.Tensor, weight: torch.Tensor, max_rows: int = 1) -> bool:
    """Whether the Triton GEMV serves this call: 1 to ``max_rows`` rows where ``kernels_serve``, unit stride along K.

    ``GemvLinear`` (the plain GEMV) serves one row; ``fused_linear`` up to ``MAX_ROWS``.
    """
    return (kernels_serve(x) and x.dtype == weight.dtype and weight.stride(1) == 1
            and 1 <= x.shape[:-1].numel() <= max_rows)


def pdl_supported(device: torch.device | str) -> bool:
    """Whether ``fused_linear(pdl=True)`` launches with programmatic dependent launch here (CUDA, sm_90+)."""
    device = torch.device(device)
    return (HAS_TRITON and not INTERPRET and device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device)[0] >= 9)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, *, norm_weight: torch.Tensor | None = None,
                 eps: float = 0.0, silu: bool = False, bias: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """``linear(prologue(x)) + epilogue``: one Triton kernel where it applies (1 to ``MAX_ROWS`` rows of ``x``,
    ``triton_gemv_applies``), the eager reference elsewhere.

    ``pdl``: launch it with programmatic dependent launch (``graphfix::fused_gemv_pdl``); the
    caller decides once with ``pdl_supported``, so the traced graph holds no device query.
    """
    if triton_gemv_applies(x, weight, MAX_ROWS):
        # under the interpreter, the opaque op: a traced triton_op runs its body on fake tensors, which the
        # interpreter cannot launch on (its launch ignores pdl there)
        op = torch.ops.graphfix.fused_gemv_pdl if pdl or INTERPRET else torch.ops.graphfix.fused_gemv
        out = op(x, weight, norm_weight, eps, silu, bias, residual)
        return out.view(*x.shape[:-1], weight.shape[0])
    return fused_linear_reference(x, weight, norm_weight=norm_weight, eps=eps, silu=silu, bias=bias,
                                  residual=residual)


class GemvLinear(nn.Linear):
    """``nn.Linear`` whose one-row CUDA bf16/fp16 call runs ``graphfix::gemv``; ``F.linear`` otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.bias is None and triton_gemv_applies(x, w):
            return torch.ops.graphfix.gemv(x, w).view(*x.shape[:-1], w.shape[0])
        return F.linear(x, w, self.bias)


def use_triton_gemv(model: nn.Module) -> int:
    """Switch ``model``'s bias-free ``nn.Linear`` modules to ``GemvLinear`` in place; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.bias is None:
            module.__class__ = GemvLinear
            count += 1
    return count


def use_cublas(model: nn.Module) -> int:
    """Undo ``use_triton_gemv``."""
    count = 0
    for module in model.modules():
        if type(module) is GemvLinear:
            module.__class__ = nn.Linear
            count += 1
    return count
