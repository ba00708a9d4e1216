"""The decode kernels' linears one by one, as a Llama-2-7B decode step calls them, for 1 to 16 rows.

    python benchmarks/bench_rows.py [--rows 1,2,4,8,16] [--no-pdl]

Each call is ``graphfix.engine.kernels.fused_linear`` with the prologue or epilogue the decoder
gives it (q/k/v and gate/up: RMSNorm in; o: residual add; down: SiLU-times-up in, residual add):
one row runs the GEMV, 2 to 16 rows the prologue kernel and the rows GEMM. Several copies of each
weight are cycled so that none is still in L2 when it is read again (the H200's L2 holds 50 MB,
``wo`` is 32 MB), all calls in one CUDA graph. Prints microseconds and GB/s per call, the error
against ``fused_linear_reference`` in float32, and per row count the sum over one layer's four
calls and the per-sequence rate against one row (what a batched decode step can reach).
"""

from __future__ import annotations

import argparse

import torch

from graphfix.bench.timing import cuda_graph_ms
from graphfix.engine.kernels import fused_linear, fused_linear_reference

CALLS = {"wqkv": (12288, 4096, {"norm": True}), "wo": (4096, 4096, {"residual": True}),
         "w13": (22016, 4096, {"norm": True}), "w2": (4096, 11008, {"silu": True, "residual": True})}
L2_BYTES = 200e6
"""Bytes of distinct weights cycled per capture: several times any GPU's L2."""


def _inputs(rows: int, n: int, k: int, flags: dict, device: str) -> dict:
    x = torch.randn(rows, 1, 2 * k if flags.get("silu") else k, device=device, dtype=torch.bfloat16)
    return {"x": x, "norm_weight": torch.rand(k, device=device, dtype=torch.bfloat16) + 0.5 if flags.get("norm") else None,
            "eps": 1e-5, "silu": bool(flags.get("silu")),
            "residual": torch.randn(rows, 1, n, device=device, dtype=torch.bfloat16) if flags.get("residual") else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,2,4,8,16")
    p.add_argument("--no-pdl", action="store_true", help="launch without programmatic dependent launch")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    rows_list = [int(r) for r in args.rows.split(",")]
    pdl = not args.no_pdl
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name(args.device)}, torch {torch.__version__}, pdl={pdl}", flush=True)
    layer_us: dict[int, float] = {}
    for name, (n, k, flags) in CALLS.items():
        copies = max(2, int(L2_BYTES // (n * k * 2)) + 1)
        weights = [torch.randn(n, k, device=args.device, dtype=torch.bfloat16) * k ** -0.5 for _ in range(copies)]
        for rows in rows_list:
            kw = _inputs(rows, n, k, flags, args.device)
            x = kw.pop("x")
            out = fused_linear(x, weights[0], pdl=pdl, **kw)
            ref = fused_linear_reference(x.float(), weights[0].float(),
                                         **{a: (b.float() if torch.is_tensor(b) else b) for a, b in kw.items()})
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()

            def every_copy(x=x, kw=kw, weights=weights):
                return [fused_linear(x, w, pdl=pdl, **kw) for w in weights]

            ms, _ = cuda_graph_ms(every_copy, reps=4, repeats=5)
            us = ms * 1e3 / copies
            layer_us[rows] = layer_us.get(rows, 0.0) + us
            print(f"{name:5s} rows {rows:2d} {us:8.1f} us {n * k * 2 / us / 1e3:6.0f} GB/s  rel err {err:.1e}", flush=True)
    weight_bytes = sum(n * k * 2 for n, k, _ in CALLS.values())
    base = layer_us.get(1)
    for rows, us in sorted(layer_us.items()):
        rate = f"  per-sequence rate against 1 row: {base / us:.2f}" if base else ""
        print(f"layer rows {rows:2d} {us:8.1f} us {weight_bytes / us / 1e3:6.0f} GB/s  x32 layers {us * 32 / 1e3:5.2f} ms"
              + rate, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
