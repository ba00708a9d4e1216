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
import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from graphfix.cli import tp_options
from graphfix.cli.preflight import DTYPE_HELP, DTYPES
from graphfix.errors import InputError


def add_parser(subparsers: Any) -> None:
    """Add ``generate`` and ``bench`` to the main parser's subcommands."""
    p = subparsers.add_parser("generate", help="generate text with graphfix's compiled engine",
                              description="Load a model, move its weights into graphfix's static-cache decoder, "
                                          "compile prefill and decode, and generate.")
    p.add_argument("model", metavar="MODEL",
                   help="HF folder, .gguf file, Meta checkpoint folder (a tokenizer.json in it is used), 'smollm2' "
                        "or package.module:function")
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", default=[], metavar="IDS",
                   help="a prompt as comma-separated token ids (repeat for a batch; no tokenizer needed)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help=f"{DTYPE_HELP}; default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--compile", dest="compile", action="store_true", default=True, help="compile (default)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="run eagerly")
    p.add_argument("--backend", default=None, choices=["eager", "aot_eager", "inductor"],
                   help="torch.compile backend; default as optimize's: inductor on CUDA, and on CPU with a C++ "
                        "compiler (fused generated code: the fastest decode, after a longer first compile), else "
                        "aot_eager")
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
    add_speculation_args(p)
    tp_options.add_generate_arguments(p)
    p.set_defaults(func=run_generate)

    from graphfix.bench.decode_args import build_parser

    b = subparsers.add_parser("bench", help="decode benchmark on CUDA: copy bandwidth, HF eager/static, graphfix",
                              description="Benchmark decode speed (same as benchmarks/bench_decode.py). It needs a "
                                          "CUDA GPU for meaningful numbers (--device cpu runs a small functional "
                                          "check, as the tests do).")
    build_parser(b)
    tp_options.add_bench_arguments(b)
    b.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from graphfix.bench.decode import run

    if getattr(args, "tp", None):
        return tp_options.run_bench_tp(args)

    return run(args)


def _tokenizer(spec: str) -> Any:
    """The model's tokenizer, or ``None`` when there is none to load.

    A Hugging Face folder, a GGUF file (its embedded tokenizer), ``smollm2``, or a Meta folder
    into which ``graphfix convert`` copied ``tokenizer.json`` (and ``tokenizer_config.json``).
    """
    from transformers import AutoTokenizer

    from graphfix.diagnose import sources

    try:
        if spec == sources.SMOLLM2_ALIAS:
            path = sources.smollm2_gguf_path()
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        path = Path(spec)
        if path.is_file() and path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        if not path.is_dir():
            return None
        if (path / "config.json").exists() or (path / "tokenizer_config.json").exists():
            with contextlib.suppress(Exception):  # a Meta folder has no config.json for AutoTokenizer: try the file
                return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if (path / "tokenizer.json").exists():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    except Exception:  # noqa: BLE001 - a missing or broken tokenizer only means token-id prompts
        return None
    return None


def _id_rows(args: argparse.Namespace) -> list[list[int]]:
    """``--prompt-ids`` parsed and checked (whole numbers >= 0) before anything loads."""
    rows: list[list[int]] = []
    for item in args.prompt_ids:
        try:
            row = [int(t) for t in item.replace(" ", "").split(",") if t]
        except ValueError:
            raise InputError(f"--prompt-ids expects comma-separated integers, got {item!r}") from None
        if not row:
            raise InputError(f"--prompt-ids {item!r} holds no token id")
        negative = [t for t in row if t < 0]
        if negative:
            raise InputError(f"--prompt-ids {item}: token id {negative[0]} is negative",
                             hint="token ids are row numbers of the embedding: 0 and up")
        rows.append(row)
    return rows


def _prompts(args: argparse.Namespace, tokenizer: Any) -> list[list[int]]:
    rows = _id_rows(args)
    if args.prompt:
        if tokenizer is None:
            raise InputError(f"no tokenizer found for {args.model}",
                             hint="give --prompt-ids instead of --prompt, or put tokenizer.json beside the weights")
        for text in args.prompt:
            ids = list(tokenizer(text)["input_ids"])
            if not ids:
                raise InputError(f"--prompt {text!r} gives no tokens")
            rows.append(ids)
    if not rows:
        raise InputError("nothing to generate from", hint="give --prompt TEXT or --prompt-ids 1,2,3")
    return rows


