"""The decode step's linears alone, as one CUDA graph: cuBLAS, the Triton GEMV, and the GEMV with PDL.

A batch-1 decode step is a chain of GEMVs whose weights are read once; this measures
that chain without attention or the KV cache, so the figures isolate how close the
GEMVs come to the copy bandwidth and what launching them with programmatic dependent
launch (``graphfix::fused_gemv_pdl``, sm_90+) buys at the kernel boundaries.

Per layer, in the order of ``Block.decode_fused``, each output feeding the next input:
q/k/v (RMSNorm folded in), o (residual add), gate/up (RMSNorm), down (SiLU·mul, residual),
then the output head. ``cublas`` runs the same shapes through ``F.linear`` with no prologue
or epilogue (a lower bound on cuBLAS's cost, not the same arithmetic).

    python benchmarks/bench_gemv.py [--model llama-2-7b] [--rows 8] [--json out.json]

``--rows`` (default 1): the chains run on that many rows, one token each (a batched decode
step): 2 to 16 rows run the rows kernel (``kernels._rows_kernel``, each weight tile read once
for all rows) against cuBLAS's GEMMs.

Prints one line per chain: ms per step, GB/s of weights, fraction of the copy bandwidth,
and the largest difference of the PDL chain's output from the plain chain's (PDL changes
when kernels start, never what they compute: it must be 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from graphfix.bench.presets import PRESETS
from graphfix.bench.timing import copy_bandwidth, cuda_graph_ms


def _weights(cfg: dict, layers: int, device: torch.device, dtype: torch.dtype) -> dict:
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd

    def mat(n: int, k: int) -> torch.Tensor:
        return torch.randn(n, k, device=device, dtype=dtype) * k ** -0.5

    per_layer = [{"qkv": mat(d + 2 * kv, d), "o": mat(d, d), "w13": mat(2 * f, d), "w2": mat(d, f),
                  "n1": torch.ones(d, device=device, dtype=dtype), "n2": torch.ones(d, device=device, dtype=dtype)}
                 for _ in range(layers)]
    return {"layers": per_layer, "out": mat(v, d), "norm": torch.ones(d, device=device, dtype=dtype), "d": d}


def _chain(w: dict, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    d = w["d"]
    if kind == "cublas":
        def step(h: torch.Tensor) -> torch.Tensor:
            for lw in w["layers"]:
                qkv = F.linear(h, lw["qkv"])
                h = F.linear(qkv[:, :d], lw["o"])
                g = F.linear(h, lw["w13"])
                h = F.linear(g[:, : g.shape[1] // 2], lw["w2"])
            return F.linear(h, w["out"])
        return step
    op = torch.ops.graphfix.fused_gemv_pdl if kind == "pdl" else torch.ops.graphfix.fused_gemv

    def step(h: torch.Tensor) -> torch.Tensor:
        for lw in w["layers"]:
            qkv = op(h, lw["qkv"], lw["n1"], 1e-5, False, None, None)
            h = op(qkv[:, :d], lw["o"], None, 0.0, False, None, h)
            g = op(h, lw["w13"], lw["n2"], 1e-5, False, None, None)
            h = op(g, lw["w2"], None, 0.0, True, None, h)
        return op(h, w["out"], w["norm"], 1e-5, False, None, None)
    return step


def _graph_ms(step: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, reps: int) -> tuple[float, torch.Tensor]:
    """``step(x)`` as one CUDA graph: ms per replay (median of 5 timings) and a copy of its output."""
    ms, out = cuda_graph_ms(lambda: step(x), reps, repeats=5)
    return ms, out.clone()


LINEAR_FLAGS = {"qkv": ("n1", False, False), "o": (None, False, True), "w13": ("n2", False, False),
                "w2": (None, True, True)}
"""Each linear kind's fused prologue/epilogue in ``Block.decode_fused``: (norm weight, SiLU·mul, residual add)."""


def _linear_inputs(w: dict, name: str, silu: bool) -> tuple[list, int, int, torch.Tensor, torch.Tensor]:
    """All layers' weights of one linear kind, its shape, a random input row and a residual row."""
    mats = [lw[name] for lw in w["layers"]]
    n, k = mats[0].shape
    xin = torch.randn(1, 2 * k if silu else k, device=mats[0].device, dtype=mats[0].dtype)
    return mats, n, k, xin, torch.randn(1, n, device=xin.device, dtype=xin.dtype)


