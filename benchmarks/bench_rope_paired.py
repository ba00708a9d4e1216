"""Complex RoPE before and after real-rope's paired rewrite, compiled with Inductor: time, fallbacks, parity.

A module holds a complex table (``torch.polar``) and applies Meta's ``apply_rotary_emb`` (the copy in
tests/fixtures/rope_styles.py) to q and k of Llama-2-7B attention shapes (32 heads of 128, bf16), at
one decode position and at a prefill of ``--prefill`` tokens. It is timed eager, compiled as written
(Inductor runs the complex ops as ATen fallbacks), and compiled after ``RealRopePass`` (real pairs,
generated code). For each compiled variant it prints the complex fallbacks Inductor's graph holds
(``graphfix.diagnose.inductor_scan``) and the largest difference from the eager original.

    PYTHONPATH=. python benchmarks/bench_rope_paired.py                 # CUDA if present, else CPU
    PYTHONPATH=. python benchmarks/bench_rope_paired.py --prefill 512 --device cpu
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from graphfix.diagnose.inductor_scan import scan_fallbacks
from graphfix.rewrite.pass_manager import PassContext
from passes.rope import RealRopePass
from tests.fixtures.rope_styles import apply_rotary_emb, precompute_freqs_cis

HEADS, HEAD_DIM, MAX_LEN = 32, 128, 4096


class ComplexRope(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("freqs_cis", precompute_freqs_cis(HEAD_DIM, MAX_LEN), persistent=False)

    def forward(self, xq: torch.Tensor, xk: torch.Tensor, input_pos: torch.Tensor):
        return apply_rotary_emb(xq, xk, self.freqs_cis[input_pos])


def _time_ms(fn, *args, iters: int) -> float:
    """Median wall time of one call, synchronised, after warm-up calls."""
    for _ in range(5):
        fn(*args)
    samples = []
    for _ in range(iters):
        if args[0].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args)
        if args[0].is_cuda:
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return sorted(samples)[len(samples) // 2]


def _cuda_ms(fn, *args, iters: int) -> float:
    """Median GPU time of one call from CUDA events (launch overhead included, host gaps not)."""
    for _ in range(5):
        fn(*args)
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return sorted(samples)[len(samples) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    device = torch.device(args.device)

    original = ComplexRope().to(device)
    paired = ComplexRope().to(device)
    result = RealRopePass().apply(paired, PassContext())
    assert result.rewritten and not result.skipped, result
    rows = []
    for seqlen, start in ((1, 1000), (args.prefill, 0)):
        gen = torch.Generator(device=device).manual_seed(0)
        xq = torch.randn(1, seqlen, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
        xk = torch.randn(1, seqlen, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
        pos = torch.arange(start, start + seqlen, device=device)
        reference = original(xq, xk, pos)
        row = {"tokens": seqlen, "eager_ms": _time_ms(original, xq, xk, pos, iters=args.iters)}
        for name, module in (("compiled", original), ("paired_compiled", paired)):
            torch._dynamo.reset()
            with scan_fallbacks() as scanner:
                compiled = torch.compile(module, fullgraph=True, backend="inductor")
                out = compiled(xq, xk, pos)
            row[f"{name}_complex_fallbacks"] = sorted({f.op for f in scanner.found if "complex" in f.reason})
            row[f"{name}_max_diff"] = max((a.float() - b.float()).abs().max().item() for a, b in zip(out, reference))
            row[f"{name}_ms"] = _time_ms(compiled, xq, xk, pos, iters=args.iters)
            if device.type == "cuda":
                row[f"{name}_gpu_ms"] = _cuda_ms(compiled, xq, xk, pos, iters=args.iters)
        rows.append(row)
    print(json.dumps({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
