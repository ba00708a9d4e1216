"""GPU checks of the decode kernels through the engine: parity at batch 1 and 8, and batch-8 scaling.

``decode_kernels_parity``: a tiny fp16 model, one ``Generator`` warmed up under both decode-kernel
settings, then used alternately under ``fail_on_recompile`` at batch 1 and 8 (rows at different
positions): the compiled kernel path's greedy tokens must equal the eager kernel path's, each
kernel must have run, and no setting may recompile the other's graphs.

``batch_scaling``: Llama-2-7B shapes (bf16, random weights), tokens per second per sequence at
batch 1 and 8 for each variant (``pdl``, ``kernels``, ``fused``: cuBLAS), and the ratio batch 8 /
batch 1 that the issue asks to be at least 0.85. Run by ``python -m graphfix.bench.selfcheck``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from graphfix.bench.kernel_check import _op_counter, _rel
from graphfix.bench.presets import tiny_hf_model
from graphfix.engine.kernels import MAX_ROWS

LLAMA3_ROPE = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
"""The tiny Llama's RoPE: llama3 scaling, so the scaled tables are what the kernels read."""
ROW_PROMPTS = [[5, 7, 9, 11, 13], [3, 4, 100, 22, 9, 8, 1, 17, 44], [60], [11, 12, 13, 14, 15, 16], [2, 90, 31, 8],
               [70, 71], [19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9], [33, 44, 55, 66, 77]]
"""Eight prompts of different lengths: at batch 8 every row decodes at its own positions."""


