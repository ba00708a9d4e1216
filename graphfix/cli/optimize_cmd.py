"""``graphfix optimize MODEL [--verify]`` and ``graphfix verify MODEL``.

Both load the model, run :func:`graphfix.optimize` and print the before/after table
(graphs, breaks, recompiles, fallbacks, parity, tokens/s); ``--format json`` prints the
versioned ``graphfix.optimize`` document instead. ``verify`` always verifies and is the
one to use in CI. Exit codes: 0 done (and verified, when asked), 1 verification failed,
2 input errors. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

from graphfix.cli.preflight import DTYPE_HELP, DTYPES
from graphfix.errors import InputError

EXIT_OK, EXIT_NOT_VERIFIED = 0, 1


def add_parser(subparsers: Any) -> None:
    """Add the ``optimize`` and ``verify`` subcommands."""
    opt = subparsers.add_parser(
        "optimize", help="rewrite, compile and (with --verify) verify a model; print before/after",
        description="Diagnose the model, apply the passes its findings name, compile decode and prefill apart, "
                    "and print a before/after table. The optimized model lives in this process only: use "
                    "graphfix.optimize() from Python to serve it.")
    _common(opt)
    opt.add_argument("--verify", action="store_true",
                     help="verify (fullgraph, no recompile, parity with the original); exit 1 if it fails")
    opt.set_defaults(func=run_optimize, always_verify=False)

    ver = subparsers.add_parser(
        "verify", help="optimize and verify a model: exit 1 unless it compiles clean and matches the original",
        description="Optimize the model and verify it: prefill and decode compile with fullgraph=True, no "
                    "recompile over the decode steps (fail_on_recompile), and the logits and greedy tokens match "
                    "the original model's.")
    _common(ver)
    ver.set_defaults(func=run_optimize, always_verify=True)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="HF dir, .gguf, Meta folder, 'smollm2' or package.module:function")
    from graphfix.cli.app import add_driver_argument

    add_driver_argument(p)
    p.add_argument("--passes", default="auto", help="'auto' (from the diagnosis), 'none', or names, comma separated")
    p.add_argument("--backend", default=None, choices=["eager", "aot_eager", "inductor"],
                   help="compile backend (default: inductor on CUDA, and on CPU with a C++ compiler, because it "
                        "fuses the decode step into fast generated code; else aot_eager). generate uses the same")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help=f"load the weights in this dtype: {DTYPE_HELP} (default float32)")
    p.add_argument("--device", default=None, help="move the model here first (e.g. cuda)")
    p.add_argument("--max-seq-len", type=int, default=None, help="positions the static cache holds (HF)")
    p.add_argument("--max-batch-size", type=int, default=1)
    p.add_argument("--prefill", type=int, default=8, help="prompt length of the reference and verification runs")
    p.add_argument("--decode-steps", type=int, default=32, help="decode steps verified (default 32)")
    p.add_argument("--diagnose-steps", type=int, default=4, help="decode steps of the before/after diagnoses")
    p.add_argument("--no-diagnose", action="store_true", help="skip the before/after diagnoses")
    p.add_argument("--diagnose-layers", default="representative", choices=["representative", "all"],
                   help="diagnose one decoder layer of each kind (default) or every layer")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="a compile cache kept between runs (Inductor's code, autotuned tiles): a second run is warm")
    p.add_argument("--inductor-scan", action="store_true", help="also list Inductor's ATen fallbacks (slow)")
    p.add_argument("--parity-reference", default="auto", choices=["auto", "float64", "float32", "none"],
                   help="precision of the original's reference run that parity is measured against (auto: by size)")
    p.add_argument("--parity-multiplier", type=float, default=None,
                   help="parity passes when e_opt <= multiplier * e_orig + floor (default 2, 3 in bf16/fp16)")
    p.add_argument("--parity-floor", type=float, default=None,
                   help="the floor of that bound, relative RMS (default a tenth of the fixed tolerance)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="fixed parity tolerance (max |err| / logit scale), used only without a reference run")
    p.add_argument("--quantize", default=None, metavar="SCHEME",
                   help="weight-only int8, int4 or int4:G, verified against the unquantized model (docs/quantization.md)")
    p.add_argument("--format", default="text", choices=["text", "json"])
    p.add_argument("--output", "-o", help="write the table or JSON to FILE instead of stdout")


def check_optimize_args(args: argparse.Namespace) -> None:
    """Every argument checked before the model loads (one line each, nothing written)."""
    from graphfix.cli import preflight

    preflight.whole(args.prefill, "--prefill", minimum=2, maximum=preflight.MAX_PREFILL)
    preflight.whole(args.decode_steps, "--decode-steps", minimum=1, maximum=preflight.MAX_DECODE_STEPS)
    preflight.whole(args.diagnose_steps, "--diagnose-steps", minimum=1, maximum=preflight.MAX_DECODE_STEPS)
    preflight.whole(args.max_batch_size, "--max-batch-size", minimum=1, maximum=4096)
    preflight.whole(args.max_seq_len, "--max-seq-len", minimum=1, maximum=2**24)
    if args.max_seq_len is not None and args.prefill + args.decode_steps > args.max_seq_len:
        raise InputError(f"--prefill {args.prefill} + --decode-steps {args.decode_steps} do not fit in "
                         f"--max-seq-len {args.max_seq_len}", hint="raise --max-seq-len or use fewer steps")
    preflight.number(args.tolerance, "--tolerance", strict=True)
    preflight.number(args.parity_multiplier, "--parity-multiplier", strict=True)
    preflight.number(args.parity_floor, "--parity-floor")
    preflight.check_device(args.device)
    preflight.check_output(args.output, "--output")
    if args.cache_dir is not None and os.path.exists(args.cache_dir) and not os.path.isdir(args.cache_dir):
        raise InputError(f"--cache-dir {args.cache_dir} is a file", hint="give a folder (it is created if missing)")
    preflight.weights_required(args.model, f"graphfix {'verify' if args.always_verify else 'optimize'}")
    from graphfix.optimize.api import _explicit_passes

    _explicit_passes(args.passes)  # unknown pass names, before the model loads


def run_optimize(args: argparse.Namespace) -> int:
    import torch

    from graphfix.cli.app import write_output
    from graphfix.cli.progress import Progress
    from graphfix.cli.streams import output_only_on_stdout, third_party_quiet
    from graphfix.diagnose import sources
    from graphfix.optimize.api import optimize

    check_optimize_args(args)
    verify = args.always_verify or args.verify
    with Progress(args.quiet) as say, third_party_quiet(args.quiet), output_only_on_stdout():
        driver = sources.load_driver(args.driver) if args.driver else None
        say(f"loading {args.model}")
        loaded = sources.load(args.model, dtype=DTYPES[args.dtype])
        driver = driver or loaded.driver
        prompt = loaded.inputs if isinstance(loaded.inputs, torch.Tensor) else None
        if loaded.inputs is not None and prompt is None:
            raise InputError(f"{args.model} returned example calls; optimize needs a prompt tensor or a driver",
                             hint="return (model, prompt_ids) or (model, loop_fn), or pass --driver pkg.mod:fn")
        if loaded.positions and args.prefill + args.decode_steps > loaded.positions:
            raise InputError(f"--prefill {args.prefill} + --decode-steps {args.decode_steps} is more than the "
                             f"{loaded.positions} positions of {args.model}", hint="use fewer steps")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = optimize(
                loaded.model, driver=driver, prompt=prompt, passes=args.passes, max_seq_len=args.max_seq_len,
                max_batch_size=args.max_batch_size, device=args.device, backend=args.backend, verify=verify,
                prefill_tokens=args.prefill, decode_steps=args.decode_steps, diagnose_steps=args.diagnose_steps,
                diagnose=not args.no_diagnose, inductor_scan=args.inductor_scan, tolerance=args.tolerance,
                parity_reference=args.parity_reference, parity_multiplier=args.parity_multiplier,
                parity_floor=args.parity_floor, name=loaded.name, progress=say,
                quantize=getattr(args, "quantize", None), diagnose_layers=args.diagnose_layers,
                cache_dir=args.cache_dir,
            )
        say(f"done in {result.seconds:.1f}s")
        write_output(result.to_json() if args.format == "json" else result.summary(), args.output)
    if verify and not result.verified:
        print(f"graphfix: {loaded.name} is not verified", file=sys.stderr)
        return EXIT_NOT_VERIFIED
    return EXIT_OK
