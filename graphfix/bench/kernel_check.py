"""Check the Triton decode kernels against their eager references: ``python -m graphfix.bench.kernel_check``.

On a GPU it checks the kernels the decoder will run (bf16 by default). On a CPU with
``triton`` installed, ``--interpret`` runs the same kernels in Triton's interpreter
(``TRITON_INTERPRET=1``, set before Triton is imported) on CPU tensors, which is how
the CPU test suite checks their logic: masks, odd sizes, splits, windows, grouped heads.
Prints one JSON line per case and exits 1 when any error exceeds its tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}
"""Relative error (norm of the difference over the norm of the reference) allowed per dtype."""

GEMV_CASES = [  # (N, K, prologue/epilogue)
    (64, 256, {}), (40, 200, {}), (96, 128, {"norm": True}), (48, 160, {"norm": True, "bias": True}),
    (64, 96, {"silu": True}), (32, 128, {"silu": True, "residual": True}), (72, 64, {"residual": True}),
]
ATTENTION_CASES = [  # (batch, heads, kv heads, head dim, cache slots, kv_len, positions, window)
    (1, 4, 4, 32, 96, 64, [40], None), (2, 4, 2, 16, 128, 128, [0, 127], None),
    (2, 6, 2, 32, 160, 160, [150, 33], 20), (1, 2, 1, 64, 64, 64, [63], 8), (3, 8, 8, 16, 256, 256, [5, 200, 255], None),
]

ROPE_CASES = [  # (batch, heads, kv heads, head dim, cache slots, positions, interleaved)
    (1, 4, 4, 32, 64, [40], False), (2, 6, 2, 16, 48, [0, 47], False), (2, 4, 1, 64, 32, [31, 5], True),
    (3, 8, 8, 16, 40, [1, 20, 39], True),
]


def _rel(out: Any, ref: Any) -> float:
    diff = (out.float() - ref.float()).norm().item()
    return diff / max(ref.float().norm().item(), 1e-12)


def gemv_errors(device: str, dtype: Any) -> Iterator[dict[str, Any]]:
    import torch

    from graphfix.engine.kernels import fused_linear_reference, pdl_supported

    gen = torch.Generator().manual_seed(0)
    for n, k, flags in GEMV_CASES:
        def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

        x = rand(1, 1, 2 * k if flags.get("silu") else k)
        w = rand(n, k, scale=k ** -0.5)
        kwargs = {"norm_weight": rand(k) if flags.get("norm") else None, "eps": 1e-5, "silu": bool(flags.get("silu")),
                  "bias": rand(n) if flags.get("bias") else None, "residual": rand(1, 1, n) if flags.get("residual") else None}
        out = torch.ops.graphfix.fused_gemv(x, w, kwargs["norm_weight"], kwargs["eps"], kwargs["silu"], kwargs["bias"],
                                            kwargs["residual"])
        ref = fused_linear_reference(x.float(), w.float(), **{key: (v.float() if isinstance(v, torch.Tensor) else v)
                                                               for key, v in kwargs.items()})
        yield {"kernel": "fused_gemv", "shape": [n, k], "flags": sorted(flags), "rel_error": _rel(out.view(1, n), ref.view(1, n))}
        if pdl_supported(device):
            out = torch.ops.graphfix.fused_gemv_pdl(x, w, kwargs["norm_weight"], kwargs["eps"], kwargs["silu"],
                                                    kwargs["bias"], kwargs["residual"])
            yield {"kernel": "fused_gemv_pdl", "shape": [n, k], "flags": sorted(flags),
                   "rel_error": _rel(out.view(1, n), ref.view(1, n))}
        if not flags:
            plain = torch.ops.graphfix.gemv(x.view(1, k), w)
            yield {"kernel": "gemv", "shape": [n, k], "flags": [], "rel_error": _rel(plain, ref.view(1, n))}


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
        ref_q = rope_cache_reference(qkv, pos, cos, sin, ref_k, ref_v, heads, kv_heads, interleaved)
        for pdl in (False, True) if pdl_supported(device) else (False,):
            k, v = (c.clone() for c in caches)
            q = torch.ops.graphfix.rope_cache(qkv, pos, cos, sin, k, v, heads, kv_heads, interleaved, pdl)
            yield {"kernel": "rope_cache_pdl" if pdl else "rope_cache", "shape": [bsz, heads, kv_heads, dim],
                   "interleaved": interleaved, "rel_error": max(_rel(q, ref_q), _rel(k, ref_k), _rel(v, ref_v))}


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
            return torch.ops.graphfix.rope_cache(qkv, pos, cos, sin, self.k, self.v, heads, kv_heads, False, False)

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


def run(device: str, dtype_name: str) -> list[dict[str, Any]]:
    """All cases on ``device`` in ``dtype_name``; each row has ``ok`` against ``TOLERANCE``."""
    import torch

    dtype = getattr(torch, dtype_name)
    rows = [*gemv_errors(device, dtype), *attention_errors(device, dtype), *rope_errors(device, dtype),
            *rope_compiled_errors(device, dtype)]
    for row in rows:
        row["ok"] = row["rel_error"] <= TOLERANCE[dtype_name]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m graphfix.bench.kernel_check", description=__doc__.splitlines()[0])
    p.add_argument("--interpret", action="store_true", help="Triton's interpreter on CPU tensors")
    p.add_argument("--dtype", default=None, choices=sorted(TOLERANCE), help="default: bfloat16 on CUDA, float32 on CPU")
    args = p.parse_args(argv)
    from graphfix.engine.kernels import HAS_TRITON, INTERPRET

    if args.interpret and not INTERPRET:  # Triton reads it when the kernels are decorated: start again with it set
        argv = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "graphfix.bench.kernel_check", *argv],
                  {**os.environ, "TRITON_INTERPRET": "1"})

    if not HAS_TRITON:
        print("kernel_check: triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    device = "cpu" if args.interpret else "cuda"
    dtype = args.dtype or ("float32" if args.interpret else "bfloat16")
    rows = run(device, dtype)
    for row in rows:
        print(json.dumps(row))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