def tiny_model(kind: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Any:
    """The self-check's tiny ``llama`` (llama3 RoPE scaling) or ``qwen2`` (q/k/v biases)."""
    return tiny_hf_model(kind, device, dtype, **(LLAMA3_ROPE if kind == "llama" else {}))


def _first_difference(rows: list[list[int]], refs: list[list[int]]) -> int | None:
    found = [i for g, r in zip(rows, refs) for i, (a, b) in enumerate(zip(g, r)) if a != b]
    return min(found) if found else None


def decode_kernels_parity(device: torch.device, kind: str, batches: tuple[int, ...] = (1, 8), new: int = 24,
                          backend: str = "inductor") -> dict[str, Any]:
    """The decode kernels (fp16) against the standard path, eager and compiled, at each batch size.

    Per batch: one kernel step's logits against the standard step's on the same cache
    (``logits_rel_error``), the kernel calls that step made (``kernel_calls`` against
    ``expected_calls``), and greedy tokens of the eager kernel path and of the compiled
    standard and kernel paths (Inductor, CUDA graphs), compared with the eager standard
    path (first differing token: random tiny fp16 models have close logits, so a late
    divergence from rounding is possible) and, for the compiled kernel path, with the eager
    kernel path (``compiled_kernels_equal_eager``: the same kernels, so the same tokens).
    ``backend``: the generator's (``aot_eager`` for the CPU test of this check itself).
    """
    from graphfix.engine import Generator, from_hf

    model = tiny_model(kind, device, torch.float16)
    dec = from_hf(model, max_batch_size=max(batches), max_seq_len=128, share=True)
    layers = dec.config.n_layers
    expected = {"decode_attention": layers, "fused_gemv": 4 * layers + 1, "rope_cache": layers}
    out: dict[str, Any] = {"model": kind, "dtype": "float16", "tokens_per_prompt": new, "pdl": None, "batches": {}}
    eager: dict[int, dict[str, list[list[int]]]] = {}
    with torch.no_grad():
        for batch in batches:
            prompts = ROW_PROMPTS[:batch]
            tokens = torch.tensor([[7 + b] for b in range(batch)], device=device)
            pos = torch.tensor([[len(p) + 2] for p in prompts], device=device)  # each row at its own position
            refs = Generator(dec.use_decode_kernels(False), compile=False).generate(prompts, new).tokens
            plain_logits = dec.step(tokens, pos).float()  # the cache holds each row's sequence (written just above)
            counter = _op_counter()
            with counter:
                kernel_logits = dec.use_decode_kernels(max_rows=MAX_ROWS).step(tokens, pos).float()
            out["pdl"] = dec.decode_pdl
            eager[batch] = {"standard": refs,
                            "kernels": Generator(dec, compile=False).generate(prompts, new).tokens}
            out["batches"][batch] = {"logits_rel_error": _rel(kernel_logits, plain_logits),
                                     "kernel_calls": dict(counter.calls), "expected_calls": expected}
    gen = Generator(dec, backend=backend)
    started = time.perf_counter()
    for enabled in (False, True):
        dec.use_decode_kernels(enabled, max_rows=MAX_ROWS)
        gen.warmup(batch_sizes=batches, prompt_lengths=[5])
    out["warmup_s"] = time.perf_counter() - started
    compiled: dict[int, dict[str, list[list[int]]]] = {batch: {} for batch in batches}
    with torch.compiler.set_stance("fail_on_recompile"):
        for enabled in (False, True):  # back to the first setting warmed up, then the second: no recompile
            dec.use_decode_kernels(enabled, max_rows=MAX_ROWS)
            for batch in batches:
                compiled[batch]["kernels" if enabled else "standard"] = gen.generate(ROW_PROMPTS[:batch], new).tokens
    for batch in batches:
        row = out["batches"][batch]
        row["first_difference_from_eager_standard"] = {
            "eager_kernels": _first_difference(eager[batch]["kernels"], eager[batch]["standard"]),
            "compiled_standard": _first_difference(compiled[batch]["standard"], eager[batch]["standard"]),
            "compiled_kernels": _first_difference(compiled[batch]["kernels"], eager[batch]["standard"])}
        row["compiled_kernels_equal_eager"] = compiled[batch]["kernels"] == eager[batch]["kernels"]
        row["kernel_path_ran"] = row["kernel_calls"] == row["expected_calls"]
    return out


def parity_ok(res: dict[str, Any], tolerance: float = 1e-2) -> bool:
    """What ``selfcheck`` asks of ``decode_kernels_parity``: every batch close, the kernels run, compiled = eager.

    ``tolerance``: on these tiny fp16 models the standard path itself is 4e-3 to 6e-3 from float32
    arithmetic, and the kernel path 3e-3 to 5e-3 from the standard path (``kernel_check`` in the
    interpreter, 1 and 8 rows); a wrong row, slot or mask is about 0.8 away.
    """
    return "error" not in res and all(
        r["logits_rel_error"] < tolerance and r["kernel_path_ran"] and r["compiled_kernels_equal_eager"]
        for r in res["batches"].values())


def batch_scaling(device: torch.device, layers: int = 32, variants: tuple[str, ...] = ("pdl", "kernels"),
                  batches: tuple[int, ...] = (1, 8), new: int = 128, runs: int = 3,
                  budget: Any = None, preset: str = "llama-2-7b", backend: str = "inductor") -> list[dict[str, Any]]:
    """Tokens per second per sequence at each batch size, per variant, on ``preset``'s shapes (Llama-2-7B, bf16).

    One decoder and one ``Generator`` (``compile_key`` keeps each variant's graphs apart);
    a 5-token prompt per row, ``new`` tokens, the median of ``runs``. ``per_sequence_tok_s`` is
    ``GenerationResult.tokens_per_s`` (new tokens over the wall time of ``generate``, prefill
    included, as the decode benchmark counts); ``ratio`` is each batch's rate over batch 1's.
    A variant that would not fit ``budget`` (``decode.Budget``) is skipped and says so.
    """
    from graphfix.bench.decode import apply_variant
    from graphfix.bench.presets import random_hf_model
    from graphfix.engine import Generator, from_hf

    model = random_hf_model(preset, device, torch.bfloat16, num_hidden_layers=layers)
    dec = from_hf(model, max_batch_size=max(batches), max_seq_len=8 + new, share=True)
    gen = Generator(dec, backend=backend)
    rows, cost = [], 60.0 * len(batches) * layers / 32  # a first estimate of a variant's compile and runs
    for variant in variants:
        if budget is not None and not budget.fits(cost):
            rows.append({"variant": variant, "skipped": f"{budget.left():.0f} s left, about {cost:.0f} s needed"})
            continue
        started = time.perf_counter()
        apply_variant(dec, variant)
        gen.warmup(batch_sizes=batches, prompt_lengths=[5])
        row: dict[str, Any] = {"variant": variant, "preset": preset, "layers": layers, "decode_kernels": dec.decode_kernels,
                               "pdl": dec.decode_pdl, "warmup_s": time.perf_counter() - started}
        for batch in batches:
            prompts = [[11 + b, 200, 300, 400, 500] for b in range(batch)]
            results = [gen.generate(prompts, new) for _ in range(runs)]
            row[f"batch{batch}"] = {"per_sequence_tok_s": statistics.median(r.tokens_per_s for r in results),
                                    "decode_ms_per_token": statistics.median(r.decode_ms_per_token for r in results)}
        base = row[f"batch{batches[0]}"]["per_sequence_tok_s"]
        row["ratio"] = {f"batch{b}": row[f"batch{b}"]["per_sequence_tok_s"] / base for b in batches}
        cost = time.perf_counter() - started
        rows.append(row)
    apply_variant(dec, "fused")
    return rows


def main(argv: list[str] | None = None) -> int:
    """``decode_kernels_parity`` alone: one JSON line per model; exit 1 unless every one is ``parity_ok``.

    ``--interpret`` runs it on CPU tensors with the Triton kernels in Triton's interpreter and ``aot_eager``
    (how the CPU tests check the compiled kernel path); the default is CUDA with Inductor and CUDA graphs.
    """
    import argparse
    import json
    import os
    import sys

    p = argparse.ArgumentParser(prog="python -m graphfix.bench.kernel_parity", description=main.__doc__.splitlines()[0])
    p.add_argument("--interpret", action="store_true", help="CPU, Triton's interpreter, aot_eager")
    p.add_argument("--models", default="llama,qwen2")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--new", type=int, default=24)
    args = p.parse_args(argv)
    from graphfix.engine.kernels import INTERPRET

    if args.interpret and not INTERPRET:  # Triton reads it when the kernels are decorated: start again with it set
        argv = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "graphfix.bench.kernel_parity", *argv],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    device = torch.device("cpu" if args.interpret else "cuda")
    batches = tuple(int(b) for b in args.batches.split(","))
    ok = True
    for kind in args.models.split(","):
        res = decode_kernels_parity(device, kind, batches, args.new, "aot_eager" if args.interpret else "inductor")
        ok &= parity_ok(res)
        print(json.dumps({**res, "ok": parity_ok(res)}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
