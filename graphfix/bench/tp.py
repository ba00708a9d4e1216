"""Tensor-parallel decode benchmark: 7B and 70B Llama shapes, random weights made on the GPUs, any tp.

    torchrun --nproc-per-node N benchmarks/bench_tp.py [--shapes llama-2-7b,llama-2-70b,llama-3-70b]
    python benchmarks/bench_tp.py             # tp=1: one GPU through the same tensor-parallel path

Each rank builds its shard through the loader's own path (``build_shard`` over a source
that draws every slice on the GPU), so the model never exists whole anywhere. Per shape,
rank 0 prints: ms/token (batch 1, 5-token prompt), the per-GPU weight-streaming floor
(this rank's weight bytes over the copy bandwidth measured in the same run) and the
share of it reached, the all-reduce chooser's figures (NCCL and one-shot microseconds per
all-reduce, and per step: two a layer), first-call time (cold compile and CUDA-graph
capture), warm-start time (a second ``Generator`` over the same model in the same
process: Inductor's caches warm, Dynamo tracing again), and peak memory per GPU.
A 70B model does not fit one 141 GB GPU in bf16: at tp=1 it runs with ``--layers-at-1``
layers (default 20) and its per-token figures are scaled to 80 layers, which the output says.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from typing import Any

import torch

from graphfix.engine.llama import DecoderConfig

SHAPES: dict[str, dict[str, Any]] = {
    "llama-2-7b": {"vocab_size": 32000, "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32,
                   "intermediate_size": 11008, "rope_theta": 10000.0},
    "llama-2-70b": {"vocab_size": 32000, "dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8,
                    "intermediate_size": 28672, "rope_theta": 10000.0},
    "llama-3-70b": {"vocab_size": 128256, "dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8,
                    "intermediate_size": 28672, "rope_theta": 500000.0},
}

GPT_FAST = {
    "llama-2-70b": "gpt-fast: 2 x H200 tp=2 21.6 ms/token (measured, FINDINGS.md); 8 x A100 tp=2/4/8 "
                   "47.0/26.3/16.0 ms/token (published 21.3/38.0/62.5 tok/s)",
    "llama-2-7b": "gpt-fast: 2 x H200 tp=2 4.39 ms/token (measured, FINDINGS.md)",
    "llama-3-70b": "gpt-fast: no published tp figure for Llama-3-70B shapes",
}
TARGETS = {("llama-2-70b", 2): 18.0, ("llama-2-70b", 4): 10.0, ("llama-2-70b", 8): 6.5, ("llama-2-7b", 2): 2.6}
"""Issue 14's targets on H200s, ms/token."""


def shape_config(name: str, layers: int | None = None) -> DecoderConfig:
    s = dict(SHAPES[name])
    if layers is not None:
        s["n_layers"] = layers
    return DecoderConfig(vocab_size=s["vocab_size"], dim=s["dim"], n_layers=s["n_layers"], n_heads=s["n_heads"],
                         n_kv_heads=s["n_kv_heads"], head_dim=s["dim"] // s["n_heads"],
                         intermediate_size=s["intermediate_size"], norm_eps=1e-5, rope_theta=s["rope_theta"],
                         rope_layout="half")


