"""``graphfix generate`` and ``graphfix bench``: the engine (``graphfix.engine``) from the command line.

    graphfix generate MODEL --prompt "Once upon a time" --max-new-tokens 64 [--temperature 0.7 --top-p 0.9]
    graphfix generate MODEL --prompt-ids 1,15043,29892 --prompt-ids 1,450 --no-compile
    graphfix bench --quick --json out.json --markdown out.md

``MODEL`` is anything ``graphfix report`` loads with weights: a Hugging Face folder, a
GGUF file, a Meta checkpoint folder, or ``smollm2``. The model's parameters move into
graphfix's decoder (``from_hf`` / ``from_meta``); text prompts need the model's
tokenizer, token-id prompts do not. Several ``--prompt`` give a batch (any lengths).
The main CLI registers both subcommands through ``add_parser``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from graphfix.errors import InputError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_parser(subparsers: Any) -> None:
    """Add ``generate`` and ``bench`` to the main parser's subcommands."""
    p = subparsers.add_parser("generate", help="generate text with graphfix's compiled engine",
                              description="Load a model, move its weights into graphfix's static-cache decoder, "
                                          "compile prefill and decode, and generate.")
    p.add_argument("model", metavar="MODEL", help="HF folder, .gguf file, Meta checkpoint folder or 'smollm2'")
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", default=[], metavar="IDS",
                   help="a prompt as comma-separated token ids (repeat for a batch; no tokenizer needed)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--compile", dest="compile", action="store_true", default=True, help="compile (default)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="run eagerly")
    p.add_argument("--backend", default=None,
                   help="torch.compile backend (default: inductor on cuda, aot_eager on cpu)")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--triton-gemv", action="store_true", help="batch-1 decode linears through graphfix's Triton GEMV")
    p.add_argument("--decode-kernels", action="store_true",
                   help="decode of 1 to 16 rows through graphfix's Triton kernels (norm/SiLU/residual folded into the GEMVs, "
                        "split-KV attention); their eager references off CUDA")
    p.add_argument("--unfused", action="store_true", help="keep q/k/v and gate/up as separate linears")
    p.add_argument("--quantize", default=None, metavar="SCHEME",
                   help="weight-only int8, int4 or int4:G (G = 32, 64, 128) (docs/quantization.md); a checkpoint "
                        "written by 'graphfix convert --quantize' is already quantized")
    p.add_argument("--max-seq-len", type=int, default=None, help="cache length (default: longest prompt + new tokens)")
    p.add_argument("--cache-dir", default=None, help="persistent compile cache (warm starts)")
    p.add_argument("--stream", action="store_true", help="print tokens as they come (batch 1)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_generate)

    from graphfix.bench.decode import build_parser

    b = subparsers.add_parser("bench", help="decode benchmark: copy bandwidth, HF eager/static, graphfix",
                              description="Benchmark decode speed (same as benchmarks/bench_decode.py).")
    build_parser(b)
    b.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from graphfix.bench.decode import run

    return run(args)


def _say(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr, flush=True)


def _tokenizer(spec: str) -> Any:
    """The model's tokenizer, or ``None`` when there is none to load."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from graphfix.diagnose import sources

    try:
        if spec == sources.SMOLLM2_ALIAS:
            path = sources.smollm2_gguf_path()
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        path = Path(spec)
        if path.is_file() and path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        if path.is_dir() and (path / "config.json").exists():
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception:  # noqa: BLE001 - a missing or broken tokenizer only means token-id prompts
        return None
    return None


def _prompts(args: argparse.Namespace, tokenizer: Any) -> list[list[int]]:
    rows: list[list[int]] = []
    for item in args.prompt_ids:
        try:
            rows.append([int(t) for t in item.replace(" ", "").split(",") if t])
        except ValueError as exc:
            raise InputError(f"--prompt-ids expects comma-separated integers, got {item!r}") from exc
    if args.prompt:
        if tokenizer is None:
            raise InputError("no tokenizer found for this model", hint="give --prompt-ids instead of --prompt")
        rows += [tokenizer(text)["input_ids"] for text in args.prompt]
    if not rows:
        raise InputError("nothing to generate from", hint="give --prompt TEXT or --prompt-ids 1,2,3")
    return rows


def build_step_model(model: torch.nn.Module, batch: int, max_seq_len: int, fuse: bool) -> Any:
    """Move a loaded HF or Meta model's weights into graphfix's decoder."""
    from graphfix.engine import from_hf, from_meta
    from graphfix.rewrite.blocks import meta_llama

    if meta_llama.is_meta_transformer(model):
        return from_meta(model, max_batch_size=batch, max_seq_len=max_seq_len, fuse=fuse)
    return from_hf(model, max_batch_size=batch, max_seq_len=max_seq_len, fuse=fuse)


def run_generate(args: argparse.Namespace) -> int:
    from graphfix.diagnose import sources
    from graphfix.engine import CompileCache, Generator, SamplingParams
    from graphfix.engine.kernels import use_triton_gemv

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    backend = args.backend or ("inductor" if device.type == "cuda" else "aot_eager")
    if args.max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1")
    try:
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if args.cache_dir:  # one folder per model and options: Dynamo's precompiled graphs are reused by the next process
        key = {"model": str(Path(args.model).resolve()) if Path(args.model).exists() else args.model, "dtype": str(dtype),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
               "backend": backend, "cuda_graphs": not args.no_cuda_graphs, "unfused": args.unfused,
               "triton_gemv": args.triton_gemv, "decode_kernels": args.decode_kernels, "quantize": args.quantize}
        CompileCache(args.cache_dir, key=key).activate()
    tokenizer = _tokenizer(args.model) if args.prompt else None
    rows = _prompts(args, tokenizer)
    _say(args, f"loading {args.model}")
    loaded = sources.load(args.model, dtype=dtype)
    model = loaded.model.to(device)
    seq = args.max_seq_len or max(len(r) for r in rows) + args.max_new_tokens
    step_model = build_step_model(model, len(rows), seq, fuse=not args.unfused)
    if args.quantize:
        from graphfix.quant import quantize

        _say(args, quantize(step_model, args.quantize).summary())
    if args.triton_gemv:
        use_triton_gemv(step_model)
    if args.decode_kernels:
        step_model.use_decode_kernels()
    gen = Generator(step_model, compile=args.compile, backend=backend, cuda_graphs=not args.no_cuda_graphs)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if args.compile:
        _say(args, f"compiling ({backend}{', CUDA graphs' if gen.cuda_graphs else ''})")
        gen.warmup(batch_sizes=(len(rows),), modes=(sampling.mode,), prompt_lengths=[max(len(r) for r in rows)])
        if args.cache_dir:
            CompileCache(args.cache_dir).save()
    stream = None
    if args.stream and len(rows) == 1 and not args.json:
        seen: list[int] = []

        def stream(chunk):  # print the new text of row 0 as it arrives
            before = tokenizer.decode(seen) if tokenizer else ""
            seen.extend(chunk.tokens[0].tolist())
            text = tokenizer.decode(seen) if tokenizer else " ".join(map(str, chunk.tokens[0].tolist())) + " "
            print(text[len(before):] if tokenizer else text, end="", flush=True)

    result = gen.generate(rows, args.max_new_tokens, sampling=sampling, eos_token_id=eos, stream=stream,
                          stream_interval=1 if stream else None)
    if stream is not None:
        print()
    texts = [tokenizer.decode(t) if tokenizer else None for t in result.tokens]
    if args.json:
        print(json.dumps({"tokens": result.tokens, "text": texts, "finished": result.finished,
                          "ttft_s": result.ttft_s, "tokens_per_s": result.tokens_per_s}))
    elif stream is None:
        for i, (toks, text) in enumerate(zip(result.tokens, texts)):
            prefix = f"[{i}] " if len(rows) > 1 else ""
            print(prefix + (text if text is not None else " ".join(map(str, toks))))
    _say(args, f"{result.steps} tokens per row, first token {1000 * result.ttft_s:.1f} ms, "
               f"{result.tokens_per_s:.1f} tokens/s per row")
    return 0
