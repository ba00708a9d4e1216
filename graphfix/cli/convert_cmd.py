"""``graphfix convert SRC DST --to hf|meta``: the command-line face of :func:`graphfix.convert.convert`.

The main ``graphfix`` CLI calls :func:`add_parser` to register the subcommand
and prints any :class:`~graphfix.errors.GraphfixError` raised by :func:`run`
as one line, exiting 2.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from graphfix.cli.preflight import DTYPE_HELP, DTYPES
from graphfix.convert.api import TARGETS, convert
from graphfix.convert.detect import detect_format
from graphfix.convert.progress import human_bytes


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``convert`` subcommand to ``subparsers`` (its handler is :func:`run`)."""
    p = subparsers.add_parser(
        "convert",
        help="convert a Llama checkpoint between Hugging Face, Meta and GGUF (read) formats",
        description="Convert a Llama checkpoint (Hugging Face folder, Meta folder or .gguf file) to Hugging Face "
                    "or Meta format, streaming one tensor at a time. The source is only read; the destination "
                    "appears complete or not at all.",
    )
    p.add_argument("src", type=Path, help="source: HF folder (config.json), Meta folder (params.json) or .gguf file")
    p.add_argument("dst", type=Path, help="destination folder (must not exist unless --overwrite)")
    p.add_argument("--to", required=True, choices=TARGETS, help="target format")
    # the spellings of every other command (bf16 and bfloat16 alike); parse_dtype maps the short ones
    p.add_argument("--dtype", default="keep", choices=["keep", *sorted(DTYPES)],
                   help=f"dtype of the written weights: keep (default: the source's; GGUF quantized -> float32), "
                        f"{DTYPE_HELP}")
    p.add_argument("--shards", type=int, default=None,
                   help="meta: model-parallel rank files to write (default 1); hf: number of safetensors files")
    p.add_argument("--max-shard-size", default="5GB",
                   help="hf: largest safetensors file when --shards is not given (default 5GB)")
    p.add_argument("--quantize", default=None, metavar="SCHEME",
                   help="hf: write packed weight-only int8 / int4 / int4:G (G = 32, 64, 128) weights plus "
                        "graphfix_quant.json; GGUF Q8_0/Q4_0/Q4_1 re-pack without dequantizing when the scheme matches "
                        "(int8:32, int4:32)")
    p.add_argument("--quantize-lm-head", action="store_true", help="with --quantize: the LM head too")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    # SUPPRESS: do not override a --quiet the main parser may already have set
    p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="no progress line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the conversion described by ``args``; prints one summary line. Returns the exit code.

    Warnings (an ignored sidecar, a tokenizer that could not be exported) are
    printed as one ``graphfix: warning:`` line each on stderr, not as Python's
    two-line ``file:line: UserWarning`` form.
    """
    start = time.perf_counter()
    src_format, _ = detect_format(args.src)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _one_line_warning
        dst = convert(args.src, args.dst, to=args.to, shards=args.shards, dtype=args.dtype, overwrite=args.overwrite,
                      progress=not getattr(args, "quiet", False), max_shard_size=args.max_shard_size,
                      quantize=args.quantize, quantize_lm_head=args.quantize_lm_head)
    size = sum(f.stat().st_size for f in dst.iterdir() if f.is_file())
    what = f"{args.to}, {args.quantize}" if args.quantize else args.to
    print(f"converted {src_format} -> {what}: {dst} ({human_bytes(size)} in {time.perf_counter() - start:.1f} s)")
    sys.stdout.flush()
    return 0


def _one_line_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
    if issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
        return  # third-party deprecations are not the user's business here
    text = " ".join(str(message).split())
    print(f"graphfix: warning: {text}", file=sys.stderr)