def per_shape(w: dict, x: torch.Tensor, reps: int, copy: float) -> list[dict]:
    """Each linear kind alone: one graph of all layers' calls of it, cuBLAS against the Triton GEMV (with its flags)."""
    rows = []
    for name, (norm, silu, residual) in LINEAR_FLAGS.items():
        mats, n, k, xin, res = _linear_inputs(w, name, silu)
        xk = xin[:, :k]

        def cublas(_: torch.Tensor, mats=mats, xk=xk) -> torch.Tensor:
            return [F.linear(xk, m) for m in mats][-1]  # all calls are in the graph; one output is kept

        def triton(_: torch.Tensor, mats=mats, name=name, norm=norm, silu=silu, residual=residual, xin=xin,
                   res=res) -> torch.Tensor:
            return [torch.ops.graphfix.fused_gemv(xin, m, lw[norm] if norm else None, 1e-5, silu, None,
                                                  res if residual else None)
                    for m, lw in zip(mats, w["layers"])][-1]

        nbytes = sum(m.numel() * m.element_size() for m in mats)
        row = {"linear": name, "n": n, "k": k, "calls": len(mats)}
        for label, fn in (("cublas", cublas), ("triton", triton)):
            ms, _ = _graph_ms(fn, x, reps)
            row[f"{label}_us"] = 1000 * ms / len(mats)
            row[f"{label}_gb_per_s"] = nbytes / ms / 1e6
            row[f"{label}_fraction_of_copy_bw"] = nbytes / ms / 1e6 / copy
        rows.append(row)
    return rows


SWEEP = [  # (BLOCK_N, BLOCK_K, num_warps, num_stages): the autotuned list and wider or deeper neighbours
    (2, 1024, 4, 4), (4, 512, 4, 4), (4, 1024, 4, 3), (8, 256, 4, 4), (8, 512, 4, 3), (8, 512, 8, 4),
    (8, 1024, 8, 3), (16, 256, 4, 4), (16, 512, 8, 3), (32, 128, 4, 4), (32, 256, 8, 3), (64, 128, 8, 3),
]


