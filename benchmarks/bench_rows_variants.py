"""Skinny-GEMM variants for 1 to 16 rows on the Llama-2-7B linears, no prologue: which layout the rows kernel takes.

    python benchmarks/bench_rows_variants.py [ROWS=1,4,8] [VARIANTS=xa,wa,fma,cur,cublas]

``xa``: rows as the dot's first operand (what ``kernels._rows_kernel`` became); ``wa``: the weight tile first;
``fma``: no tensor cores, a CUDA-core broadcast product; ``cur``: graphfix's ``fused_gemv`` with no prologue
or epilogue; ``cublas``: ``F.linear``. Each variant is autotuned over its tiles; the weights are cycled over
copies larger than L2, all calls in one CUDA graph. These kernels assume K divisible by every ``BLOCK_K``, so
the down projection (K = 11,008) is left out. The result (docs/benchmarks.md, 2026-12-03): the GEMM was as
fast as the GEMV and cuBLAS; what made the batched step slow was the prologues in its loop (bench_rows.py).
"""
import sys
import time

import torch
import triton
import triton.language as tl

import graphfix.engine.kernels  # noqa: F401 - registers graphfix::fused_gemv
from graphfix.bench.timing import cycled_us

DEV = "cuda"
DT = torch.bfloat16
SHAPES = {"wqkv": (12288, 4096), "wo": (4096, 4096), "w13": (22016, 4096)}
MS = [int(m) for m in (sys.argv[1] if len(sys.argv) > 1 else "1,4,8").split(",")]
VARIANTS = (sys.argv[2] if len(sys.argv) > 2 else "xa,wa,fma,cur,cublas").split(",")


def bench_fast(fn, quantiles=None):
    return triton.testing.do_bench(fn, warmup=3, rep=12, quantiles=quantiles)


@triton.jit
def k_xa(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        w = tl.load(w_ptrs, eviction_policy="evict_first")
        x = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=rm[:, None] < M)


@triton.jit
def k_wa(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    x_ptrs = x_ptr + rm[None, :] * stride_xm + rk[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        w = tl.load(w_ptrs, eviction_policy="evict_first")
        x = tl.load(x_ptrs, mask=rm[None, :] < M, other=0.0)
        acc = tl.dot(w, x, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    tl.store(out_ptr + rm[None, :] * N + rn[:, None], acc.to(out_ptr.dtype.element_ty), mask=rm[None, :] < M)


@triton.jit
def k_fma(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        w = tl.load(w_ptrs, eviction_policy="evict_first").to(tl.float32)
        x = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0).to(tl.float32)
        acc += x[:, None, :] * w[None, :, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    out = tl.sum(acc, axis=2)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], out.to(out_ptr.dtype.element_ty), mask=rm[:, None] < M)


MMA_CFG = [(16, 256, 4, 3), (16, 256, 4, 4), (16, 256, 4, 5), (16, 512, 4, 3), (16, 512, 4, 4), (16, 512, 8, 3),
           (16, 128, 4, 4), (16, 128, 4, 6), (16, 1024, 8, 3), (32, 128, 4, 4), (32, 128, 4, 5), (32, 256, 4, 3),
           (32, 256, 4, 4), (32, 256, 8, 4), (32, 512, 8, 3), (64, 64, 4, 4), (64, 64, 4, 6), (64, 128, 4, 4),
           (64, 128, 4, 5), (64, 128, 8, 4), (64, 256, 8, 3), (128, 64, 4, 4), (128, 128, 8, 3)]
FMA_CFG = [(2, 256, 4, 3), (2, 512, 4, 3), (4, 256, 4, 3), (4, 256, 4, 4), (4, 512, 8, 3), (8, 128, 4, 4),
           (8, 256, 8, 3), (2, 1024, 8, 3), (1, 1024, 4, 3), (4, 128, 4, 4)]


def tuned(kernel, cfgs):
    return triton.autotune(
        configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in cfgs],
        key=["M", "N", "K"], do_bench=bench_fast)(kernel)


TUNED = {"xa": tuned(k_xa, MMA_CFG), "wa": tuned(k_wa, MMA_CFG), "fma": tuned(k_fma, FMA_CFG)}


def call(variant, x, w):
    m, k = x.shape
    n = w.shape[0]
    if variant == "cublas":
        return torch.nn.functional.linear(x, w)
    if variant == "cur":
        return torch.ops.graphfix.fused_gemv(x, w, None, 0.0, False, None, None)
    out = torch.empty((m, n), device=DEV, dtype=DT)
    bm = 16 if variant in ("xa", "wa") else triton.next_power_of_2(m)
    TUNED[variant][lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        x, w, out, m, n, k, x.stride(0), w.stride(0), BLOCK_M=bm)
    return out


def main():
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    totals = {}
    for name, (n, k) in SHAPES.items():
        copies = max(2, int(200e6 // (n * k * 2)) + 1)  # > L2 between reuses
        ws = [torch.randn(n, k, device=DEV, dtype=DT) * k ** -0.5 for _ in range(copies)]
        for m in MS:
            x = torch.randn(m, k, device=DEV, dtype=DT)
            ref = torch.nn.functional.linear(x.float(), ws[0].float())
            for v in VARIANTS:
                if v == "fma" and m > 8:
                    continue
                t0 = time.time()
                try:
                    out = call(v, x, ws[0])
                    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                    us = cycled_us(lambda w, v=v, x=x: call(v, x, w), ws)
                except Exception as e:  # noqa: BLE001
                    print(f"{name:5s} M={m:2d} {v:7s} FAILED {type(e).__name__}: {str(e)[:160]}", flush=True)
                    continue
                gbs = n * k * 2 / us / 1e3
                best = TUNED[v].best_config if v in TUNED else ""
                totals[(v, m)] = totals.get((v, m), 0.0) + us
                print(f"{name:5s} M={m:2d} {v:7s} {us:8.1f} us {gbs:6.0f} GB/s err {err:.1e} tune {time.time()-t0:5.1f}s "
                      f"{best}", flush=True)
    print("sum over the shapes, us:", flush=True)
    for (v, m), us in sorted(totals.items(), key=lambda t: (t[0][1], t[1])):
        byts = sum(n * k * 2 for n, k in SHAPES.values())
        print(f"  M={m:2d} {v:7s} {us:8.1f} us {byts / us / 1e3:6.0f} GB/s",
              flush=True)


if __name__ == "__main__":
    main()
