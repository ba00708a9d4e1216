"""One batch-1 decode step of the whole decoder as one CUDA graph, per decode-kernel option.

``bench_decode.py`` measures what a user gets (compiled, CUDA-graphed generation) but
compiles once per variant, about a minute each on an H200. This captures the decoder's
eager ``step`` (``use_decode_kernels``: every layer is the Triton GEMVs, the RoPE/cache
kernel and split-KV attention, so eager and compiled launch the same kernels in the
layers) and compares the options side by side in seconds:

- ``kernels``: the decode kernels, no programmatic dependent launch (PDL);
- ``pdl-gemv``: PDL on the GEMVs only;
- ``pdl-gemv-rope``: PDL on the GEMVs and the RoPE/cache kernel;
- ``pdl``: PDL on every kernel of the layer (the default on sm_90+).

    python benchmarks/bench_step.py [--model llama-2-7b] [--pos 100] [--kv-len 256] [--batch 1,8] [--profile]

``--batch``: rows per step (a batched decode step, one token per row, 1 to 16 rows run the
kernels; ``cublas`` is the same step without them, for comparison). ``--profile``: the
CUDA kernels of one ``pdl`` step per batch size, longest first.

Prints ms per step, the tokens/s it would give, GB/s of weights and the fraction of the
copy bandwidth, and each option's largest logit difference from ``kernels`` (PDL changes
when kernels start, never what they compute: it must be 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from typing import Any

import torch

from graphfix.bench.presets import random_hf_model
from graphfix.bench.timing import copy_bandwidth, cuda_graph_ms
from graphfix.engine import from_hf, llama

OPTIONS = {  # name: (PDL on the GEMVs, on the RoPE/cache kernel, on attention); None: no decode kernels
    "cublas": None, "kernels": (False, False, False), "pdl-gemv": (True, False, False), "pdl-gemv-rope": (True, True, False),
    "pdl": (True, True, True),
}


@contextmanager
def _pdl_only_for(rope: bool, attention: bool):
    """Keep PDL off the RoPE kernel or attention while the GEMVs keep it (this benchmark's knobs, not the decoder's)."""
    saved = llama.rope_cache, llama.decode_attention

    def rope_cache(*args: Any) -> torch.Tensor:
        return saved[0](*args[:-1], args[-1] and rope)

    def decode_attention(*args: Any, pdl: bool = False) -> torch.Tensor:
        return saved[1](*args, pdl=pdl and attention)

    llama.rope_cache, llama.decode_attention = rope_cache, decode_attention
    try:
        yield
    finally:
        llama.rope_cache, llama.decode_attention = saved


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-2-7b")
    p.add_argument("--pos", type=int, default=100, help="the decoded token's position")
    p.add_argument("--kv-len", type=int, default=256, help="the attended cache prefix (the decode bucket)")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--batch", default="1", help="comma list of rows per step (1 to 16)")
    p.add_argument("--profile", action="store_true", help="print the kernels of one pdl step per batch size")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_step: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    copy = copy_bandwidth(device)["gb_per_s"]
    model = random_hf_model(args.model, device, torch.bfloat16)
    batches = [int(b) for b in args.batch.split(",")]
    dec = from_hf(model, max_batch_size=max(batches), max_seq_len=args.kv_len, fuse=True)
    del model
    rows = []
    for batch in batches:
        nbytes = dec.weight_bytes() + dec.kv_bytes(batch, args.kv_len) * (args.pos + 1) // args.kv_len
        tokens = torch.ones(batch, 1, dtype=torch.long, device=device)
        pos = torch.full((batch, 1), args.pos, device=device)
        ref = None
        for name, option in OPTIONS.items():
            gemv, rope, attention = option or (False, False, False)
            dec.use_decode_kernels(option is not None, pdl=gemv, max_rows=max(batches))
            if gemv and not dec.decode_pdl:
                print(f"{name:14s} skipped: PDL needs an sm_90+ GPU")
                continue
            with _pdl_only_for(rope, attention), torch.no_grad():
                ms, out = cuda_graph_ms(lambda tokens=tokens, pos=pos: dec.step(tokens, pos, kv_len=args.kv_len), args.reps, repeats=5)
            diff = 0.0 if ref is None else (out.float() - ref).abs().max().item()
            ref = out.float() if ref is None else ref
            gbps = nbytes / ms / 1e6
            rows.append({"batch": batch, "option": name, "ms": ms, "tok_per_s": 1000 / ms, "gb_per_s": gbps,
                         "fraction_of_copy": gbps / copy, "max_diff_vs_cublas": diff})
            print(f"batch {batch:2d} {name:14s} {ms:7.4f} ms  {batch * 1000 / ms:7.1f} tok/s  {gbps:6.0f} GB/s  "
                  f"{gbps / copy:5.3f} of copy  diff {diff:.1e}", flush=True)
        if args.profile and dec.decode_pdl:
            _profile(lambda tokens=tokens, pos=pos: dec.step(tokens, pos, kv_len=args.kv_len), batch)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"version": 1, "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                       "copy_gb_per_s": copy, "args": vars(args), "rows": rows}, f, indent=1)
    return 0


def _profile(step: Any, batch: int, top: int = 12) -> None:
    """The CUDA kernels of one step (after a warm-up), longest total first."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events)
    print(f"batch {batch}: {total / 1000:.3f} ms of kernels in one pdl step (eager launches)")
    for e in events[:top]:
        print(f"  {e.device_time_total / 1000:7.3f} ms  {e.count:4d}x  {e.key[:90]}")


if __name__ == "__main__":
    sys.exit(main())
