"""``--tp N`` for ``graphfix generate`` and ``graphfix bench``: run under ``torchrun --nproc-per-node N``.

    torchrun --nproc-per-node 2 -m graphfix generate Llama-2-70b-hf --tp 2 --prompt "Hello"
    torchrun --nproc-per-node 2 -m graphfix bench --tp 2 --tp-shapes llama-2-70b

Every rank runs the command; rank 0 alone prints the output (the others' goes to /dev/null).
A checkpoint folder (HF safetensors or Meta ``consolidated.NN.pth``) is read slice by slice
(``graphfix.engine.tp.load_sharded``); anything else ``graphfix generate`` loads (GGUF,
``smollm2``) is loaded whole on each rank and sharded (``graphfix.engine.tp.shard``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=None, metavar="N",
                   help="tensor parallelism over N GPUs (run under torchrun --nproc-per-node N)")


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=None, metavar="N",
                   help="the tensor-parallel benchmark (benchmarks/bench_tp.py) over N GPUs, under torchrun")
    p.add_argument("--tp-shapes", default="llama-2-7b,llama-2-70b",
                   help="with --tp: llama-2-7b, llama-2-70b, llama-3-70b (comma list)")


def rank_output(decoder: Any, out: Any) -> Any:
    """``out`` on rank 0; /dev/null on the others (every rank generates the same tokens: print them once)."""
    if decoder.tp.is_main:
        return out
    return open(os.devnull, "w")  # for the life of the process


def tp_step_model(args: argparse.Namespace, batch: int, seq: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[Any, Any]:
    """``(this rank's sharded decoder, the loaded HF/Meta model or None)``, the all-reduce chosen and reported."""
    from graphfix.engine.tp import choose_all_reduce, init_tp, load_sharded, main_print, shard

    tp = init_tp(args.tp, device if device.type == "cpu" else None)
    folder = Path(args.model)
    model = None
    if folder.is_dir() and ((folder / "params.json").exists() or (folder / "config.json").exists()):
        dec = load_sharded(folder, tp, max_batch_size=batch, max_seq_len=seq, fuse=not args.unfused, dtype=dtype)
    else:
        from graphfix.diagnose import sources

        model = sources.load(args.model, dtype=dtype).model
        dec = shard(model, tp, max_batch_size=batch, max_seq_len=seq, fuse=not args.unfused, dtype=dtype)
    choice = choose_all_reduce(tp, dec)
    if not getattr(args, "quiet", False):
        main_print(tp, f"{tp.describe()}: {choice.describe()}", file=sys.stderr)
    return dec, model


def run_bench_tp(args: argparse.Namespace) -> int:
    from graphfix.bench import tp as bench_tp

    argv = ["--shapes", args.tp_shapes]
    if args.new_tokens:
        argv += ["--new-tokens", str(args.new_tokens)]
    if args.json_path:
        argv += ["--json", args.json_path]
    ns = bench_tp.build_parser().parse_args(argv)
    ns.tp = args.tp
    return bench_tp.run(ns)
