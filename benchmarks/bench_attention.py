"""Sweep the split-KV decode attention's tiling on Llama-2-7B shapes: slots a step, warps, splits a row.

    PYTHONPATH=. python3 benchmarks/bench_attention.py [--cases b1,b8,b16,shared5] [--long]

Why: in the batch-8 step's profile (docs/benchmarks.md) attention took 0.44 ms a step against 0.15 ms at batch 1,
while the bytes it must read (8 rows x 101 slots x 32 heads x 128 x 2 x 2 bytes a layer, 0.21 GB a step) take
0.05 ms at the copy bandwidth: the kernel, not the memory, sets its time. Each case times 32 calls (one per layer)
in one CUDA graph for every ``(BLOCK_S, NUM_WARPS, MIN_SPLITS, TARGET_PROGRAMS)``; ``shared5`` is a verify step's
five rows over one cache row (``step(shared_rows=True)``). Prints the best settings per case and the current
defaults' time.
"""
from __future__ import annotations

import argparse
import itertools

import torch

from graphfix.bench.timing import cuda_graph_ms
from graphfix.engine import attention_kernel as ak

HEADS, DIM, LAYERS = 32, 128, 32
GRID = ((16, 32, 64), (1, 2, 4, 8), (1, 2, 4, 8), (256, 512))
"""BLOCK_S, NUM_WARPS, MIN_SPLITS, TARGET_PROGRAMS."""


def case(name: str, kv_len: int, pos: int):
    rows = {"b1": 1, "b8": 8, "b16": 16, "shared5": 5}[name]
    cache_rows = 1 if name == "shared5" else rows
    ks = [torch.randn(cache_rows, HEADS, kv_len, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
    vs = [torch.randn_like(k) for k in ks]
    if cache_rows != rows:
        ks = [k.expand(rows, -1, -1, -1) for k in ks]
        vs = [v.expand(rows, -1, -1, -1) for v in vs]
    q = torch.randn(rows, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    positions = torch.arange(pos, pos + rows, device="cuda") if name == "shared5" else \
        torch.full((rows,), pos, device="cuda")
    return q, ks, vs, positions


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="b1,b8,b16,shared5")
    p.add_argument("--long", action="store_true", help="also a 1024-slot bucket at position 700")
    p.add_argument("--only", default=None, help="BLOCK_S,NUM_WARPS,MIN_SPLITS,TARGET_PROGRAMS: time this one setting")
    args = p.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    defaults = (ak.BLOCK_S, ak.NUM_WARPS, ak.MIN_SPLITS, ak.TARGET_PROGRAMS)
    grid = list(itertools.product(*GRID))
    if args.only:
        grid = [defaults, tuple(int(v) for v in args.only.split(","))]
    buckets = [(256, 100)] + ([(1024, 700)] if args.long else [])
    for (kv_len, pos), name in itertools.product(buckets, args.cases.split(",")):
        q, ks, vs, positions = case(name, kv_len, pos)
        ref = ak.decode_attention_reference(q.float(), ks[0].float(), vs[0].float(), positions, None)
        results = []
        for block, warps, min_splits, target in grid:
            ak.BLOCK_S, ak.NUM_WARPS, ak.MIN_SPLITS, ak.TARGET_PROGRAMS = block, warps, min_splits, target
            try:
                out = torch.ops.graphfix.decode_attention(q, ks[0], vs[0], positions, 0, DIM ** -0.5)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                ms, _ = cuda_graph_ms(lambda q=q, ks=ks, vs=vs, positions=positions: [
                    torch.ops.graphfix.decode_attention(q, k, v, positions, 0, DIM ** -0.5) for k, v in zip(ks, vs)],
                    1, repeats=5)
            except Exception as exc:  # noqa: BLE001
                print(f"{name} {block}/{warps}/{min_splits}/{target} FAILED {type(exc).__name__}: {str(exc)[:120]}")
                continue
            results.append((ms, block, warps, min_splits, target, err))
        ak.BLOCK_S, ak.NUM_WARPS, ak.MIN_SPLITS, ak.TARGET_PROGRAMS = defaults
        results.sort()
        now = next(r for r in results if r[1:5] == defaults)
        print(f"== {name} kv {kv_len} pos {pos}: defaults {defaults} {now[0]:.3f} ms/32 layers (err {now[5]:.1e})")
        for ms, block, warps, min_splits, target, err in results[:2 if args.only else 6]:
            print(f"   BLOCK_S {block:2d} warps {warps} min_splits {min_splits} target {target}: {ms:.3f} ms "
                  f"(err {err:.1e})", flush=True)


if __name__ == "__main__":
    main()
