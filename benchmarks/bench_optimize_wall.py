"""``graphfix.optimize(model)`` wall time, phase by phase, then ``generate`` at batch 1 and 8 (Llama-2-7B shapes).

    D=$(mktemp -d); for run in cold warm; do
        python benchmarks/bench_optimize_wall.py --label $run --no-generate --cache-dir $D; done

Run twice with the same cache directory: the first process is the cold start, the second the
warm one. ``--cache-dir`` is ``optimize(cache_dir=...)`` (Inductor's and Triton's caches, the
mega-cache and the GEMV tiles kept between processes); without it, set ``TORCHINDUCTOR_CACHE_DIR``
for both processes (Inductor's disk cache only: the decode kernels autotune again).
Builds the preset with random weights (bf16 on the GPU) and runs ``optimize`` with its defaults
(plus ``max_batch_size=8``), printing each phase's start time and then a table of the phases
(reference, the two diagnoses, passes, compile and warm-up, verify), the summary, and one JSON
line with the phase seconds. Unless ``--no-generate``, it then times ``model.generate`` (5-token
prompt, ``--new-tokens`` greedy, median of 3) at batch 1 and 8 and adds tok/s to the JSON.

``--device cpu --model tiny --layers 32`` is the CPU proxy: Dynamo's tracing grows with the
number of decoder layers and hardly with their width, so a deep narrow model shows where the
7B's time goes outside Inductor's GPU code generation. ``--diagnose-layers all`` gives the
diagnoses of every layer (the default diagnoses one of each kind: docs/optimize.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import graphfix
from graphfix.bench.presets import PRESETS, random_hf_model

PHASES = (("compile cache saved", "cache save"), ("compile cache", "cache load"), ("reference", "reference"), ("diagnosing the original", "diagnose original"), ("pass", "passes"),
          ("diagnosing the rewritten", "diagnose rewritten"), ("compiling with", "compile + warm-up"),
          ("verify", "verify"))
"""Top-level progress lines of ``optimize`` (by prefix) and the phase each one starts."""


def phase_seconds(marks: list[tuple[float, str]], end: float) -> dict[str, float]:
    """Seconds per phase from ``(time, message)`` progress marks (indented lines belong to the phase above)."""
    starts: list[tuple[float, str]] = []
    for at, message in marks:
        if message.startswith(" "):
            continue
        phase = next((name for prefix, name in PHASES if message.startswith(prefix)), None)
        if phase is not None and (not starts or starts[-1][1] != phase):
            starts.append((at, phase))
    out: dict[str, float] = {}
    for (at, phase), (nxt, _) in zip(starts, [*starts[1:], (end, "")]):
        out[phase] = round(out.get(phase, 0.0) + nxt - at, 1)
    return out


def _tok_s(model: torch.nn.Module, batch: int, new: int, vocab: int, device: str) -> float:
    prompt = torch.randint(3, vocab, (1, 5), device=device).expand(batch, 5).contiguous()
    kwargs = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0,
              "attention_mask": torch.ones_like(prompt)}
    times = []
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return new / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-2-7b", choices=sorted(PRESETS))
    p.add_argument("--label", default="run", help="a name for this process's JSON line (cold, warm)")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    p.add_argument("--diagnose-layers", default="representative", choices=("representative", "all"))
    p.add_argument("--no-generate", action="store_true", help="only optimize (no generate timing)")
    p.add_argument("--cache-dir", default=None, help="optimize(cache_dir=...): a compile cache kept between runs")
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.device == "cpu":  # the proxy: one thread, so that a core shared with other work does not stall a barrier
        torch.set_num_threads(1)
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    model = random_hf_model(args.model, args.device, dtype, **overrides)
    model.generation_config.eos_token_id = None
    marks: list[tuple[float, str]] = []
    started = time.perf_counter()

    def progress(message: str) -> None:
        marks.append((time.perf_counter() - started, message))
        print(f"[{marks[-1][0]:6.1f}s] {message}", flush=True)

    options = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    if args.diagnose_layers != "representative":  # only then: the script also times code from before the option
        options["diagnose_layers"] = args.diagnose_layers
    result = graphfix.optimize(model, max_batch_size=8, progress=progress, **options)
    optimize_s = time.perf_counter() - started
    phases = phase_seconds(marks, optimize_s)
    print(result.summary(), flush=True)
    print(f"\noptimize phases ({args.label}, {args.model}, {model.config.num_hidden_layers} layers, {args.device}, "
          f"diagnose_layers={args.diagnose_layers})")
    for phase, seconds in phases.items():
        print(f"  {phase:<20} {seconds:7.1f} s")
    print(f"  {'total':<20} {optimize_s:7.1f} s", flush=True)
    line = {"schema": "graphfix.bench_optimize_wall/2", "label": args.label, "model": args.model,
            "layers": model.config.num_hidden_layers, "device": torch.cuda.get_device_name() if args.device == "cuda"
            else "cpu", "torch": torch.__version__, "diagnose_layers": args.diagnose_layers,
            "cache_dir": bool(args.cache_dir), "optimize_s": round(optimize_s, 1), "phases_s": phases, "compile_s": result.compile_seconds,
            "verified": result.verified}
    if not args.no_generate:
        vocab = model.config.vocab_size
        rates = {batch: _tok_s(model, batch, args.new_tokens, vocab, args.device) for batch in (1, 8)}
        line.update({"tok_s_batch1": round(rates[1], 1), "tok_s_batch8_per_seq": round(rates[8], 1),
                     "batch8_ratio": round(rates[8] / rates[1], 3)})
    print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