def model_bytes(cfg: DecoderConfig, itemsize: int = 2) -> int:
    """Bytes of a model of this shape (separate embedding and LM head)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    layer = 2 * q * cfg.dim + 2 * kv * cfg.dim + 3 * cfg.dim * cfg.intermediate_size
    return itemsize * (cfg.n_layers * layer + 2 * cfg.vocab_size * cfg.dim)


class RandomSource:
    """Random weights drawn slice by slice on the device, from a generator seeded by the weight's name and slice.

    Every rank draws the same values for a replicated weight (norms, the embedding), so all
    ranks agree on the tokens, as they would with a real checkpoint.
    """

    def __init__(self, cfg: DecoderConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg, self.device, self.dtype = cfg, device, dtype

    def has(self, name: str) -> bool:
        return not name.endswith(".bias")

    def _shape(self, name: str) -> tuple[int, ...]:
        c = self.cfg
        leaf = name.split(".")[-2]
        q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        shapes = {"wq": (q, c.dim), "wk": (kv, c.dim), "wv": (kv, c.dim), "wo": (c.dim, q),
                  "w1": (c.intermediate_size, c.dim), "w3": (c.intermediate_size, c.dim),
                  "w2": (c.dim, c.intermediate_size)}
        if name in ("tok_embeddings.weight", "output.weight"):
            return (c.vocab_size, c.dim)
        return shapes.get(leaf, (c.dim,))

    def read(self, name: str, dim: int | None, start: int = 0, length: int = 0) -> torch.Tensor:
        shape = list(self._shape(name))
        if dim is not None:
            shape[dim] = length
        seed = int.from_bytes(hashlib.sha256(f"{name}:{dim}:{start}".encode()).digest()[:7], "little")
        gen = torch.Generator(device=self.device).manual_seed(seed)
        if len(shape) == 1:
            return torch.ones(shape, device=self.device, dtype=self.dtype)
        out = torch.empty(shape, device=self.device, dtype=self.dtype)
        return out.normal_(0.0, self._shape(name)[1] ** -0.5, generator=gen)


def _ms_per_token(gen: Any, prompt: list[int], new_tokens: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        times.append(gen.generate([prompt], new_tokens).decode_ms_per_token)
    return statistics.median(times)


def bench_shape(name: str, tp: Any, args: argparse.Namespace, bandwidth: float) -> dict[str, Any]:
    """One shape at this tp: build, choose the all-reduce, warm up, time; returns rank 0's figures."""
    from graphfix.engine import Generator
    from graphfix.engine.tp import choose_all_reduce
    from graphfix.engine.tp.build import build_shard

    full_layers = SHAPES[name]["n_layers"]
    layers = None
    free = torch.cuda.get_device_properties(tp.device).total_memory * 0.85
    if model_bytes(shape_config(name)) / tp.world_size > free:  # 70B at tp=1: fewer layers, figures scaled
        layers = args.layers_at_1
    cfg = shape_config(name, layers)
    torch.cuda.reset_peak_memory_stats(tp.device)
    started = time.perf_counter()
    dec = build_shard(RandomSource(cfg, tp.device, torch.bfloat16), cfg, tp, max_batch_size=1,
                      max_seq_len=args.prompt_len + args.new_tokens + 8)
    build_s = time.perf_counter() - started
    if not args.no_decode_kernels:
        dec.use_decode_kernels()
    choice = choose_all_reduce(tp, dec, force=args.all_reduce)
    prompt = list(range(1, args.prompt_len + 1))
    gen = Generator(dec, kv_buckets=None)
    started = time.perf_counter()
    gen.warmup(batch_sizes=(1,), prompt_lengths=[args.prompt_len])
    first_call_s = time.perf_counter() - started
    ms = _ms_per_token(gen, prompt, args.new_tokens, args.repeats)
    lowered = compiled_all_reduces()
    warm_s = None
    if not args.no_warm_start:
        started = time.perf_counter()
        Generator(dec, kv_buckets=None).warmup(batch_sizes=(1,), prompt_lengths=[args.prompt_len])
        warm_s = time.perf_counter() - started
    scale = full_layers / cfg.n_layers
    weight_bytes = dec.weight_bytes()
    floor_ms = weight_bytes / (bandwidth * 1e9) * 1000
    out = {"shape": name, "tp": tp.world_size, "layers_run": cfg.n_layers, "scaled_to_layers": full_layers,
           "ms_per_token": ms * scale if layers else ms, "ms_per_token_measured": ms,
           "floor_ms": floor_ms * scale if layers else floor_ms, "share_of_floor": floor_ms / ms,
           "all_reduce": choice.kind, "all_reduce_reason": choice.reason, "nccl_us": choice.nccl_us,
           "one_shot_us": choice.one_shot_us, "all_reduces_per_step": 2 * full_layers,
           "compiled_all_reduce_calls": lowered,
           "first_call_s": first_call_s, "warm_start_s": warm_s, "build_s": build_s,
           "peak_gb": torch.cuda.max_memory_allocated(tp.device) / 1e9,
           "target_ms": TARGETS.get((name, tp.world_size)), "reference": GPT_FAST.get(name)}
    for key in ("nccl_us", "one_shot_us"):
        if out[key] is not None:
            out[key.replace("_us", "_ms_per_step")] = out[key] * 2 * full_layers / 1000
    del gen, dec
    torch.cuda.empty_cache()
    return out


def compiled_all_reduces() -> dict[str, int] | None:
    """How many one-shot and NCCL all-reduce calls Inductor's generated modules hold so far (``None``: unknown).

    The all-reduce choice turns on Inductor's one-shot lowering, which applies only where Inductor can
    place the reduced buffer in symmetric memory; this says whether it did. Reads the private
    ``torch._inductor.codecache.PyCodeCache.modules`` (a list in torch 2.11 to 2.13).
    """
    import inspect

    try:
        from torch._inductor.codecache import PyCodeCache

        sources = [inspect.getsource(m) for m in list(PyCodeCache.modules)]
    except Exception:  # noqa: BLE001 - a private structure: absent or changed means "unknown"
        return None
    text = "\n".join(sources)
    return {"one_shot": text.count("symm_mem.one_shot_all_reduce"), "nccl": text.count("_c10d_functional.all_reduce_")}