def check_rows(rows: list[list[int]], max_new_tokens: int, max_seq_len: int | None, loaded: Any, spec: str) -> None:
    """Token ids inside the vocabulary; prompt and new tokens inside the model's positions and the cache."""
    vocab, positions = loaded.vocab_size, loaded.positions
    where = loaded.where or spec
    if vocab:
        for row in rows:
            bad = [t for t in row if t >= vocab]
            if bad:
                raise InputError(f"token id {bad[0]} is outside the vocabulary of {spec} ({vocab} tokens, ids 0 to "
                                 f"{vocab - 1})", hint="use ids from the model's own tokenizer")
    longest = max(len(r) for r in rows)
    if positions and longest > positions:
        raise InputError(f"the prompt has {longest} tokens, more than the {positions} positions {spec} was built "
                         f"for ({where})", hint="shorten the prompt")
    if positions and longest + max_new_tokens > positions:
        raise InputError(f"a prompt of {longest} tokens + --max-new-tokens {max_new_tokens} runs past the "
                         f"{positions} positions {spec} was built for ({where})",
                         hint=f"use --max-new-tokens {positions - longest} or less")
    if max_seq_len is not None and longest + max_new_tokens > max_seq_len:
        raise InputError(f"a prompt of {longest} tokens + --max-new-tokens {max_new_tokens} does not fit in "
                         f"--max-seq-len {max_seq_len}", hint="raise --max-seq-len or generate fewer tokens")


def build_step_model(model: torch.nn.Module, batch: int, max_seq_len: int, fuse: bool) -> Any:
    """Move a loaded HF or Meta model's weights into graphfix's decoder."""
    from graphfix.engine import from_hf, from_meta
    from graphfix.rewrite.blocks import meta_llama

    if meta_llama.is_meta_transformer(model):
        return from_meta(model, max_batch_size=batch, max_seq_len=max_seq_len, fuse=fuse)
    return from_hf(model, max_batch_size=batch, max_seq_len=max_seq_len, fuse=fuse)


def add_speculation_args(p: argparse.ArgumentParser) -> None:
    """``--speculate lookup[:k]|draft[:k]``, ``--draft PATH``, ``--draft-layers N`` (graphfix.engine.speculative)."""
    p.add_argument("--speculate", default=None, metavar="KIND[:K]",
                   help="speculative decoding: lookup[:k] (prompt lookup) or draft[:k] (needs --draft or "
                        "--draft-layers); k proposed tokens per verify step (default 4)")
    p.add_argument("--draft", default=None, metavar="PATH",
                   help="draft model for --speculate draft: a smaller model with the same tokenizer (any MODEL form)")
    p.add_argument("--draft-layers", type=int, default=None, metavar="N",
                   help="draft = the model's own first N layers (shared weights) instead of --draft")


def speculation_from_args(args: argparse.Namespace, step_model: Any, dtype: torch.dtype,
                          device: torch.device, say: Any = None) -> tuple[str | None, Any]:
    """The ``speculate`` string and the draft ``StepModel`` the options ask for (loaded here)."""
    from graphfix.engine.speculative import SpecConfig

    spec = SpecConfig.parse(getattr(args, "speculate", None))
    path, layers = getattr(args, "draft", None), getattr(args, "draft_layers", None)
    if spec is None:
        if path or layers:
            raise InputError("--draft and --draft-layers need --speculate draft[:k]")
        return None, None
    if spec.kind == "lookup":
        return str(spec), None
    if bool(path) == bool(layers):
        raise InputError("--speculate draft needs exactly one of --draft PATH and --draft-layers N")
    if layers:
        from graphfix.engine.draft import truncated_draft

        return str(spec), truncated_draft(step_model, layers)
    from graphfix.diagnose import sources

    if say is not None:
        say(f"loading the draft {path}")
    draft = build_step_model(sources.load(path, dtype=dtype).model.to(device), step_model.max_batch_size,
                             step_model.max_seq_len, fuse=not args.unfused)
    if args.decode_kernels:
        draft.use_decode_kernels()
    return str(spec), draft


