"""Decode benchmark: copy bandwidth, HF eager, HF static (compiled), graphfix, on the same weights.

Run as ``python benchmarks/bench_decode.py`` or ``graphfix bench`` (same options).
One process measures, in this order and within ``--time-budget`` seconds (a section
that would not fit is skipped and listed under ``skipped``):

1. the device's copy bandwidth (a large device-to-device copy; bytes read + written);
2. graphfix with fused weights: the HF model's parameters go into ``LlamaDecoder`` with
   ``share=True`` (the fused tensors become the storage both models use, so HF still
   runs on the same weights with no extra memory); cold compile (``warmup``) in a fresh
   cache directory, tokens/s (median of ``--runs``), ms/token, peak memory, a kernel-time
   breakdown from the profiler, and the decode's linears alone replayed in a CUDA graph;
   then time to first token for ``--ttft-lengths`` prompts on the same graphs (the cache
   holds the longest prompt; decode attends to a 256-slot prefix, ``kv_buckets``);
3. HF ``generate(cache_implementation="static")`` (transformers compiles decode);
4. warm start: a second process loads the compile cache and reports its warmup time;
5. larger batches (graphfix, HF static), then HF eager ``generate``;
6. the other graphfix variants at batch 1, with the time left (``kernels``, ``gemv``, ``unfused``...).

The first variant that runs is the one the later sections use; one that fails (recorded
under ``notes``) hands over to the next in the list.

Tokens/s is ``new tokens / wall time of generate`` (prefill included), per sequence;
ms/token is ``(t(N) - t(1)) / (N - 1)`` from the same wall times for HF, and from CUDA
events around graphfix's decode loop; achieved GB/s counts the weights a step reads
(all but the embedding table) plus the KV cache it attends to, over ms/token.
Results: a JSON file (``SCHEMA``) and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from graphfix.bench.decode_args import DTYPES, VARIANTS, _ints, _resolve, build_parser
from graphfix.bench.report import Results, markdown
from graphfix.bench.timing import (
    Budget,
    _now,
    _peak_gb,
    _reset_peak,
    _summary,
    _sync,
    _timed,
    compile_time_summary,
    copy_bandwidth,
    kernel_breakdown,
    matmul_only_ms,
)
from graphfix.bench.warm_start import _warm_start, cache_key, child_warm

HF_ESTIMATE_S = {"hf-static": 90.0, "hf-eager": 60.0}
"""Seconds a batch-1 HF section takes before one was measured (compile, warm-up, 5 + 3 timed generates)."""


def _prompts(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, max(101, vocab - 1), (batch, length), generator=gen)


def hf_generate_fn(model, ids: torch.Tensor, new_tokens: int, static: bool):
    mask = torch.ones_like(ids)
    kwargs: dict[str, Any] = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
                              "pad_token_id": 0, "eos_token_id": None}
    if static:
        kwargs["cache_implementation"] = "static"

    def run():
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, **kwargs)

    return run


def bench_hf(model, system: str, batch: int, args, device: torch.device, vocab: int) -> dict[str, Any]:
    ids = _prompts(batch, args.prompt_len, vocab, seed=batch).to(device)
    static = system == "hf-static"
    run_n = hf_generate_fn(model, ids, args.new_tokens, static)
    run_1 = hf_generate_fn(model, ids, 1, static)
    _reset_peak(device)
    first = _timed(run_n, device)  # compiles decode (static)
    second = _timed(run_n, device)
    times_n = [_timed(run_n, device) for _ in range(args.runs)]
    times_1 = [_timed(run_1, device) for _ in range(max(3, args.runs // 2))]
    row = {"system": system, "batch": batch, **_summary(times_n, times_1, args.new_tokens),
           "first_call_s": first, "second_call_s": second, "peak_gb": _peak_gb(device)}
    if static:
        row["compile_cold_s"] = first - statistics.median(times_n)
    return row


KV_BUCKETS = (256, 512, 1024, 2048, 4096, 8192)


def bench_graphfix(dec, gen, variant: str, batch: int, args, device: torch.device, vocab: int,
                   compile_s: float | None, copy_gbps: float | None, profile: bool) -> dict[str, Any]:
    ids = _prompts(batch, args.prompt_len, vocab, seed=batch).tolist()
    _reset_peak(device)
    gen.generate(ids, args.new_tokens)  # steady state (warmup compiled already)
    results = []

    def run_n():
        results.append(gen.generate(ids, args.new_tokens))

    times_n = [_timed(run_n, device) for _ in range(args.runs)]
    times_1 = [_timed(lambda: gen.generate(ids, 1), device) for _ in range(max(3, args.runs // 2))]
    row = {"system": "graphfix", "variant": variant, "batch": batch, **_summary(times_n, times_1, args.new_tokens),
           "event_ms_per_token": statistics.median(r.decode_ms_per_token for r in results),
           "compile_cold_s": compile_s, "peak_gb": _peak_gb(device)}
    kv_len = gen._kv_len(args.prompt_len + args.new_tokens)
    bytes_step = dec.weight_bytes() + dec.kv_bytes(batch, kv_len)
    row.update({"kv_len": kv_len, "bytes_per_step": bytes_step,
                "gb_per_s": bytes_step / (row["event_ms_per_token"] / 1000) / 1e9})
    if copy_gbps:
        row["fraction_of_copy_bw"] = row["gb_per_s"] / copy_gbps
    if profile:
        try:
            row["matmul_only_ms"] = matmul_only_ms(dec, batch, device)
        except Exception as exc:  # noqa: BLE001 - diagnostic only; the run's numbers stand without it
            row["matmul_only_ms_error"] = f"{type(exc).__name__}: {exc}"[:300]
        try:
            row["kernels"] = kernel_breakdown(gen, ids, device)
        except Exception as exc:  # noqa: BLE001 - diagnostic only; never lose the run for it
            row["kernels"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    print(f"[bench] graphfix {variant} batch {batch}: {row['tok_per_s']:.1f} tok/s, "
          f"{row['event_ms_per_token']:.3f} ms/token (events), {row['gb_per_s']:.0f} GB/s", flush=True)
    return row


def _max_seq(args) -> int:
    return max([args.prompt_len + args.new_tokens] + [n + 1 for n in _ints(args.ttft_lengths)])


def _generator(dec, args):
    from graphfix.engine import Generator

    return Generator(dec, backend=args.backend, inductor_options=args.inductor_options,
                     cuda_graphs=not args.no_cuda_graphs, kv_buckets=KV_BUCKETS)


def _warmup(gen, args, batch: int, device: torch.device) -> dict[str, Any]:
    """Cold compile of what a request of this shape needs: prefill + first token, then decode.

    Per phase it also keeps each warm-up request's seconds (``Generator.warmup``'s timings) and
    the seconds Dynamo's timers counted in it: the rest is running, autotuning, CUDA-graph recording.
    """
    phases: dict[str, Any] = {}
    t = _now()
    for phase, kwargs in (("prefill_and_first", {"decode": False}),
                          ("decode", {"kv_lengths": [args.prompt_len + args.new_tokens]})):
        _sync(device)
        before, started = compile_time_summary(), _now()
        requests = gen.warmup(batch_sizes=(batch,), prompt_lengths=[args.prompt_len], **kwargs)
        _sync(device)
        seconds = _now() - started
        timers = {k: v - before.get(k, 0.0) for k, v in compile_time_summary().items()}
        compiled = timers.get("dynamo_and_backend_s", 0.0)
        phases[phase] = {"seconds": seconds, "compile_s": compiled, "outside_compile_s": seconds - compiled,
                         "compile_timers": timers, "requests": requests}
    return {"prefill_and_first_s": phases["prefill_and_first"]["seconds"], "decode_s": phases["decode"]["seconds"],
            "total_s": _now() - t, "phases": phases}


def check_gemv(dec, device: torch.device) -> float:
    """Largest relative error of the Triton GEMV against F.linear over the decoder's linear shapes."""
    import torch.nn.functional as F

    worst, seen = 0.0, set()
    for m in dec.modules():
        if isinstance(m, torch.nn.Linear) and m.weight.shape not in seen:
            seen.add(m.weight.shape)
            x = torch.randn(1, 1, m.in_features, device=device, dtype=m.weight.dtype)
            with torch.no_grad():
                ref = F.linear(x.float(), m.weight.float())
                out = m(x).float()
            worst = max(worst, ((out - ref).norm() / ref.norm()).item())
    return worst


