"""A short GPU self-check of the engine: parity with HF greedy, CUDA-graph decode, sampling, variants.

    python -m graphfix.bench.selfcheck --json out.json [--budget 200] [--layers 4] [--scaling-layers 32]
        [--parts correctness,kernels,scaling,variants]

1. correctness (float32, TF32 off, tiny Llama and Qwen2 configs): the engine compiled
   with Inductor and CUDA graphs gives HF ``generate(do_sample=False)``'s tokens for a
   batch of 2 prompts of different lengths (each row against HF on that row alone) and
   for batch 1; no recompile after ``warmup`` (``set_stance("fail_on_recompile")``); the
   same seed gives the same sampled tokens; top-k 1 equals greedy; EOS stops one row;
2. the decode kernels: ``kernel_check`` (every kernel, 1 to 16 rows, plain and PDL, and the
   decoder's kernel path on 2 to 16 rows) in bf16, then ``kernel_parity.decode_kernels_parity``
   at batch 1 and 8 (compiled kernel path = eager kernel path, both settings alternating under
   ``fail_on_recompile``);
3. ``kernel_parity.batch_scaling``: per-sequence tokens/s at batch 1 and 8 on Llama-2-7B shapes
   with ``--scaling-layers`` layers for ``--scaling-variants`` (default ``pdl,kernels``), and the
   ratio batch 8 / batch 1 (the target is at least 0.85);
4. variants on Llama-2-7B shapes with ``--layers`` layers (bf16): fused and unfused
   weights, Inductor options; ms/token, matmul-only time and a kernel breakdown, to pick
   what the full benchmark runs.

Each part runs while ``--budget`` seconds remain; the JSON is rewritten after each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from typing import Any

import torch

from graphfix.bench.kernel_parity import batch_scaling, decode_kernels_parity, parity_ok, tiny_model
from graphfix.bench.timing import Budget, _atomic_write, copy_bandwidth, kernel_breakdown, matmul_only_ms

PROMPTS = [[5, 7, 9, 11, 13], [3, 4, 100, 22, 9, 8, 1, 17, 44]]


def _hf_greedy(model, prompt: list[int], new: int, device: torch.device) -> list[int]:
    ids = torch.tensor([prompt], device=device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def correctness(device: torch.device, kind: str) -> dict[str, Any]:
    from graphfix.engine import Generator, SamplingParams, from_hf

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    new = 12
    model = tiny_model(kind, device)
    refs = [_hf_greedy(model, p, new, device) for p in PROMPTS]
    dec = from_hf(model, max_batch_size=2, max_seq_len=128)
    out: dict[str, Any] = {"model": kind}
    eager = Generator(dec, compile=False).generate(PROMPTS, new).tokens
    out["eager_equal_hf"] = eager == refs
    gen = Generator(dec)
    t = time.perf_counter()
    gen.warmup(batch_sizes=(2,), modes=("greedy", "filtered"))
    gen.warmup(batch_sizes=(1,), modes=("greedy",))
    out["warmup_s"] = time.perf_counter() - t
    counters = {k: dict(v) for k, v in torch._dynamo.utils.counters.items() if k in ("inductor", "stats") and v}
    with torch.compiler.set_stance("fail_on_recompile"):
        batch2 = gen.generate(PROMPTS, new).tokens
        batch1 = gen.generate(PROMPTS[:1], new).tokens
        again = gen.generate(PROMPTS, new).tokens
        sp = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3)
        s1 = gen.generate(PROMPTS, new, sampling=sp).tokens
        s2 = gen.generate(PROMPTS, new, sampling=sp).tokens
        s3 = gen.generate(PROMPTS, new, sampling=SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=4)).tokens
        k1 = gen.generate(PROMPTS, new, sampling=SamplingParams(temperature=1.0, top_k=1, seed=9)).tokens
        eos_id = refs[0][3]
        stop = gen.generate(PROMPTS, new, eos_token_id=eos_id)
    out.update({
        "hf_refs": refs, "batch2": batch2,
        "batch2_equal_hf": batch2 == refs, "batch1_equal_hf": batch1[0] == refs[0], "reuse_equal": again == batch2,
        "seeded_sampling_repeatable": s1 == s2, "other_seed_differs": s1 != s3, "top_k1_equals_greedy": k1 == refs,
        "eos_row0_len": len(stop.tokens[0]), "eos_row0_expected_len": refs[0].index(eos_id) + 1,
        "eos_row1_len": len(stop.tokens[1]), "eos_finished": stop.finished,
        "counters_after_warmup": counters,
        "cuda_graphs": gen.cuda_graphs,
    })
    return out


def variants(device: torch.device, layers: int, budget: Budget, new: int = 128,
             only: list[str] | None = None) -> list[dict[str, Any]]:
    from graphfix.bench.presets import random_hf_model
    from graphfix.engine import Generator, from_hf
    from graphfix.engine.kernels import use_triton_gemv

    model = random_hf_model("llama-2-7b", device, torch.bfloat16, num_hidden_layers=layers)
    ids = [[101, 2000, 3000, 4000, 5000]]
    rows = []
    plan = [("fused", True, {}), ("gemv", True, {}), ("kernels", True, {}), ("unfused", False, {}),
            ("fused+cdt", True, {"coordinate_descent_tuning": True}),
            ("fused+max_autotune", True, {"max_autotune": True, "coordinate_descent_tuning": True})]
    last_compile = 20.0
    for name, fuse, opts in plan:
        if only and name not in only:
            continue
        need = (3 if "max_autotune" in opts else 1.3) * last_compile + 10
        if not budget.fits(need):
            rows.append({"variant": name, "skipped": f"{budget.left():.0f} s left, about {need:.0f} s needed"})
            continue
        try:
            dec = from_hf(model, 1, 256, fuse=fuse, share=True)
            if name == "gemv":
                use_triton_gemv(dec)
            elif name == "kernels":
                dec.use_decode_kernels()
            gen = Generator(dec, inductor_options=opts)
            torch.cuda.synchronize()
            t = time.perf_counter()
            gen.warmup(batch_sizes=(1,), prompt_lengths=[5])
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t
            last_compile = compile_s
            results = [gen.generate(ids, new) for _ in range(3)]
            ms = statistics.median(r.decode_ms_per_token for r in results)
            wb = dec.weight_bytes() + dec.kv_bytes(1)
            row = {"variant": name, "compile_s": compile_s, "ms_per_token": ms, "gb_per_s": wb / (ms / 1000) / 1e9,
                   "bytes_per_step": wb, "matmul_only_ms": matmul_only_ms(dec, 1, device)}
            row["kernels"] = kernel_breakdown(gen, ids, device)
        except Exception as exc:  # noqa: BLE001 - any failure is the check's result, recorded with its trace
            row = {"variant": name, "error": f"{type(exc).__name__}: {exc}"[:800],
                   "trace": traceback.format_exc()[-1500:]}
        rows.append(row)
        print(f"[selfcheck] {json.dumps({k: v for k, v in row.items() if k not in ('kernels', 'trace')})}", flush=True)
    return rows


def _checked(label: str, check: Any) -> dict[str, Any]:
    """``check()``'s result, or its failure with the trace; printed either way."""
    try:
        res = check()
    except Exception as exc:  # noqa: BLE001 - any failure is the check's result, recorded with its trace
        res = {"error": f"{type(exc).__name__}: {exc}"[:800], "trace": traceback.format_exc()[-3000:]}
    print(f"[selfcheck] {label}: {json.dumps({k: v for k, v in res.items() if k != 'trace'})}", flush=True)
    if "trace" in res:
        print(res["trace"], flush=True)
    return res


