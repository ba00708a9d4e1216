"""The warm-start measurement: a second process loads the compile cache the first one wrote and reports its time
to first token, split by where it went. (``decode`` imports this module: what it needs from ``decode`` is imported
inside the functions.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from graphfix.bench.timing import _now, _sync, _timed


def child_warm(args) -> int:
    """Build the same model, load the compile cache, warm up, first request: print JSON timings.

    The main thread's stack is sampled throughout (``StackSampler``): the JSON names the functions the
    start spent its seconds in, so a slow warm start can be read from the benchmark's own output.
    """
    t0 = _now()
    from graphfix.bench.stack_sampler import StackSampler

    with StackSampler() as sampler:
        out = _child_warm(args, t0)
    out["hot_functions"] = sampler.top(80)
    out["hot_innermost"] = sampler.top(15, inclusive=False)
    print(json.dumps(out))
    return 0


def _child_warm(args, t0: float) -> dict[str, Any]:
    from graphfix.bench.decode import _generator, _ints, _load_model, _max_seq, _prompts, _warmup, apply_variant
    from graphfix.engine import CompileCache, from_hf

    device = torch.device(args.device)
    info = CompileCache(args.cache_dir, key=cache_key(args, device), precompile=True).activate()
    model = _load_model(args, device)
    dec = from_hf(model, max_batch_size=max(_ints(args.batch_sizes)), max_seq_len=_max_seq(args), fuse=True)
    if getattr(args, "quantize", None):
        from graphfix.quant import quantize

        quantize(dec, args.quantize)
    apply_variant(dec, args.variants)  # the parent measured this variant first: the cache holds its graphs
    gen = _generator(dec, args)
    _sync(device)
    t1 = _now()
    parts = _warmup(gen, args, 1, device)
    ids = _prompts(1, args.prompt_len, dec.config.vocab_size, seed=1).tolist()
    first = _timed(lambda: gen.generate(ids, 1), device)
    return {"startup_and_build_s": t1 - t0, "warmup_s": parts["total_s"], "warmup_parts": parts,
            "first_request_s": first, "process_to_first_token_s": _now() - t0, **info}


def cache_key(args, device: torch.device) -> dict[str, Any]:
    """What the compile cache's graphs depend on beyond the code: one cache directory per value (``CompileCache``)."""
    from graphfix.bench.decode import _max_seq  # decode imports this module

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"model": args.model, "layers": args.layers, "dtype": args.dtype, "device": name, "backend": args.backend,
            "cuda_graphs": not args.no_cuda_graphs, "inductor_options": sorted(args.inductor_options.items()),
            "max_seq": _max_seq(args), "batch_sizes": args.batch_sizes, "quantize": getattr(args, "quantize", None)}


def _warm_start(args, cold_s: float, variant: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "graphfix.bench.decode", "--child-warm", "--cache-dir", args.cache_dir,
           "--model", args.model, "--dtype", args.dtype, "--device", args.device, "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--batch-sizes", args.batch_sizes, "--backend", args.backend,
           "--ttft-lengths", args.ttft_lengths or "", "--systems", "graphfix", "--variants", variant]
    for opt in args.inductor_option:
        cmd += ["--inductor-option", opt]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    if args.no_cuda_graphs:
        cmd.append("--no-cuda-graphs")
    if getattr(args, "quantize", None):
        cmd += ["--quantize", args.quantize]
    from graphfix.engine import CompileCache

    env = CompileCache(args.cache_dir).child_env({**os.environ, "PYTHONUNBUFFERED": "1"})
    t = _now()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    out: dict[str, Any] = {"cold_warmup_s": cold_s, "wall_s": _now() - t, "returncode": proc.returncode,
                           "log": str(Path(args.cache_dir) / "warm_start.log")}
    Path(out["log"]).write_text(proc.stdout + proc.stderr)  # the child's own output, for a slow or failed start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            out.update(json.loads(line))
            break
    else:
        out["stderr_tail"] = proc.stderr[-1500:]
    print(f"[bench] warm start: {out}", flush=True)
    return out


