"""``graphfix.optimize`` as a drop-in on a GPU: HF ``generate`` before and after, bf16 parity and speed.

    python benchmarks/bench_optimize_gpu.py [--model llama-2-7b] [--layers 8] [--new-tokens 128]

Builds a Hugging Face ``LlamaForCausalLM`` of a preset's shapes with random weights on
the device (``graphfix.bench.presets``; no checkpoint), keeps a deep copy as the
original, runs ``graphfix.optimize`` on the model (diagnose, passes, compile, verify),
then times ``generate(prompt, max_new_tokens=N)`` greedy on both (median of
``--repeats``, interleaved) and compares their tokens. Prints the optimize summary
(before/after table with the bf16 parity error and greedy match that ``verify``
reports) and one JSON line. Random weights give close logits, so in bf16 a greedy
divergence late in the sequence is rounding, not a bug; the verify parity is the check.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch


def _generate(model, prompt: torch.Tensor, new: int) -> tuple[float, torch.Tensor]:
    kwargs = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0,
              "attention_mask": torch.ones_like(prompt)}
    if prompt.is_cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, **kwargs)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started, out


def main(argv: list[str] | None = None) -> int:
    import graphfix
    from graphfix.bench.presets import PRESETS, random_hf_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-2-7b", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=8, help="cut the preset to this many layers (0: all)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_optimize_gpu: CUDA is not available", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    model = random_hf_model(args.model, device, dtype, **overrides)
    model.generation_config.eos_token_id = None
    original = copy.deepcopy(model)
    prompt = torch.randint(3, model.config.vocab_size, (1, args.prompt_len), device=device,
                           generator=torch.Generator(device=device).manual_seed(0))
    started = time.perf_counter()
    result = graphfix.optimize(model, max_seq_len=args.prompt_len + args.new_tokens + 64)
    optimize_s = time.perf_counter() - started
    print(result.summary(), flush=True)
    times: dict[str, list[float]] = {"original": [], "optimized": []}
    tokens = {}
    for _ in range(args.repeats):
        for name, m in (("original", original), ("optimized", result.model)):
            sec, out = _generate(m, prompt, args.new_tokens)
            times[name].append(sec)
            tokens[name] = out[0, args.prompt_len:]
    same = tokens["original"] == tokens["optimized"]
    first_diff = None if bool(same.all()) else int((~same).nonzero()[0, 0])
    row = {
        "schema": "graphfix.bench_optimize_gpu/1", "model": args.model, "layers": args.layers or None,
        "dtype": args.dtype, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "verified": result.verified, "optimize_s": optimize_s,
        "parity_relative_error": result.parity.relative_error if result.parity else None,
        "verify_greedy_match": f"{result.parity.greedy_match}" if result.parity else None,
        "generate_tokens_identical": int(same.sum()), "generate_tokens": args.new_tokens,
        "first_differing_token": first_diff,
        "tok_per_s": {k: args.new_tokens / statistics.median(v) for k, v in times.items()},
    }
    row["speedup"] = row["tok_per_s"]["optimized"] / row["tok_per_s"]["original"]
    print(json.dumps(row), flush=True)
    return 0 if result.verified else 1


if __name__ == "__main__":
    sys.exit(main())
