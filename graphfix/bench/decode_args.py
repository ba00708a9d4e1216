"""The decode benchmark's options: the systems and variants it knows, its two presets, and the parser.

Apart from ``decode.py`` (which measures) because ``graphfix bench`` builds the same parser
into the CLI, and the warm-start child re-reads the same options.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SYSTEMS = ("copy", "graphfix", "hf-static", "hf-eager", "optimize")
VARIANTS = ("fused", "gemv", "kernels", "pdl", "attention", "unfused")
QUICK = {"model": "llama-2-7b", "batch_sizes": "1", "prompt_len": 5, "new_tokens": 200,
         "systems": "copy,graphfix,hf-static", "ttft_lengths": "", "variants": "fused", "warm_start": False}
FULL = {"model": "llama-2-7b", "batch_sizes": "1,8", "prompt_len": 5, "new_tokens": 200,
        "systems": ",".join(SYSTEMS), "ttft_lengths": "512,2048", "variants": "pdl,kernels", "warm_start": True}
"""The whole comparison in one command within 10 minutes on one GPU: one graphfix variant measured in full (each
costs a cold compile of 60-90 s; ``kernels`` stands in where PDL is missing, and runs last if time is left), every
reference system, batch 1 and 8, TTFT, warm start."""

def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description="Decode benchmark: copy bandwidth, HF eager, HF static "
                                                      "(compiled), graphfix, on the same weights")
    p.add_argument("--model", help="architecture (llama-2-7b, llama-2-13b, llama-3-8b, llama-2-70b, tiny) "
                   "or a checkpoint folder (default llama-2-7b)")
    p.add_argument("--quick", action="store_true",
                   help="llama-2-7b, batch 1, 5-token prompt, 200 new tokens, copy + graphfix + HF static "
                        "(options given explicitly still apply)")
    p.add_argument("--systems", help=f"comma list of {', '.join(SYSTEMS)}")
    p.add_argument("--batch-sizes", help="comma list (default 1,8)")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--ttft-lengths", help="comma list of prompt lengths for time to first token (default 512,2048)")
    p.add_argument("--variants", help="graphfix variants, the first that runs measured in full: fused (cuBLAS), "
                   "gemv (fused + the Triton GEMV of graphfix.engine.kernels for batch 1), kernels (fused + the "
                   "decode kernels: norm/SiLU/residual folded into Triton GEMVs, RoPE + cache write in one kernel, split-KV "
                   "attention, batch 1), "
                   "pdl (kernels, every kernel of a layer launched with programmatic dependent launch, sm_90+), "
                   "attention (gemv + "
                   "the split-KV attention only), unfused (default: pdl,kernels)")
    p.add_argument("--warm-start", dest="warm_start", action="store_true", default=None,
                   help="measure a second process's warmup with the compile cache")
    p.add_argument("--no-warm-start", dest="warm_start", action="store_false")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the kernel breakdown")
    p.add_argument("--inductor-option", action="append", default=[], metavar="KEY=VALUE",
                   help="Inductor option for graphfix's graphs, e.g. coordinate_descent_tuning=1 (repeatable)")
    p.add_argument("--quantize", default=None, metavar="SCHEME",
                   help="graphfix systems on weight-only int8 / int4 / int4:G weights (the HF baselines stay float)")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, help="override the preset's layer count (quick experiments)")
    p.add_argument("--time-budget", type=float, default=540.0, help="seconds; sections that would not fit are skipped")
    p.add_argument("--cache-dir", help="compile cache directory (default: a fresh temporary one, so compiles are cold)")
    p.add_argument("--json", dest="json_path", help="write the results as JSON here")
    p.add_argument("--markdown", dest="md_path", help="write the Markdown table here")
    p.add_argument("--child-warm", action="store_true", help=argparse.SUPPRESS)
    return p


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    opts: dict[str, Any] = {}
    for item in args.inductor_option:
        key, _, value = item.partition("=")
        opts[key] = json.loads(value) if value not in ("", None) else True
    args.inductor_options = opts
    return args


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]
