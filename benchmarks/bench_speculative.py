"""Speculative decoding: SmolLM2 on CPU (acceptance, speed-up at identical greedy output), or verify cost on a GPU.

    python benchmarks/bench_speculative.py                          # SmolLM2-135M, CPU: plain vs lookup:2/3/4, draft:3
    python benchmarks/bench_speculative.py --specs lookup:4 --new 64 --repeats 1
    python benchmarks/bench_speculative.py --specs lookup:2,lookup:3,lookup:4 --no-fallback --repeats 2  # docs' table
    python benchmarks/bench_speculative.py --gpu                    # 7B shapes, H200: verify step of k = 1, 2, 4, 8
    python benchmarks/bench_speculative.py --gpu-engine [--engine-model llama-2-7b]   # the engine on CUDA graphs

See graphfix/bench/speculative.py for what each mode measures, and docs/speculative.md for the figures.
"""

from __future__ import annotations

import argparse
import json
import sys

from graphfix.bench.speculative import engine_check_gpu, smollm2_cpu, verify_cost_gpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="verify-step cost at 7B shapes on a CUDA GPU")
    p.add_argument("--gpu-engine", action="store_true",
                   help="speculative generation on the GPU engine: identical tokens, no recompile (tiny model)")
    p.add_argument("--engine-model", default=None, help="--gpu-engine: also time plain vs lookup:4 on this preset")
    p.add_argument("--specs", default="lookup:2,lookup:3,lookup:4,draft:3", help="comma-separated speculations")
    p.add_argument("--new", type=int, default=128, help="new tokens per request (CPU)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--draft-layers", type=int, default=24, help="the SmolLM2 draft: its own first N layers")
    p.add_argument("--compile", action="store_true", help="compile (CPU: --backend, default aot_eager)")
    p.add_argument("--backend", default="aot_eager")
    p.add_argument("--min-ngram", type=int, default=1, help="lookup: the shortest n-gram that counts as a match")
    p.add_argument("--no-fallback", action="store_true",
                   help="also run each lookup without the no-match fallback (lookup:k/nofb)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: see graphfix/bench/speculative.py)")
    p.add_argument("--model", default="llama-2-7b", help="--gpu: the preset shapes")
    p.add_argument("--ks", default="1,2,4,8", help="--gpu: proposal lengths")
    p.add_argument("--compiled-ks", default="4", help="--gpu: proposal lengths also measured compiled ('' for none)")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    if args.gpu or args.gpu_engine:
        import torch

        if not torch.cuda.is_available():
            print("bench_speculative --gpu/--gpu-engine: needs a CUDA GPU", file=sys.stderr)
            return 2
        out = {}
        if args.gpu:
            out["verify_cost"] = verify_cost_gpu(args.model, tuple(int(k) for k in args.ks.split(",")),
                                                 compiled_ks=tuple(int(k) for k in args.compiled_ks.split(",") if k))
        if args.gpu_engine:
            out["engine"] = engine_check_gpu(args.engine_model)
    else:
        out = smollm2_cpu([s for s in args.specs.split(",") if s], args.new, args.repeats, args.draft_layers,
                          args.compile, args.backend, args.threads, args.min_ngram, args.no_fallback)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
