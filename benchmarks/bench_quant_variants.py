"""Dequantizing GEMV variants on the Llama-2-7B linears, 1 to 16 rows: which design the quantized kernels take.

    python benchmarks/bench_quant_variants.py [ROWS=1,8] [SCHEMES=int8,int4:128,int4:64] [VARIANTS=...]
    TRITON_INTERPRET=1 python benchmarks/bench_quant_variants.py --check     # the variants' arithmetic, on CPU

Why: on an H200 (2026-12-03, ``bench_quant.py --parts gemv``) ``graphfix::qgemv`` streamed int8 at 2.0-2.8 TB/s
and int4 at 0.65-0.96 TB/s against bf16's 3.1-4.0: the one-row kernel converts every code with ``I2F`` (an
eighth of the FMA rate on Hopper by the CUDA programming guide) and regroups int4 tiles with ``tl.reshape``.
The variants:

- ``cur``: ``graphfix::qgemv`` as it is;
- ``fma``: CUDA-core products like ``cur``, codes turned into float32 with the exponent trick
  (``code | 0x4B000000`` read as float32 is ``2**23 + code``: an integer OR and one subtraction instead of a
  conversion) and int4 tiles loaded as ``(rows, groups, bytes)`` so that no reshape moves data;
- ``dot``: tensor cores; the rows padded to 16 as the dot's first operand, codes made bf16 by the exponent trick
  (``code | 0x4300`` read as bf16 is ``128 + code``; the 128 is taken out once per group through the group's sum of
  ``x``), one group per step for int4 (its scale and zero then apply to the dot's result), int8 split into two
  nibbles (bf16 holds 8 bits of mantissa, not 9);
- ``dotw``: ``dot`` with the weight tile as the first operand (it can stay in registers on Hopper).

No prologue or epilogue (the decoder's RMSNorm and SiLU run in ``rows_prologue`` for several rows). Weights are
cycled over copies larger than L2; every call of a shape in one CUDA graph.
"""
from __future__ import annotations

import os
import sys
import time

import torch
import triton
import triton.language as tl

from graphfix.bench.timing import cycled_us

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ROUND_TRIP: tl.constexpr = tl.constexpr(INTERPRET)
"""The interpreter's ``tl.dot`` on bf16 multiplies raw bits: there both operands go to float32 first."""

# ---------------------------------------------------------------------------------------------- int8, per channel