def check_tp_path(tp: Any, new_tokens: int = 24) -> dict[str, Any]:
    """A tiny Llama (bf16, large weights: well separated logits) through the TP path and the plain decoder.

    Both with the decode kernels, compiled (Inductor, CUDA graphs) and warmed up, then generating under
    ``fail_on_recompile``: the greedy tokens must be the same, at any tp (each rank holds the tiny model whole).
    """
    from graphfix.bench.presets import tiny_hf_model
    from graphfix.engine import Generator, from_hf
    from graphfix.engine.tp import choose_all_reduce, shard

    # 8 heads of 16 (the kernels' smallest head size), 2 KV heads: any tp up to 8
    model = tiny_hf_model("llama", tp.device, torch.bfloat16, num_attention_heads=8, hidden_size=128)
    plain = from_hf(model, max_seq_len=64, share=True).use_decode_kernels()
    sharded = shard(model, tp, max_seq_len=64).use_decode_kernels()
    choice = choose_all_reduce(tp, sharded)
    tokens = {}
    for name, dec in (("plain", plain), ("tp", sharded)):
        gen = Generator(dec)
        gen.warmup(batch_sizes=(1,), prompt_lengths=[5])
        with torch.compiler.set_stance("fail_on_recompile"):
            tokens[name] = gen.generate([[1, 2, 3, 4, 5]], new_tokens).tokens[0]
    return {"same_tokens": tokens["plain"] == tokens["tp"], "tokens": tokens, "all_reduce": choice.describe()}


def _line(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"{r['shape']}: skipped ({r['skipped']})"
    scaled = (f" [ran {r['layers_run']} of {r['scaled_to_layers']} layers, scaled]"
              if r["layers_run"] != r["scaled_to_layers"] else "")
    ar = f"all-reduce {r['all_reduce']}"
    if r.get("nccl_ms_per_step") is not None:
        ar += f" (NCCL {r['nccl_us']:.1f} us = {r['nccl_ms_per_step']:.2f} ms/step"
        ar += (f", one-shot {r['one_shot_us']:.1f} us = {r['one_shot_ms_per_step']:.2f} ms/step)"
               if r.get("one_shot_ms_per_step") is not None else ")")
    if r.get("compiled_all_reduce_calls") is not None:
        ar += f"; in Inductor's code so far: {r['compiled_all_reduce_calls']}"
    target = f", target {r['target_ms']} ms" if r["target_ms"] else ""
    warm = (f", warm start {r['warm_start_s']:.1f} s (a second Generator, same process)"
            if r["warm_start_s"] is not None else "")
    return (f"{r['shape']} tp={r['tp']}: {r['ms_per_token']:.2f} ms/token{scaled}, floor {r['floor_ms']:.2f} ms "
            f"(share {r['share_of_floor']:.2f}){target}; {ar}; first call {r['first_call_s']:.1f} s{warm}; "
            f"peak {r['peak_gb']:.1f} GB/GPU; {r['reference']}\n    all-reduce choice: {r['all_reduce_reason']}")


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="llama-2-7b,llama-2-70b", help=f"comma-separated: {', '.join(SHAPES)}")
    p.add_argument("--prompt-len", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers-at-1", type=int, default=20, help="70B layers run at tp=1 (scaled to 80)")
    p.add_argument("--all-reduce", choices=("nccl", "one_shot"), default=None, help="force instead of measuring")
    p.add_argument("--no-decode-kernels", action="store_true")
    p.add_argument("--no-warm-start", action="store_true")
    p.add_argument("--no-check", action="store_true", help="skip the tiny-model check (TP path == plain decoder)")
    p.add_argument("--json", default=None, help="write rank 0's results here")
    return p


def run(args: argparse.Namespace) -> int:
    from graphfix.bench.timing import copy_bandwidth
    from graphfix.engine.tp import init_tp, main_print

    tp = init_tp(getattr(args, "tp", None))
    if tp.device.type != "cuda":
        main_print(tp, "bench_tp needs CUDA GPUs (the CPU proof is tests/test_tp.py)")
        return 2
    bandwidth = copy_bandwidth(tp.device)["gb_per_s"]
    main_print(tp, f"tp={tp.world_size}, {torch.cuda.get_device_name(tp.device)}, torch {torch.__version__}, "
                   f"copy bandwidth {bandwidth:.0f} GB/s per GPU")
    results: list[dict[str, Any]] = []
    if not args.no_check:
        check = check_tp_path(tp)
        main_print(tp, f"check: TP path (decode kernels, CUDA graphs, fail_on_recompile) gives the plain decoder's "
                       f"tokens: {check['same_tokens']} ({check['all_reduce']})")
        results.append({"check": check})
    for name in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        r = bench_shape(name, tp, args, bandwidth)
        results.append(r)
        main_print(tp, _line(r))
    if args.json and tp.is_main:
        with open(args.json, "w") as f:
            json.dump({"tp": tp.world_size, "copy_gb_per_s": bandwidth, "results": results}, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