def eos_ids(tokenizer: Any, model: torch.nn.Module, spec: str) -> list[int]:
    """Every end-of-sequence id the tokenizer, the model's configs or the folder's generation_config.json name."""
    found: list[Any] = [getattr(tokenizer, "eos_token_id", None)]
    for config in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        found.append(getattr(config, "eos_token_id", None))
    gen = Path(spec) / "generation_config.json"
    if gen.is_file():
        try:
            found.append(json.loads(gen.read_text()).get("eos_token_id"))
        except (OSError, ValueError, AttributeError):
            pass
    ids: list[int] = []
    for item in found:
        for value in item if isinstance(item, (list, tuple)) else [item]:
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0 and value not in ids:
                ids.append(value)
    return ids


class TextStream:
    """Prints row 0's new text as tokens arrive: special tokens skipped, nothing after its first EOS, and only
    whole characters (a byte-level token can end inside one)."""

    def __init__(self, tokenizer: Any, eos: list[int], out: Any) -> None:
        self.tokenizer, self.eos, self.out = tokenizer, set(eos), out
        self.seen: list[int] = []
        self.printed = ""
        self.shown = 0
        self.done = False

    def __call__(self, chunk: Any) -> None:
        if self.done:
            return
        for token in chunk.tokens[0].tolist():
            self.seen.append(token)
            if token in self.eos:
                self.done = True
                break
        if self.tokenizer is None:
            text = "".join(f"{t} " for t in self.seen[self.shown:])
            self.shown = len(self.seen)
        else:
            full = self.tokenizer.decode(self.seen, skip_special_tokens=True)
            if full.endswith("\ufffd") and not self.done:
                return  # half a character: wait for the rest
            text = full[len(self.printed):] if full.startswith(self.printed) else ""
            self.printed = full
        if text:
            print(text, end="", file=self.out, flush=True)