@triton.jit
def k_int8_fma(x_ptr, q_ptr, s_ptr, out_ptr, M, N, K, stride_qn,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """One row (``BLOCK_M`` is 1): ``out = (q . x) * s`` with codes made float by the exponent trick."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    q_ptrs = q_ptr + rn[:, None].to(tl.int64) * stride_qn + rk[None, :]
    for k in range(0, K, BLOCK_K):
        mask_k = k + rk < K
        q = tl.load(q_ptrs, mask=mask_k[None, :], other=0, eviction_policy="evict_first")
        u = q.to(tl.uint8, bitcast=True).to(tl.int32)
        w = ((u ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0  # 2**23 + 128
        x = tl.load(x_ptr + k + rk, mask=mask_k, other=0.0).to(tl.float32)
        acc += w * x[None, :]
        q_ptrs += BLOCK_K
    s = tl.load(s_ptr + rn).to(tl.float32)
    tl.store(out_ptr + rn, (tl.sum(acc, axis=1) * s).to(out_ptr.dtype.element_ty))


@triton.jit
def _nibble_bf16(u):
    """``u`` in [0, 15] (int16) -> bf16 ``128 + u``: the exponent of 128 with ``u`` as its mantissa's low bits."""
    return (u | 0x4300).to(tl.bfloat16, bitcast=True)


@triton.jit
def _mma(a, b, acc):
    if ROUND_TRIP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def k_int8_dot(x_ptr, q_ptr, s_ptr, out_ptr, M, N, K, stride_qn,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, W_FIRST: tl.constexpr):
    """``q + 128 = 16 hi + lo``: ``q . x = 16 (m_hi . x) + (m_lo . x) - 2304 sum(x)`` with ``m = 128 + nibble``."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    q_ptrs = q_ptr + rn[:, None].to(tl.int64) * stride_qn + rk[None, :]
    x_ptrs = x_ptr + rm[:, None] * K + rk[None, :]
    if W_FIRST:
        acc_hi = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_lo = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc_hi = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_lo = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xs = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        q = tl.load(q_ptrs, eviction_policy="evict_first")
        x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        u = (q.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.int16)
        hi = _nibble_bf16(u >> 4)
        lo = _nibble_bf16(u & 0xF)
        xs += tl.sum(x.to(tl.float32), axis=1)
        if W_FIRST:
            acc_hi = _mma(hi, tl.trans(x), acc_hi)
            acc_lo = _mma(lo, tl.trans(x), acc_lo)
        else:
            acc_hi = _mma(x, tl.trans(hi), acc_hi)
            acc_lo = _mma(x, tl.trans(lo), acc_lo)
        q_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    s = tl.load(s_ptr + rn).to(tl.float32)
    if W_FIRST:
        out = (16.0 * acc_hi + acc_lo - 2304.0 * xs[None, :]) * s[:, None]
        tl.store(out_ptr + rm[None, :] * N + rn[:, None], out.to(out_ptr.dtype.element_ty), mask=mask_m[None, :])
    else:
        out = (16.0 * acc_hi + acc_lo - 2304.0 * xs[:, None]) * s[None, :]
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])


# ------------------------------------------------------------------------------------ int4, groups, affine, packed


@triton.jit
def k_int4_fma(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_qn, stride_sn,
               BLOCK_N: tl.constexpr, NG: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """One row; a tile is ``NG`` groups, loaded ``(BLOCK_N, NG, GROUP // 2)`` so that per-group sums need no
    reshape; codes made float by the exponent trick."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rg = tl.arange(0, NG)
    rh = tl.arange(0, GROUP // 2)
    acc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    q_ptrs = q_ptr + rn[:, None, None].to(tl.int64) * stride_qn + rg[None, :, None] * (GROUP // 2) + rh[None, None, :]
    x_off = rg[:, None] * GROUP + 2 * rh[None, :]
    for g0 in range(0, K // GROUP, NG):
        live = (g0 + rg) < K // GROUP  # K need not be a multiple of the tile (the down projection's 11,008)
        b = tl.load(q_ptrs, mask=live[None, :, None], other=0, eviction_policy="evict_first").to(tl.int32)
        lo = ((b & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        hi = ((b >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        xe = tl.load(x_ptr + g0 * GROUP + x_off, mask=live[:, None], other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + g0 * GROUP + x_off + 1, mask=live[:, None], other=0.0).to(tl.float32)
        part = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)
        xs = tl.sum(xe + xo, axis=1)
        so = rn[:, None] * stride_sn + g0 + rg[None, :]
        s = tl.load(s_ptr + so, mask=live[None, :], other=0.0).to(tl.float32)
        z = tl.load(z_ptr + so, mask=live[None, :], other=0.0).to(tl.float32)
        acc += part * s + z * xs[None, :]
        q_ptrs += NG * (GROUP // 2)
    tl.store(out_ptr + rn, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty))


@triton.jit
def k_int4_dot(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_qn, stride_sn,
               BLOCK_N: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, W_FIRST: tl.constexpr):
    """A group a step: ``t = x . (128 + q)`` on tensor cores, then ``acc += t * s + sum(x) * (z - 128 s)``."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rh = tl.arange(0, GROUP // 2)
    rk = tl.arange(0, GROUP)
    mask_m = rm < M
    q_ptrs = q_ptr + rn[:, None].to(tl.int64) * stride_qn + rh[None, :]
    x_ptrs = x_ptr + rm[:, None] * K + rk[None, :]
    if W_FIRST:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(K // GROUP):
        b = tl.load(q_ptrs, eviction_policy="evict_first").to(tl.int16)
        x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        w = tl.interleave(_nibble_bf16(b & 0xF), _nibble_bf16(b >> 4))
        s = tl.load(s_ptr + rn * stride_sn + g).to(tl.float32)
        zc = tl.load(z_ptr + rn * stride_sn + g).to(tl.float32) - 128.0 * s
        xs = tl.sum(x.to(tl.float32), axis=1)
        if W_FIRST:
            t = _mma(w, tl.trans(x), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32))
            acc += t * s[:, None] + zc[:, None] * xs[None, :]
        else:
            t = _mma(x, tl.trans(w), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32))
            acc += t * s[None, :] + xs[:, None] * zc[None, :]
        q_ptrs += GROUP // 2
        x_ptrs += GROUP
    if W_FIRST:
        tl.store(out_ptr + rm[None, :] * N + rn[:, None], acc.to(out_ptr.dtype.element_ty), mask=mask_m[None, :])
    else:
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])


# --------------------------------------------------------------------------------------------------- the harness


def bench_fast(fn, quantiles=None):
    return triton.testing.do_bench(fn, warmup=3, rep=12, quantiles=quantiles)


def _tuned(kernel, cfgs, names):
    if INTERPRET:
        return kernel
    return triton.autotune(configs=[triton.Config(dict(zip(names, c[:-2])), num_warps=c[-2], num_stages=c[-1])
                                    for c in cfgs], key=["M", "N", "K"], do_bench=bench_fast)(kernel)


INT8_FMA_CFG = [(2, 512, 4, 3), (4, 512, 4, 3), (4, 1024, 4, 3), (8, 256, 4, 4), (8, 512, 8, 3), (2, 1024, 4, 4),
                (1, 2048, 4, 3), (4, 256, 4, 4), (16, 256, 8, 3)]
DOT_CFG = [(16, 128, 4, 4), (16, 256, 4, 3), (16, 256, 4, 4), (16, 512, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3),
           (32, 256, 4, 4), (32, 512, 8, 3), (64, 128, 4, 4), (64, 256, 8, 3), (16, 1024, 8, 3), (32, 128, 4, 6)]
INT4_FMA_CFG = [(2, 8, 4, 3), (4, 8, 4, 3), (4, 16, 8, 3), (8, 4, 4, 3), (8, 8, 8, 3), (2, 16, 4, 3), (16, 4, 4, 3),
                (4, 4, 4, 4), (1, 16, 4, 3)]
INT4_DOT_CFG = [(16, 4, 3), (16, 4, 5), (16, 4, 8), (32, 4, 4), (32, 4, 6), (32, 4, 8), (64, 4, 4), (64, 4, 6),
                (64, 8, 4), (128, 8, 4), (16, 2, 6), (32, 2, 6)]

TUNED = {
    ("int8", "fma"): _tuned(k_int8_fma, INT8_FMA_CFG, ("BLOCK_N", "BLOCK_K")),
    ("int8", "dot"): _tuned(k_int8_dot, DOT_CFG, ("BLOCK_N", "BLOCK_K")),
    ("int8", "dotw"): _tuned(k_int8_dot, DOT_CFG, ("BLOCK_N", "BLOCK_K")),
    ("int4", "fma"): _tuned(k_int4_fma, INT4_FMA_CFG, ("BLOCK_N", "NG")),
    ("int4", "dot"): _tuned(k_int4_dot, INT4_DOT_CFG, ("BLOCK_N",)),
    ("int4", "dotw"): _tuned(k_int4_dot, INT4_DOT_CFG, ("BLOCK_N",)),
}
INTERPRET_TILE = {("int8", "fma"): {"BLOCK_N": 4, "BLOCK_K": 64}, ("int8", "dot"): {"BLOCK_N": 16, "BLOCK_K": 64},
                  ("int8", "dotw"): {"BLOCK_N": 16, "BLOCK_K": 64}, ("int4", "fma"): {"BLOCK_N": 4, "NG": 2},
                  ("int4", "dot"): {"BLOCK_N": 16}, ("int4", "dotw"): {"BLOCK_N": 16}}


def call(variant: str, scheme: str, x: torch.Tensor, p) -> torch.Tensor:
    """``p``: a ``graphfix.quant.scheme.Packed``; ``x``: ``(M, K)``."""
    m, k = x.shape
    n = p.codes.shape[0]
    bits = 8 if scheme.startswith("int8") else 4
    group = int(scheme.split(":")[1]) if ":" in scheme else 0
    if variant == "cur":
        return torch.ops.graphfix.qgemv(x, p.codes, p.scales, p.zeros, None, 0.0, False, None, None, bits, group)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    kind = "int8" if bits == 8 else "int4"
    kernel = TUNED[(kind, variant)]
    tile = INTERPRET_TILE[(kind, variant)] if INTERPRET else {}
    extra = {} if variant == "fma" else {"W_FIRST": variant == "dotw"}
    bm = 1 if variant == "fma" else 16

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)
    if kind == "int8":
        kernel[grid](x, p.codes, p.scales, out, m, n, k, p.codes.stride(0), BLOCK_M=bm, **extra, **tile)
    else:
        kernel[grid](x, p.codes, p.scales, p.zeros, out, m, n, k, p.codes.stride(0), p.scales.stride(0),
                     GROUP=group, BLOCK_M=bm, **extra, **tile)
    return out


def _packed(n: int, k: int, scheme: str, device: str):
    from graphfix.quant.scheme import parse_scheme, quantize_weight

    w = torch.randn(n, k, device=device) * k ** -0.5
    return quantize_weight(w, parse_scheme(scheme))


def check() -> int:
    """Every variant against dequantize-then-matmul on small shapes (CPU, Triton's interpreter): exit 1 on a miss."""
    from graphfix.quant.scheme import dequantize_packed

    torch.manual_seed(0)
    bad = 0
    for scheme in ("int8", "int4:64", "int4:128"):
        p = _packed(32, 512, scheme, "cpu")
        ref_w = dequantize_packed(p, torch.float32)
        for variant in ("fma", "dot", "dotw"):
            for m in ((1,) if variant == "fma" else (1, 3)):
                x = torch.randn(m, 512).to(torch.bfloat16)
                ref = x.float() @ ref_w.T
                out = call(variant, scheme, x, p).float()
                err = ((out - ref).norm() / ref.norm()).item()
                ok = err < 1.6e-2
                bad += not ok
                print(f"{scheme:8s} {variant:5s} M={m} rel err {err:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    return 1 if bad else 0


SHAPES = {"wqkv": (12288, 4096), "wo": (4096, 4096), "w13": (22016, 4096), "w2": (4096, 11008)}


def main() -> None:
    import graphfix.quant.kernels  # noqa: F401 - registers graphfix::qgemv

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    rows = [int(m) for m in (args[0] if args else "1,8").split(",")]
    schemes = (args[1] if len(args) > 1 else "int8,int4:128,int4:64").split(",")
    variants = (args[2] if len(args) > 2 else "cur,fma,dot,dotw").split(",")
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    totals: dict = {}
    for scheme in schemes:
        for name, (n, k) in SHAPES.items():
            p0 = _packed(n, k, scheme, "cuda")
            nbytes = sum(t.numel() * t.element_size() for t in (p0.codes, p0.scales, p0.zeros) if t is not None)
            copies = max(2, int(200e6 // nbytes) + 1)
            ps = [p0] + [_packed(n, k, scheme, "cuda") for _ in range(copies - 1)]
            from graphfix.quant.scheme import dequantize_packed

            ref_w = dequantize_packed(p0, torch.float32)
            for m in rows:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = x.float() @ ref_w.T
                for v in variants:
                    if (v == "fma" and m > 1) or (v in ("dot", "dotw") and scheme == "int8" and k % 1024):
                        continue  # one row only; the int8 dot variants assume K a multiple of every BLOCK_K
                    t0 = time.time()
                    try:
                        out = call(v, scheme, x, p0)
                        err = ((out.float() - ref).norm() / ref.norm()).item()
                        us = cycled_us(lambda p, v=v, x=x, scheme=scheme: call(v, scheme, x, p), ps)
                    except Exception as e:  # noqa: BLE001
                        print(f"{scheme:8s} {name:5s} M={m:2d} {v:5s} FAILED {type(e).__name__}: {str(e)[:200]}",
                              flush=True)
                        continue
                    kind = "int8" if scheme.startswith("int8") else "int4"
                    best = getattr(TUNED.get((kind, v)), "best_config", "")
                    totals[(scheme, v, m)] = totals.get((scheme, v, m), 0.0) + us
                    totals[(scheme, "bytes", m)] = totals.get((scheme, "bytes", m), 0) + (nbytes if v == variants[0]
                                                                                         else 0)
                    print(f"{scheme:8s} {name:5s} M={m:2d} {v:5s} {us:8.1f} us {nbytes / us / 1e3:6.0f} GB/s "
                          f"err {err:.1e} tune {time.time() - t0:5.1f}s {best}", flush=True)
            del ps
    print("sum over the shapes:", flush=True)
    for (scheme, v, m), us in sorted(totals.items()):
        if v != "bytes":
            byts = totals[(scheme, "bytes", m)]
            print(f"  {scheme:8s} M={m:2d} {v:5s} {us:8.1f} us {byts / us / 1e3:6.0f} GB/s", flush=True)


if __name__ == "__main__":
    sys.exit(check() if "--check" in sys.argv else main())