def _kernel_checks(device: torch.device, doc: dict[str, Any]) -> bool:
    """``kernel_check`` (kernels and the decoder's kernel path) and the engine's parity at batch 1 and 8."""
    from graphfix.bench import kernel_check

    rows = kernel_check.run("cuda", "bfloat16", parts=("kernels", "decoder"))
    doc["kernel_check"] = rows
    ok = all(r["ok"] for r in rows)
    print(f"[selfcheck] kernel_check bf16: worst {max(r['rel_error'] for r in rows):.2e}, "
          f"{sum(r['ok'] for r in rows)}/{len(rows)} within tolerance", flush=True)
    for row in rows:
        if not row["ok"] or row["kernel"] == "decoder":
            print(f"[selfcheck] kernel_check {json.dumps(row)}", flush=True)
    for kind in ("llama", "qwen2"):
        res = _checked(f"decode kernels {kind}", lambda kind=kind: decode_kernels_parity(device, kind))
        ok &= parity_ok(res)
        doc[f"decode_kernels_{kind}"] = res
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", dest="json_path")
    p.add_argument("--budget", type=float, default=200.0)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--device", default="cuda")
    p.add_argument("--variants", help="comma list: fused, gemv, kernels, unfused, fused+cdt, fused+max_autotune")
    p.add_argument("--parts", default="correctness,kernels,scaling,variants",
                   help="comma list of the sections to run: correctness, kernels, scaling, variants")
    p.add_argument("--scaling-layers", type=int, default=32, help="layers of the batch-scaling model (7B: 32)")
    p.add_argument("--scaling-variants", default="pdl,kernels",
                   help="comma list for the batch 1 vs 8 measurement (pdl, kernels, attention, fused); empty: none")
    args = p.parse_args(argv)
    budget = Budget(args.budget)
    device = torch.device(args.device)
    import transformers

    doc: dict[str, Any] = {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "apis": {n: hasattr(torch.compiler, n) for n in ("cudagraph_mark_step_begin", "set_stance",
                                                         "save_cache_artifacts", "load_cache_artifacts")},
    }

    def flush() -> None:
        if args.json_path:
            _atomic_write(args.json_path, json.dumps(doc, indent=2, default=str))

    print(f"[selfcheck] {doc}", flush=True)
    if device.type == "cuda":
        doc["copy_bandwidth"] = copy_bandwidth(device)
        print(f"[selfcheck] copy {doc['copy_bandwidth']['gb_per_s']:.0f} GB/s", flush=True)
    ok = True
    parts = set(args.parts.split(","))
    for kind in ("llama", "qwen2") if "correctness" in parts else ():
        if kind == "qwen2" and not budget.fits(120):
            doc[f"correctness_{kind}"] = {"skipped": "budget"}
            continue
        res = _checked(f"correctness {kind}", lambda kind=kind: correctness(device, kind))
        ok &= "error" not in res and all(res[k] for k in (
            "eager_equal_hf", "batch2_equal_hf", "batch1_equal_hf", "reuse_equal", "seeded_sampling_repeatable",
            "top_k1_equals_greedy")) and res["eos_row0_len"] == res["eos_row0_expected_len"]
        doc[f"correctness_{kind}"] = res
        flush()
    if device.type == "cuda" and "kernels" in parts:
        ok &= _kernel_checks(device, doc)
        flush()
    doc["correct"] = ok
    if device.type == "cuda":
        scaling = tuple(v for v in args.scaling_variants.split(",") if v)
        if scaling and "scaling" in parts:
            doc["batch_scaling"] = _checked("batch scaling", lambda: {"rows": batch_scaling(
                device, args.scaling_layers, scaling, budget=budget)})
            for row in doc["batch_scaling"].get("rows", []):
                print(f"[selfcheck] batch scaling {json.dumps(row)}", flush=True)
            flush()
        if "variants" in parts:
            doc["variants"] = variants(device, args.layers, budget,
                                       only=args.variants.split(",") if args.variants else None)
    flush()
    print(f"[selfcheck] done, correct={ok}, {budget.left():.0f} s of budget left", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