def check_generate_args(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, str, Any]:
    """Every argument checked before the model loads: ``(device, dtype, backend, sampling)``."""
    from graphfix.cli import preflight
    from graphfix.engine import SamplingParams
    from graphfix.optimize.api import default_backend

    device = preflight.check_device(args.device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    backend = args.backend or default_backend(device)
    preflight.whole(args.max_new_tokens, "--max-new-tokens", minimum=1, maximum=2**20)
    preflight.whole(args.max_seq_len, "--max-seq-len", minimum=2, maximum=2**24)
    preflight.whole(args.top_k, "--top-k", minimum=1)
    preflight.number(args.temperature, "--temperature")
    try:
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    preflight.weights_required(args.model, "graphfix generate")
    preflight.check_cache_dir(args.cache_dir)
    _id_rows(args)
    return device, dtype, backend, sampling


def run_generate(args: argparse.Namespace) -> int:
    from graphfix.cli.progress import Progress
    from graphfix.cli.streams import output_only_on_stdout, third_party_quiet

    device, dtype, backend, sampling = check_generate_args(args)
    if args.quantize:  # a bad scheme fails before the load
        from graphfix.quant.scheme import parse_scheme

        parse_scheme(args.quantize)
    with Progress(args.quiet) as say, third_party_quiet(args.quiet), output_only_on_stdout() as out:
        return _generate(args, device, dtype, backend, sampling, say, out)


def _generate(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, backend: str, sampling: Any,
              say: Any, out: Any) -> int:
    from graphfix.diagnose import sources
    from graphfix.diagnose.validate import check_kv_cache
    from graphfix.engine import CompileCache, Generator
    from graphfix.engine.kernels import use_triton_gemv

    tokenizer = _tokenizer(args.model) if args.prompt else None
    rows = _prompts(args, tokenizer)
    if args.cache_dir:  # one folder per model and options: Dynamo's precompiled graphs are reused by the next process
        key = {"model": str(Path(args.model).resolve()) if Path(args.model).exists() else args.model, "dtype": str(dtype),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
               "backend": backend, "cuda_graphs": not args.no_cuda_graphs, "unfused": args.unfused,
               "triton_gemv": args.triton_gemv, "decode_kernels": args.decode_kernels}
        if args.quantize:  # only then: older cache folders keep their key
            key.update(quantize=args.quantize)
        if args.speculate:
            key.update(speculate=args.speculate, draft=args.draft, draft_layers=args.draft_layers)
        CompileCache(args.cache_dir, key=key).activate()
    say(f"loading {args.model}")
    if getattr(args, "tp", None):  # every rank loads its shard; rank 0 alone prints (docs/tensor_parallel.md)
        seq = args.max_seq_len or max(len(r) for r in rows) + args.max_new_tokens
        step_model, model = tp_options.tp_step_model(args, len(rows), seq, dtype, device)
        out = tp_options.rank_output(step_model, out)
    else:
        loaded = sources.load(args.model, dtype=dtype)
        if any(p.device.type == "meta" for p in loaded.model.parameters()):
            raise InputError(f"graphfix generate needs weights, and {args.model} built a model without them",
                             hint="give the folder or file with the weights")
        check_rows(rows, args.max_new_tokens, args.max_seq_len, loaded, args.model)
        seq = args.max_seq_len or max(len(r) for r in rows) + args.max_new_tokens
        check_kv_cache(loaded.model, len(rows), seq, dtype, args.model)
        model = loaded.model.to(device)
        say(f"moving the weights into graphfix's decoder (cache of {seq} positions)")
        step_model = build_step_model(model, len(rows), seq, fuse=not args.unfused)
    if args.quantize:
        from graphfix.quant import quantize

        say(quantize(step_model, args.quantize).summary())
    if args.triton_gemv:
        use_triton_gemv(step_model)
    if args.decode_kernels:
        step_model.use_decode_kernels()
    speculate, draft = speculation_from_args(args, step_model, dtype, device, say)
    gen = Generator(step_model, compile=args.compile, backend=backend, cuda_graphs=not args.no_cuda_graphs,
                    speculate=speculate, draft=draft)
    eos = eos_ids(tokenizer, model, args.model)
    if args.compile:
        say(f"compiling prefill and decode ({backend}{', CUDA graphs' if gen.cuda_graphs else ''}) and warming up")
        gen.warmup(batch_sizes=(len(rows),), modes=(sampling.mode,), prompt_lengths=[max(len(r) for r in rows)])
        if args.cache_dir:
            CompileCache(args.cache_dir).save()
    stream = TextStream(tokenizer, eos, out) if args.stream and len(rows) == 1 and not args.json else None
    say(f"generating {args.max_new_tokens} tokens for {len(rows)} prompt(s)")
    say.paused = stream is not None  # streamed text shows progress; a heartbeat line would land inside it
    result = gen.generate(rows, args.max_new_tokens, sampling=sampling, eos_token_id=eos or None, stream=stream,
                          stream_interval=1 if stream else None)
    if stream is not None:
        print(file=out, flush=True)
    texts = [tokenizer.decode(t, skip_special_tokens=True) if tokenizer else None for t in result.tokens]
    if args.json:
        print(json.dumps({"tokens": result.tokens, "text": texts, "finished": result.finished,
                          "ttft_s": result.ttft_s, "tokens_per_s": result.tokens_per_s}), file=out, flush=True)
    elif stream is None:
        for i, (toks, text) in enumerate(zip(result.tokens, texts)):
            prefix = f"[{i}] " if len(rows) > 1 else ""
            print(prefix + (text if text is not None else " ".join(map(str, toks))), file=out, flush=True)
    lengths = sorted({len(t) for t in result.tokens})
    count = str(lengths[0]) if len(lengths) == 1 else f"{lengths[0]} to {lengths[-1]}"
    say(f"{count} token{'s' if lengths[-1] != 1 else ''} per row, first token {1000 * result.ttft_s:.1f} ms, "
        f"{result.tokens_per_s:.1f} tokens/s per row")
    if result.speculation:
        info = result.speculation
        say(f"speculation {info['speculate']}: {info['verify_steps']} verify steps, {info['plain_steps']} plain steps "
            f"(no match), {info['tokens_per_step']:.2f} tokens per step, acceptance {info['acceptance']:.2f}")
    return 0