def apply_variant(dec, variant: str) -> None:
    """Switch the fused decoder ``dec`` to ``variant``'s kernels (no checks): the one place parent and child agree on."""
    from graphfix.engine.kernels import use_cublas, use_triton_gemv

    use_cublas(dec)
    if variant in ("gemv", "attention"):
        use_triton_gemv(dec)
    dec.use_decode_kernels(variant in ("kernels", "pdl", "attention"), fuse_linears=variant != "attention",
                           pdl=variant == "pdl")


def _load_model(args, device: torch.device):
    dtype = DTYPES[args.dtype]
    if Path(args.model).exists():
        from graphfix.diagnose import sources

        model = sources.load(args.model, dtype=dtype).model.to(device)
        model.generation_config.eos_token_id = None
        return model.eval()
    from graphfix.bench.presets import random_hf_model

    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    return random_hf_model(args.model, device, dtype, **overrides)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    args = _resolve(args)
    if args.child_warm:
        return child_warm(args)
    budget = Budget(args.time_budget)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_decode: CUDA is not available", file=sys.stderr)
        return 2
    if not args.cache_dir:
        args.cache_dir = tempfile.mkdtemp(prefix="graphfix-bench-cache-")
    from graphfix.engine import CompileCache, from_hf
    from graphfix.engine.kernels import HAS_TRITON

    CompileCache(args.cache_dir, key=cache_key(args, device), precompile=True).activate()
    import transformers

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    batches = _ints(args.batch_sizes)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    meta = {"model": args.model, "dtype": args.dtype, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.runs,
            "batch_sizes": batches, "variants": variants, "inductor_options": args.inductor_options,
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    res = Results(args.json_path, args.md_path, meta)
    copy_gbps = None
    if "copy" in systems:
        res.doc["copy_bandwidth"] = copy_bandwidth(device)
        copy_gbps = res.doc["copy_bandwidth"]["gb_per_s"]
        print(f"[bench] copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
        res.flush()
    t = _now()
    model = _load_model(args, device)
    _sync(device)
    vocab = model.config.vocab_size
    res.doc["build_s"] = _now() - t
    res.doc["params"] = sum(p.numel() for p in model.parameters())
    seq = _max_seq(args)
    ttft_lengths = _ints(args.ttft_lengths)
    cold: dict[str, float] = {}
    want_gf = "graphfix" in systems

    def graphfix_variant(variant: str, dec) -> Any:
        gen = _generator(dec, args)
        parts = _warmup(gen, args, 1, device)
        cold[variant] = parts["total_s"]
        res.doc.setdefault("warmup", {})[variant] = parts
        print(f"[bench] graphfix {variant}: cold warmup {parts['total_s']:.1f} s ("
              + ", ".join(f"{k} {v['seconds']:.1f} s, {v['compile_s']:.1f} s of it compiling"
                          for k, v in parts["phases"].items()) + ")", flush=True)
        res.add_run(bench_graphfix(dec, gen, variant, 1, args, device, vocab, parts["total_s"], copy_gbps,
                                   args.profile))
        return gen

    def prepare_variant(variant: str, dec) -> Any:
        """Switch ``dec`` to ``variant`` (or build the unfused decoder); ``None`` when it cannot run (recorded)."""
        apply_variant(dec, "fused")  # back to cuBLAS and the standard path first
        if variant == "fused":
            return dec
        if variant == "unfused":
            return from_hf(model, max_batch_size=1, max_seq_len=seq, fuse=False, share=True)
        if variant not in VARIANTS:
            res.skip(f"graphfix {variant}", "unknown variant")
            return None
        if not HAS_TRITON or device.type != "cuda":
            res.skip(f"graphfix {variant}", "needs triton and CUDA")
            return None
        apply_variant(dec, variant)
        if variant == "gemv":
            err = res.doc["gemv_rel_error"] = check_gemv(dec, device)
            if not err < 2e-2:
                res.skip("graphfix gemv", f"relative error {err:.2e} against F.linear")
                return None
            return dec
        from graphfix.bench import kernel_check

        rows = res.doc["kernel_check"] = kernel_check.run(device.type, str(dec.output.weight.dtype)[len("torch."):])
        bad = [r for r in rows if not r["ok"]]
        if bad:
            res.skip("graphfix kernels", "kernel_check failed: " + json.dumps(bad)[:300])
            return None
        if variant == "pdl" and not dec.decode_pdl:
            res.skip("graphfix pdl", "programmatic dependent launch needs an sm_90+ GPU")
            return None
        return dec

    def compile_estimate(scale: float = 1.0) -> float:
        return scale * (max(cold.values()) if cold else 150.0)

    # 1. graphfix, fused weights (the default layout)
    dec = gen = None
    first_variant, other_variants = None, []
    if want_gf:
        dec = from_hf(model, max_batch_size=max(batches), max_seq_len=seq, fuse=True, share=True)
        if args.quantize:  # the decoder's own linears (the HF model keeps its float weights for its baselines)
            from graphfix.quant import quantize

            res.doc["quantize"] = quantize(dec, args.quantize).summary()
        res.doc["weight_bytes_per_step"] = dec.weight_bytes()
        # the first variant that runs is the one TTFT, warm start and batch 8 use; one that fails hands over to the next
        for i, variant in enumerate(variants):
            try:
                ready = prepare_variant(variant, dec)
                if ready is None:
                    continue
                if ready is not dec:
                    raise SystemExit(f"bench_decode: the first variant must run on the fused decoder, not {variant!r}")
                gen = graphfix_variant(variant, dec)
            except Exception as exc:  # noqa: BLE001 - recorded; the next variant takes its place
                res.doc["notes"].append(f"graphfix {variant} failed: {type(exc).__name__}: {str(exc)[:400]}")
                res.flush()
                torch._dynamo.reset()
                continue
            first_variant, other_variants = variant, variants[i + 1:]
            break
        else:
            raise SystemExit("bench_decode: no graphfix variant ran (see the notes in the JSON)")
        res.doc["megacache_bytes"] = CompileCache(args.cache_dir).save()
        # 2. time to first token on the same graphs (prefill is dynamic; the cache holds the longest prompt)
        for n in ttft_lengths:
            ids = _prompts(1, n, vocab, seed=n).tolist()
            gen.generate(ids, 1)
            sec = statistics.median(_timed(lambda ids=ids: gen.generate(ids, 1), device) for _ in range(5))
            res.doc["ttft"].append({"system": f"graphfix ({first_variant})", "prompt_len": n, "seconds": sec})
            res.flush()
    # 3. HF static cache (compiled by transformers), batch 1
    hf_done: set[tuple[str, int]] = set()
    hf_cost: dict[str, float] = {}  # measured seconds of each system's batch-1 section: the next estimate

    def hf_estimate(system: str, batch: int) -> float:
        base = hf_cost.get(system, HF_ESTIMATE_S[system])
        return base * (1.5 if batch > 1 else 1.0)

    def hf(system: str, batch: int) -> None:
        estimate = hf_estimate(system, batch)
        if not budget.fits(estimate):
            res.skip(f"{system} batch {batch}", f"{budget.left():.0f} s left, about {estimate:.0f} s needed")
            return
        hf_done.add((system, batch))
        started = _now()
        try:
            row = bench_hf(model, system, batch, args, device, vocab)
        except Exception as exc:  # noqa: BLE001 - recorded in the notes; the other systems still run
            res.doc["notes"].append(f"{system} batch {batch} failed: {type(exc).__name__}: {str(exc)[:300]}")
            res.flush()
            return
        row["bytes_per_step"] = res.doc.get("weight_bytes_per_step")
        if row["bytes_per_step"]:
            row["gb_per_s"] = row["bytes_per_step"] / (row["ms_per_token"] / 1000) / 1e9
            if copy_gbps:
                row["fraction_of_copy_bw"] = row["gb_per_s"] / copy_gbps
        hf_cost.setdefault(system, _now() - started)
        res.add_run(row)
        print(f"[bench] {system} batch {batch}: {row['tok_per_s']:.1f} tok/s, {row['ms_per_token']:.3f} ms/token",
              flush=True)

    def hf_ttft(system: str) -> None:
        for n in ttft_lengths:
            if not budget.fits(15):
                res.skip(f"{system} TTFT {n}", "time budget")
                continue
            ids = _prompts(1, n, vocab, seed=n).to(device)
            fn = hf_generate_fn(model, ids, 1, system == "hf-static")
            fn()
            sec = statistics.median(_timed(fn, device) for _ in range(5))
            res.doc["ttft"].append({"system": system, "prompt_len": n, "seconds": sec})
            res.flush()

    if "hf-static" in systems:
        hf("hf-static", 1)
        hf_ttft("hf-static")
    # 4. warm start in a second process
    if want_gf and args.warm_start and cold:
        if budget.fits(compile_estimate(0.5) + 40):
            res.doc["warm_start"] = _warm_start(args, cold[first_variant], first_variant)
            res.flush()
        else:
            res.skip("warm start", "time budget")
    # 5. larger batches: graphfix (first variant's decoder), HF static, HF eager
    for batch in batches:
        if batch == 1 or not want_gf:
            continue
        if not budget.fits(compile_estimate(0.7) + 20):
            res.skip(f"graphfix batch {batch}", f"{budget.left():.0f} s left")
            continue
        parts = _warmup(gen, args, batch, device)
        res.doc.setdefault("warmup", {})[f"batch{batch}"] = parts
        # the decode kernels serve 1 to kernels.MAX_ROWS rows, GemvLinear one: above, every variant is the fused one
        label = first_variant if dec.kernels_serve(batch, 1) else "fused"
        res.add_run(bench_graphfix(dec, gen, label, batch, args, device, vocab, parts["total_s"], copy_gbps,
                                   profile=False))
    for system in ("hf-static", "hf-eager"):
        if system not in systems:
            continue
        for batch in batches:
            if (system, batch) not in hf_done:
                hf(system, batch)
        if system == "hf-eager":
            hf_ttft("hf-eager")
    # 6. other graphfix variants at batch 1, with the time left
    if want_gf:
        for variant in other_variants:
            if not budget.fits(compile_estimate(1.0) + 20):
                res.skip(f"graphfix {variant}", f"{budget.left():.0f} s left")
                continue
            try:
                ready = prepare_variant(variant, dec)
                if ready is not None:
                    graphfix_variant(variant, ready)
            except Exception as exc:  # noqa: BLE001 - a failing variant is recorded in the notes, the others still run
                res.doc["notes"].append(f"graphfix {variant} failed: {type(exc).__name__}: {str(exc)[:400]}")
                res.flush()
    # 7. the drop-in: graphfix.optimize(model), then the model's own generate (last: it resets Dynamo)
    if "optimize" in systems:
        if budget.fits(150):
            from graphfix.bench.dropin import bench_dropin

            try:
                bench_dropin(model, batches, args, device, vocab, res)
            except Exception as exc:  # noqa: BLE001 - recorded in the notes
                res.doc["notes"].append(f"optimize failed: {type(exc).__name__}: {str(exc)[:400]}")
        else:
            res.skip("optimize", f"{budget.left():.0f} s left")
    res.doc["elapsed_s"] = _now() - budget.start
    res.flush()
    print(markdown(res.doc), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
