"""Check the Triton decode kernels against their eager references: ``python -m graphfix.bench.kernel_check``.

On a GPU it checks the kernels the decoder will run (bf16 by default), launched plainly
and with programmatic dependent launch where the GPU has it. On a CPU with ``triton``
installed, ``--interpret`` runs the same kernels in Triton's interpreter
(``TRITON_INTERPRET=1``, set before Triton is imported) on CPU tensors, which is how
the CPU test suite checks their logic: masks, odd sizes, splits, windows, grouped heads,
1 to 16 rows at different positions.

``--parts kernels,decoder`` adds the whole decoder: tiny Llama, Qwen2 (biases) and Mistral (sliding
window) models decoding 2 to 16 rows at different positions, the decode kernels against
the standard path on the same tokens (logits every step, greedy tokens, and how many
kernel calls each step made: the kernel path must have run).
Prints one JSON line per case and exits 1 when any error exceeds its tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}
"""Relative error (norm of the difference over the norm of the reference) allowed per dtype."""

GEMV_CASES = [  # (N, K, prologue/epilogue)
    (64, 256, {}), (40, 200, {}), (96, 128, {"norm": True}), (48, 160, {"norm": True, "bias": True}),
    (64, 96, {"silu": True}), (32, 128, {"silu": True, "residual": True}), (72, 64, {"residual": True}),
]
GEMV_ROWS = (1, 2, 3, 8, 16)
"""Rows of every GEMV case: one row is the GEMV, 2 to 16 the rows kernel (``kernels.MAX_ROWS``)."""
ATTENTION_CASES = [  # (batch, heads, kv heads, head dim, cache slots, kv_len, positions, window)
    (1, 4, 4, 32, 96, 64, [40], None), (2, 4, 2, 16, 128, 128, [0, 127], None),
    (2, 6, 2, 32, 160, 160, [150, 33], 20), (1, 2, 1, 64, 64, 64, [63], 8), (3, 8, 8, 16, 256, 256, [5, 200, 255], None),
    (8, 8, 2, 16, 96, 96, [0, 5, 31, 32, 63, 64, 90, 95], None), (8, 4, 2, 32, 128, 96, [95, 1, 40, 17, 66, 0, 80, 33], 16),
    (16, 4, 1, 16, 64, 64, [(7 * i) % 64 for i in range(16)], 12),
]

ROPE_CASES = [  # (batch, heads, kv heads, head dim, cache slots, positions, interleaved)
    (1, 4, 4, 32, 64, [40], False), (2, 6, 2, 16, 48, [0, 47], False), (2, 4, 1, 64, 32, [31, 5], True),
    (3, 8, 8, 16, 40, [1, 20, 39], True), (8, 4, 2, 16, 48, [0, 3, 47, 12, 30, 29, 8, 41], False),
    (16, 2, 1, 32, 40, [(3 * i + 1) % 40 for i in range(16)], True),
]
DECODER_CASES = [  # (model, config overrides, rows): prompts of different lengths, so rows sit at different positions
    ("llama", {}, 2), ("llama", {}, 16), ("qwen2", {}, 3), ("qwen2", {}, 8), ("mistral", {"sliding_window": 6}, 8),
]
INTERPRETER_DECODER_CASES = [("llama", {}, 5), ("qwen2", {}, 3), ("mistral", {"sliding_window": 6}, 6)]
"""On CPU: the interpreter runs each program of a grid in Python (about 4 ms each for attention), so fewer rows."""
DECODER_STEPS = 3
PARTS = ("kernels", "decoder")
ROUNDING_FACTOR = 3.0
"""In bf16/fp16 the decoder's kernel path may be this many times further from float32 arithmetic than the standard
path (on the tiny models, 1.2 to 2 times in bf16 in the interpreter): rounding. A planted bug (attention one slot
short, or two rows' queries swapped) was 18 to 26 times further."""


def _rel(out: Any, ref: Any) -> float:
    diff = (out.float() - ref.float()).norm().item()
    return diff / max(ref.float().norm().item(), 1e-12)


def gemv_errors(device: str, dtype: Any) -> Iterator[dict[str, Any]]:
    import torch

    from graphfix.engine.kernels import fused_linear_reference, pdl_supported

    gen = torch.Generator().manual_seed(0)
    for rows in GEMV_ROWS:
        for n, k, flags in GEMV_CASES:
            def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
                return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

            x = rand(rows, 1, 2 * k if flags.get("silu") else k)
            w = rand(n, k, scale=k ** -0.5)
            kwargs = {"norm_weight": rand(k) if flags.get("norm") else None, "eps": 1e-5,
                      "silu": bool(flags.get("silu")), "bias": rand(n) if flags.get("bias") else None,
                      "residual": rand(rows, 1, n) if flags.get("residual") else None}
            ref = fused_linear_reference(x.float(), w.float(), **{key: (v.float() if isinstance(v, torch.Tensor) else v)
                                                                   for key, v in kwargs.items()}).view(rows, n)
            args = (x, w, kwargs["norm_weight"], kwargs["eps"], kwargs["silu"], kwargs["bias"], kwargs["residual"])
            case = {"shape": [n, k], "rows": rows, "flags": sorted(flags)}
            yield {"kernel": "fused_gemv", **case, "rel_error": _rel(torch.ops.graphfix.fused_gemv(*args), ref)}
            if pdl_supported(device):
                yield {"kernel": "fused_gemv_pdl", **case,
                       "rel_error": _rel(torch.ops.graphfix.fused_gemv_pdl(*args), ref)}
            if not flags and rows == 1:
                plain = torch.ops.graphfix.gemv(x.view(1, k), w)
                yield {"kernel": "gemv", **case, "rel_error": _rel(plain, ref)}


def attention_errors(device: str, dtype: Any) -> Iterator[dict[str, Any]]:
    import torch

    from graphfix.engine.attention_kernel import decode_attention_reference, split_plan
    from graphfix.engine.kernels import pdl_supported

    gen = torch.Generator().manual_seed(1)
    for bsz, heads, kv_heads, dim, slots, kv_len, positions, window in ATTENTION_CASES:
        q = torch.randn(bsz, heads, dim, generator=gen).to(device=device, dtype=dtype)
        k = torch.randn(bsz, kv_heads, slots, dim, generator=gen).to(device=device, dtype=dtype)
        v = torch.randn(bsz, kv_heads, slots, dim, generator=gen).to(device=device, dtype=dtype)
        pos = torch.tensor(positions, device=device)
        kk, vv = k[:, :, :kv_len], v[:, :, :kv_len]  # a prefix view of the cache, as the decoder passes it
        ref = decode_attention_reference(q.float(), kk.float(), vv.float(), pos, window)
        for pdl in (False, True) if pdl_supported(device) else (False,):
            op = torch.ops.graphfix.decode_attention_pdl if pdl else torch.ops.graphfix.decode_attention
            out = op(q, kk, vv, pos, window or 0, dim ** -0.5)
            yield {"kernel": "decode_attention_pdl" if pdl else "decode_attention",
                   "shape": [bsz, heads, kv_heads, dim, kv_len], "window": window,
                   "splits": split_plan(bsz * heads, kv_len)[0], "rel_error": _rel(out, ref)}


def _rope_tables(dim: int, slots: int, interleaved: bool, device: str, dtype: Any) -> tuple[Any, Any]:
    """The decoder's tables (``LlamaDecoder.allocate``): float32 interleaved, half layout cast to the dtype (as HF)."""
    from graphfix.rewrite.blocks.rope import rope_tables

    cos, sin = rope_tables(dim, slots, 10000.0, None, "interleaved" if interleaved else "half", device)
    return (cos, sin) if interleaved else (cos.to(dtype), sin.to(dtype))


def rope_errors(device: str, dtype: Any) -> Iterator[dict[str, Any]]:
    """``graphfix::rope_cache`` against ``rope_cache_reference`` on the same inputs: q, then both cache writes."""
    import torch

    from graphfix.engine.kernels import pdl_supported
    from graphfix.engine.rope_kernel import rope_cache_reference

    gen = torch.Generator().manual_seed(2)
    for bsz, heads, kv_heads, dim, slots, positions, interleaved in ROPE_CASES:
        cos, sin = _rope_tables(dim, slots, interleaved, device, dtype)
        qkv = torch.randn(bsz, 1, (heads + 2 * kv_heads) * dim, generator=gen).to(device=device, dtype=dtype)
        pos = torch.tensor(positions, device=device)
        caches = [torch.randn(bsz, kv_heads, slots, dim, generator=gen).to(device=device, dtype=dtype) for _ in "kv"]
        ref_k, ref_v = (c.clone() for c in caches)
        # shared_row: the rows as consecutive tokens of the sequence in cache row 0 (a verify step at batch 1)
        for shared in (False, True) if len(set(positions)) == len(positions) else (False,):
            ref_k, ref_v = (c.clone() for c in caches)
            ref_q = rope_cache_reference(qkv, pos, cos, sin, ref_k, ref_v, heads, kv_heads, interleaved, shared)
            for pdl in (False, True) if pdl_supported(device) else (False,):
                k, v = (c.clone() for c in caches)
                q = torch.ops.graphfix.rope_cache(qkv, pos, cos, sin, k, v, heads, kv_heads, interleaved, pdl, shared)
                yield {"kernel": "rope_cache_pdl" if pdl else "rope_cache", "shape": [bsz, heads, kv_heads, dim],
                       "interleaved": interleaved, "shared_row": shared,
                       "rel_error": max(_rel(q, ref_q), _rel(k, ref_k), _rel(v, ref_v))}


def rope_compiled_errors(device: str, dtype: Any) -> Iterator[dict[str, Any]]:
    """``graphfix::rope_cache`` inside an Inductor graph, writing a module's cache buffers over three steps: the
    writes must land in the buffers as in eager, and Inductor must call the op on them in place (no clone or
    copy of a cache in the generated code: a copy would cost the whole cache every step)."""
    import torch
    from torch._inductor.utils import run_and_get_code

    from graphfix.engine.rope_kernel import rope_cache_reference

    bsz, heads, kv_heads, dim, slots = 2, 4, 2, 32, 48
    cos, sin = _rope_tables(dim, slots, False, device, dtype)
    gen = torch.Generator().manual_seed(3)

    class Caches(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("k", torch.zeros(bsz, kv_heads, slots, dim, device=device, dtype=dtype))
            self.register_buffer("v", torch.zeros(bsz, kv_heads, slots, dim, device=device, dtype=dtype))

        def forward(self, qkv: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            return torch.ops.graphfix.rope_cache(qkv, pos, cos, sin, self.k, self.v, heads, kv_heads, False, False,
                                                 False)

    caches, ref = Caches(), Caches()
    step = torch.compile(caches, fullgraph=True)
    worst, code = 0.0, []
    for positions in ([3, 17], [4, 18], [40, 0]):
        qkv = torch.randn(bsz, 1, (heads + 2 * kv_heads) * dim, generator=gen).to(device=device, dtype=dtype)
        pos = torch.tensor(positions, device=device)
        q, new_code = run_and_get_code(step, qkv, pos)
        code += new_code
        ref_q = rope_cache_reference(qkv, pos, cos, sin, ref.k, ref.v, heads, kv_heads, False)
        worst = max(worst, _rel(q, ref_q), _rel(caches.k, ref.k), _rel(caches.v, ref.v))
    copies = [line.strip() for text in code for line in text.splitlines() if re.search(r"\bclone\b|copy_\(", line)]
    yield {"kernel": "rope_cache_compiled", "shape": [bsz, heads, kv_heads, dim], "in_place": not copies,
           "rel_error": worst if not copies else float("inf")}


def _op_counter() -> Any:
    """A dispatch mode counting the ``graphfix::`` ops called under it (``_pdl`` launches under the plain name)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: Counter[str] = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "graphfix":
                self.calls[func.__name__.split(".")[0].removesuffix("_pdl")] += 1
            return func(*args, **(kwargs or {}))

    return OpCounter()


def _prompts(rows: int) -> list[list[int]]:
    """Prompts of different lengths (2 to 14 tokens), so the rows decode at different positions."""
    return [[(7 * b + 3 * i) % 120 + 1 for i in range(2 + (5 * b) % 13)] for b in range(rows)]


def decoder_errors(device: str, dtype: Any, cases: list | None = None,
                   steps: int = DECODER_STEPS) -> Iterator[dict[str, Any]]:
    """The decoder's kernel path against its standard path, on 2 to 16 rows at different positions.

    Two decoders on the same weights (one with ``use_decode_kernels``), and a float32 one on the same
    (rounded) weights, each prefilled with the same prompts by the standard path. Then ``steps``
    greedy decode steps, all fed the standard path's tokens:

    - ``rel_error``: the worst relative error of the kernel path's logits against the standard path's;
    - ``kernel_vs_fp32``, ``standard_vs_fp32``: each path's worst error against float32 arithmetic. In
      bf16/fp16 the two paths round differently (``rel_error`` is about twice either), so what is
      asked of the kernels is to be as close to float32 as the standard path is (``ROUNDING_FACTOR``);
    - ``tokens_equal``: the kernel path's greedy token equals the standard one at every step (so, by
      induction, greedy decoding gives the same tokens). Asked in float32; in bf16 a near tie may flip;
    - ``calls_per_step``: the calls of each kernel per step (``expected_calls``: 4 GEMVs, the RoPE/cache
      write and attention per layer, the LM head's GEMV): the kernel path ran.

    The decoders allocate 32 slots: the interpreter runs each program of a grid in Python, and a
    shorter cache means fewer.
    """
    import torch

    from graphfix.bench.presets import tiny_hf_model
    from graphfix.engine import from_hf

    for kind, overrides, rows in cases or (INTERPRETER_DECODER_CASES if device == "cpu" else DECODER_CASES):
        model = tiny_hf_model(kind, device, dtype, **overrides)
        plain = from_hf(model, max_batch_size=rows, max_seq_len=32, share=True)
        fused = from_hf(model, max_batch_size=rows, max_seq_len=32, share=True).use_decode_kernels(max_rows=rows)
        if dtype == torch.float32:
            exact = plain
        else:  # the same weights, rounded to the dtype, computed in float32 (a model of its own: share=True)
            exact = from_hf(tiny_hf_model(kind, device, dtype, **overrides).float(), rows, 32)
        prompts = _prompts(rows)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        padded = torch.zeros(rows, int(lengths.max()), dtype=torch.long, device=device)  # padding above each prompt
        for b, prompt in enumerate(prompts):
            padded[b, :len(prompt)] = torch.tensor(prompt, device=device)
        errors, same, counter = {"rel_error": 0.0, "kernel_vs_fp32": 0.0, "standard_vs_fp32": 0.0}, True, _op_counter()
        with torch.no_grad():
            positions = torch.arange(padded.shape[1], device=device).expand(rows, -1)
            for dec in {id(d): d for d in (fused, exact)}.values():  # several tokens a row: the standard path
                dec.step(padded, positions)
            logits = plain.step(padded, positions)[torch.arange(rows, device=device), lengths - 1]
            tokens = logits.argmax(-1).view(rows, 1)
            for t in range(steps):
                pos = (lengths + t).view(rows, 1)
                expected = plain.step(tokens, pos)
                truth = expected if exact is plain else exact.step(tokens, pos)
                with counter:
                    got = fused.step(tokens, pos)
                for key, a, b in (("rel_error", got, expected), ("kernel_vs_fp32", got, truth),
                                  ("standard_vs_fp32", expected, truth)):
                    errors[key] = max(errors[key], _rel(a, b))
                same = same and torch.equal(got.argmax(-1), expected.argmax(-1))
                tokens = expected.argmax(-1)
        layers = plain.config.n_layers
        yield {"kernel": "decoder", "model": kind, "rows": rows, "window": overrides.get("sliding_window"),
               "dtype": str(dtype).removeprefix("torch."), "steps": steps, **errors, "tokens_equal": same,
               "calls_per_step": {name: n / steps for name, n in sorted(counter.calls.items())},
               "expected_calls": {"decode_attention": layers, "fused_gemv": 4 * layers + 1, "rope_cache": layers}}


def run(device: str, dtype_name: str, parts: tuple[str, ...] = ("kernels",)) -> list[dict[str, Any]]:
    """The cases of ``parts`` (``PARTS``) on ``device`` in ``dtype_name``; each row has ``ok`` against
    ``TOLERANCE`` (and, for the decoder, equal greedy tokens and every kernel called as expected)."""
    import torch

    dtype = getattr(torch, dtype_name)
    rows = []
    if "kernels" in parts:
        rows += [*gemv_errors(device, dtype), *attention_errors(device, dtype), *rope_errors(device, dtype),
                 *rope_compiled_errors(device, dtype)]
    if "decoder" in parts:
        rows += list(decoder_errors(device, dtype))
    for row in rows:
        row["ok"] = row["rel_error"] <= TOLERANCE[dtype_name]
        if row["kernel"] == "decoder":
            if dtype_name == "float32":
                close = row["ok"] and row["tokens_equal"]
            else:  # as close to float32 as the standard path, within a factor (the two paths round differently)
                close = row["kernel_vs_fp32"] <= ROUNDING_FACTOR * max(row["standard_vs_fp32"], TOLERANCE[dtype_name])
            row["ok"] = close and row["calls_per_step"] == row["expected_calls"]
    return rows


def triton_ready(module: str, interpret: bool, argv: list[str] | None) -> bool:
    """Start ``python -m module`` again under Triton's interpreter when ``interpret`` asks for it (Triton reads
    ``TRITON_INTERPRET`` when the kernels are decorated, so it must be set before they are imported); ``False``
    (said on stderr) when Triton is missing."""
    from graphfix.engine.kernels import HAS_TRITON, INTERPRET

    if interpret and not INTERPRET:
        argv = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", module, *argv], {**os.environ, "TRITON_INTERPRET": "1"})
    if not HAS_TRITON:
        print(f"{module}: triton is not installed (pip install triton)", file=sys.stderr)
    return HAS_TRITON


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m graphfix.bench.kernel_check", description=__doc__.splitlines()[0])
    p.add_argument("--interpret", action="store_true", help="Triton's interpreter on CPU tensors")
    p.add_argument("--dtype", default=None, choices=sorted(TOLERANCE), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--parts", default="kernels",
                   help="comma list of kernels (each kernel, 1 to 16 rows) and decoder (the decoder's kernel path)")
    args = p.parse_args(argv)
    if not triton_ready("graphfix.bench.kernel_check", args.interpret, argv):
        return 2
    device = "cpu" if args.interpret else "cuda"
    dtype = args.dtype or ("float32" if args.interpret else "bfloat16")
    parts = tuple(x for x in args.parts.split(",") if x)
    if not parts or set(parts) - set(PARTS):
        p.error(f"--parts: a comma list of {', '.join(PARTS)}")
    rows = run(device, dtype, parts)
    for row in rows:
        print(json.dumps(row))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