def _tile_chain(mats: list, layers: list, xin: torch.Tensor, out: torch.Tensor, res: torch.Tensor, norm: str | None,
                silu: bool, residual: bool, tile: tuple[int, int, int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    import triton

    from graphfix.engine.kernels import _gemv_kernel

    n, k = mats[0].shape
    bn, bk, nw, ns = tile

    def fn(_: torch.Tensor) -> torch.Tensor:
        for m, lw in zip(mats, layers):
            _gemv_kernel[(triton.cdiv(n, bn),)](
                xin, m, out, lw[norm] if norm else out, out, res, n, k, m.stride(0), 1e-5,
                NORM=norm is not None, SILU=silu, BIAS=False, RESIDUAL=residual, BLOCK_N=bn, BLOCK_K=bk,
                EVEN_K=k % bk == 0, PDL=False, num_warps=nw, num_stages=ns)
        return out
    return fn


def sweep(w: dict, reps: int, copy: float) -> list[dict]:
    """Every tile in ``SWEEP`` for each linear kind (with its flags), launched directly: is a better tile missing?"""
    rows = []
    for name, (norm, silu, residual) in LINEAR_FLAGS.items():
        mats, n, _, xin, res = _linear_inputs(w, name, silu)
        out = torch.empty(1, n, device=xin.device, dtype=xin.dtype)
        nbytes = sum(m.numel() * m.element_size() for m in mats)
        for bn, bk, nw, ns in SWEEP:
            fn = _tile_chain(mats, w["layers"], xin, out, res, norm, silu, residual, (bn, bk, nw, ns))
            try:
                ms, _ = _graph_ms(fn, xin, reps)
            except Exception as exc:  # noqa: BLE001 - a tile that does not compile or launch is reported, not fatal
                rows.append({"linear": name, "tile": [bn, bk, nw, ns], "error": f"{type(exc).__name__}"})
                continue
            rows.append({"linear": name, "tile": [bn, bk, nw, ns], "us": 1000 * ms / len(mats),
                         "fraction_of_copy_bw": nbytes / ms / 1e6 / copy})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-2-7b", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, help="default: the preset's")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rows", type=int, default=1, help="rows per step (1 to 16 run the Triton kernels)")
    p.add_argument("--chains", default="cublas,triton,pdl")
    p.add_argument("--per-shape", action="store_true",
                   help="also each linear alone (its 32 layers' weights back to back): cuBLAS and the Triton GEMV")
    p.add_argument("--sweep", action="store_true", help="also every tile of SWEEP per linear kind")
    p.add_argument("--json", dest="json_path")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gemv: needs a CUDA GPU", file=sys.stderr)
        return 2
    from graphfix.engine import kernels

    if not kernels.HAS_TRITON:
        print("bench_gemv: needs triton", file=sys.stderr)
        return 2
    device, dtype = torch.device("cuda"), torch.bfloat16
    cfg = PRESETS[args.model]
    copy = copy_bandwidth(device)["gb_per_s"]
    w = _weights(cfg, args.layers or cfg["num_hidden_layers"], device, dtype)
    nbytes = sum(t.numel() * t.element_size() for lw in w["layers"] for t in lw.values()) + 2 * w["out"].numel()
    x = torch.randn(args.rows, w["d"], device=device, dtype=dtype)
    rows, outs = [], {}
    chains = [c for c in args.chains.split(",") if c]
    if "pdl" in chains and not kernels.pdl_supported(device):
        print("bench_gemv: PDL needs sm_90+; skipping the pdl chain", file=sys.stderr)
        chains.remove("pdl")
    with torch.no_grad():
        for kind in chains:
            ms, outs[kind] = _graph_ms(_chain(w, kind), x, args.reps)
            rows.append({"chain": kind, "ms_per_step": ms, "gb_per_s": nbytes / ms / 1e6,
                         "fraction_of_copy_bw": nbytes / ms / 1e6 / copy})
        shape_rows = per_shape(w, x, args.reps, copy) if args.per_shape else []
        sweep_rows = sweep(w, args.reps, copy) if args.sweep else []
    doc = {"schema": "graphfix.bench_gemv/1", "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
           "model": args.model, "rows_per_step": args.rows, "weight_bytes": nbytes, "copy_gb_per_s": copy, "rows": rows}
    if "pdl" in outs and "triton" in outs:
        doc["pdl_max_abs_diff"] = (outs["pdl"].float() - outs["triton"].float()).abs().max().item()
    print(f"{doc['device']}, {args.model}, {args.rows} row(s), {nbytes / 1e9:.2f} GB of weights, copy bandwidth {copy:.0f} GB/s")
    print(f"{'chain':<8} {'ms/step':>8} {'GB/s':>7} {'of copy':>8}")
    for r in rows:
        print(f"{r['chain']:<8} {r['ms_per_step']:>8.3f} {r['gb_per_s']:>7.0f} {r['fraction_of_copy_bw']:>8.3f}")
    if shape_rows:
        doc["per_shape"] = shape_rows
        print(f"{'linear':<7} {'N x K':>13} {'cuBLAS us':>9} {'GB/s':>6} {'Triton us':>9} {'GB/s':>6}")
        for r in shape_rows:
            print(f"{r['linear']:<7} {r['n']:>6} x {r['k']:<6} {r['cublas_us']:>9.2f} {r['cublas_gb_per_s']:>6.0f} "
                  f"{r['triton_us']:>9.2f} {r['triton_gb_per_s']:>6.0f}")
    if sweep_rows:
        doc["sweep"] = sweep_rows
        for name in dict.fromkeys(r["linear"] for r in sweep_rows):
            ok = sorted((r for r in sweep_rows if r["linear"] == name and "us" in r), key=lambda r: r["us"])
            print(f"sweep {name:<4} best " + ", ".join(f"{tuple(r['tile'])} {r['us']:.2f} us "
                                                      f"{r['fraction_of_copy_bw']:.3f}" for r in ok[:3]))
    if "pdl_max_abs_diff" in doc:
        print(f"pdl output vs triton output: max abs diff {doc['pdl_max_abs_diff']:.3g} (must be 0)")
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(doc, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
