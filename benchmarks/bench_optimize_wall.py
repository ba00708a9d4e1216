"""``graphfix.optimize(model)`` wall time, phase by phase, then ``generate`` at batch 1 and 8 (Llama-2-7B shapes).

    TORCHINDUCTOR_CACHE_DIR=/tmp/gf_cache python benchmarks/bench_optimize_wall.py --label cold
    TORCHINDUCTOR_CACHE_DIR=/tmp/gf_cache python benchmarks/bench_optimize_wall.py --label warm

Run twice with the same Inductor cache directory: the first process is the cold start, the
second the warm one (Inductor's compiled code and autotuning kept on disk between processes).
Builds the preset with random bf16 weights on the GPU, runs ``optimize`` with its defaults (plus
``max_batch_size=8``) printing each phase's start time, prints the summary, then times
``model.generate`` (5-token prompt, ``--new-tokens`` greedy, median of 3) at batch 1 and 8, and
one JSON line: optimize seconds, its compile seconds, verified, tok/s per sequence, batch-8 ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import graphfix
from graphfix.bench.presets import PRESETS, random_hf_model


def _tok_s(model: torch.nn.Module, batch: int, new: int, vocab: int) -> float:
    prompt = torch.randint(3, vocab, (1, 5), device="cuda").expand(batch, 5).contiguous()
    kwargs = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0,
              "attention_mask": torch.ones_like(prompt)}
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, **kwargs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return new / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-2-7b", choices=sorted(PRESETS))
    p.add_argument("--label", default="run", help="a name for this process's JSON line (cold, warm)")
    p.add_argument("--new-tokens", type=int, default=200)
    args = p.parse_args(argv)
    model = random_hf_model(args.model, "cuda", torch.bfloat16)
    model.generation_config.eos_token_id = None
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)

    result = graphfix.optimize(model, max_batch_size=8, progress=progress)
    optimize_s = time.perf_counter() - started
    print(result.summary(), flush=True)
    vocab = model.config.vocab_size
    rates = {batch: _tok_s(model, batch, args.new_tokens, vocab) for batch in (1, 8)}
    print(json.dumps({"schema": "graphfix.bench_optimize_wall/1", "label": args.label, "model": args.model,
                      "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "optimize_s": round(optimize_s, 1), "compile_s": result.compile_seconds,
                      "verified": result.verified, "tok_s_batch1": round(rates[1], 1),
                      "tok_s_batch8_per_seq": round(rates[8], 1), "batch8_ratio": round(rates[8] / rates[1], 3)}),
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
