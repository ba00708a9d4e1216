"""Weight-only int8 / int4 decode on one GPU: graphfix's dequantizing kernels beside bf16 and torchao.

Llama-2-7B shapes with random bf16 weights, batch 1. Every scheme quantizes the same weights.
Sections (``--parts``, in this order; each prints as it finishes):

- ``kernels``: ``graphfix::qgemv`` (and ``qgemv_pdl``) against dequantize-then-``F.linear`` for every
  scheme, prologue/epilogue and 1 to 16 rows (``graphfix.bench.quant_check``); one summary line per scheme;
- ``gemv``: each Llama-2-7B linear alone at batch 1 (``wqkv``, ``wo``, ``w13``, ``w2``), one CUDA graph of
  ``--reps`` calls: microseconds and GB/s of the bytes it must read, bf16 ``fused_gemv`` beside each scheme;
- ``step``: one whole decode step (``use_decode_kernels``, PDL) captured as a CUDA graph per scheme: ms, the
  tok/s it gives, GB/s and the fraction of the copy bandwidth, and the floor (copy bandwidth / bytes a step reads);
- ``generate``: what a user gets: the compiled ``Generator`` (inductor, CUDA graphs, decode kernels), 5-token
  prompt, 200 new tokens, median of ``--runs``, per scheme; and torchao's ``Int8WeightOnlyConfig`` /
  ``Int4WeightOnlyConfig`` applied to the same decoder's linears (decode kernels off, so its own kernels run),
  or the reason torchao cannot run. About a minute of compiling per system.

    python benchmarks/bench_quant.py --parts kernels,gemv,step           # about 2 minutes
    python benchmarks/bench_quant.py --parts generate --schemes bf16,int8,int4:64,int4:128 --torchao int8,int4

Prints one JSON line per result (``--json`` also writes them all to a file).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch

from graphfix.bench.presets import random_hf_model
from graphfix.bench.timing import copy_bandwidth, cuda_graph_ms
from graphfix.engine import Generator, from_hf

SCHEMES = ("bf16", "int8", "int4:64", "int4:128")
PARTS = ("kernels", "gemv", "step", "generate")
OUT: list[dict[str, Any]] = []


def emit(row: dict[str, Any]) -> None:
    OUT.append(row)
    print(json.dumps(row), flush=True)


def quantized(dec: Any, scheme: str) -> Any:
    if scheme != "bf16":
        from graphfix.quant import quantize

        quantize(dec, scheme)
    return dec


def part_kernels(schemes: tuple[str, ...]) -> None:
    from graphfix.bench.quant_check import SCHEMES as CHECKED
    from graphfix.bench.quant_check import qgemv_errors

    rows = list(qgemv_errors("cuda", torch.bfloat16, CHECKED))
    for name in CHECKED:
        mine = [r for r in rows if r["scheme"] == name]
        worst = max(r["rel_error"] for r in mine)
        emit({"part": "kernels", "scheme": name, "cases": len(mine), "max_rel_error": worst, "ok": worst <= 1.6e-2,
              "kernels": sorted({r["kernel"] for r in mine})})


def part_gemv(schemes: tuple[str, ...], reps: int) -> None:
    import graphfix.quant.kernels  # noqa: F401 - registers graphfix::qgemv
    from graphfix.quant.scheme import parse_scheme, quantize_weight

    shapes = {"wqkv": (12288, 4096), "wo": (4096, 4096), "w13": (22016, 4096), "w2": (4096, 11008)}
    dev = torch.device("cuda")
    for label, (n, k) in shapes.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k ** -0.5
        x = torch.randn(1, 1, k, device=dev, dtype=torch.bfloat16)
        for name in schemes:
            if name == "bf16":
                args = (x, w, None, 0.0, False, None, None)
                ms, _ = cuda_graph_ms(lambda a=args: torch.ops.graphfix.fused_gemv(*a), reps, repeats=3)
                nbytes = w.numel() * 2
            else:
                p = quantize_weight(w, parse_scheme(name))
                args = (x, p.codes, p.scales, p.zeros, None, 0.0, False, None, None, p.scheme.bits,
                        p.scheme.group_size or 0)
                ms, _ = cuda_graph_ms(lambda a=args: torch.ops.graphfix.qgemv(*a), reps, repeats=3)
                nbytes = sum(t.numel() * t.element_size() for t in (p.codes, p.scales, p.zeros) if t is not None)
            emit({"part": "gemv", "linear": label, "shape": [n, k], "scheme": name, "us": 1000 * ms,
                  "gb_per_s": nbytes / ms / 1e6})


def part_step(model: Any, schemes: tuple[str, ...], copy_gbps: float, reps: int, kv_len: int = 256,
              pos: int = 100) -> None:
    tokens = torch.tensor([[1]], device="cuda")
    position = torch.tensor([[pos]], device="cuda")
    ref = None
    for name in schemes:
        dec = quantized(from_hf(model, max_batch_size=1, max_seq_len=kv_len, fuse=True, share=True), name)
        dec.use_decode_kernels()
        with torch.no_grad():
            ms, out = cuda_graph_ms(lambda d=dec: d.step(tokens, position, kv_len=kv_len), reps, repeats=5)
        nbytes = dec.weight_bytes() + dec.kv_bytes(1, kv_len) * (pos + 1) // kv_len
        gbps = nbytes / ms / 1e6
        logits = out.float()
        drift = 0.0 if ref is None else ((logits - ref).norm() / ref.norm()).item()
        ref = logits if ref is None else ref
        emit({"part": "step", "scheme": name, "ms": ms, "tok_per_s": 1000 / ms, "gb_per_s": gbps,
              "fraction_of_copy": gbps / copy_gbps, "floor_tok_per_s": copy_gbps * 1e9 / nbytes,
              "bytes_per_step": nbytes, "pdl": dec.decode_pdl, "rel_logit_diff_vs_bf16": drift})
        del dec
        torch.cuda.empty_cache()


def _torchao_config(name: str) -> Any:
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if name == "int8":
        return Int8WeightOnlyConfig()
    group = int(name.partition(":")[2] or 128)
    try:  # newer torchao: the tinygemm layout is an option (the default packing is plain)
        return Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")
    except TypeError:
        return Int4WeightOnlyConfig(group_size=group)


def _generate_row(dec: Any, system: str, copy_gbps: float, runs: int, prompt_len: int, new: int) -> dict[str, Any]:
    seq = prompt_len + new
    gen = Generator(dec, backend="inductor", cuda_graphs=True, kv_buckets=(256,))
    t = time.perf_counter()
    gen.warmup(batch_sizes=(1,), prompt_lengths=[prompt_len], kv_lengths=[seq])
    compile_s = time.perf_counter() - t
    ids = torch.randint(100, 30000, (1, prompt_len), generator=torch.Generator().manual_seed(1)).tolist()
    gen.generate(ids, new)
    times, event_ms = [], []
    for _ in range(runs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        r = gen.generate(ids, new)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        event_ms.append(r.decode_ms_per_token)
    nbytes = dec.weight_bytes() + dec.kv_bytes(1, gen._kv_len(seq))
    return {"part": "generate", "system": system, "tok_per_s": new / statistics.median(times),
            "decode_tok_per_s": 1000 / statistics.median(event_ms), "compile_s": compile_s,
            "bytes_per_step": nbytes, "floor_tok_per_s": copy_gbps * 1e9 / nbytes,
            "recompiles": gen.recompiles()}


def _block_linear(module: torch.nn.Module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and fqn.startswith("layers.")


def part_generate(model: Any, schemes: tuple[str, ...], torchao: tuple[str, ...], copy_gbps: float, runs: int,
                  prompt_len: int = 5, new: int = 200) -> None:
    seq = prompt_len + new
    for name in schemes:
        dec = quantized(from_hf(model, max_batch_size=1, max_seq_len=seq, fuse=True, share=True), name)
        dec.use_decode_kernels()
        emit(_generate_row(dec, f"graphfix {name}", copy_gbps, runs, prompt_len, new))
        del dec
        torch.cuda.empty_cache()
    for name in torchao:
        try:
            import torchao
            from torchao.quantization import quantize_
        except Exception as exc:  # noqa: BLE001 - recorded, the rest of the benchmark stands
            emit({"part": "generate", "system": f"torchao {name}", "skipped": f"import torchao: {exc!r}"[:300]})
            continue
        try:
            dec = from_hf(model, max_batch_size=1, max_seq_len=seq, fuse=True, share=True)
            # torchao sets each decoder module's weight attribute (the HF model's modules keep their bf16 weights);
            # the LM head stays bf16, as graphfix's schemes keep it
            quantize_(dec, _torchao_config(name), filter_fn=_block_linear)
            row = _generate_row(dec, f"torchao {name}", copy_gbps, runs, prompt_len, new)
            row["torchao"] = torchao.__version__
            emit(row)
        except Exception as exc:  # noqa: BLE001 - recorded with its reason
            emit({"part": "generate", "system": f"torchao {name}", "skipped": f"{type(exc).__name__}: {exc}"[:400]})
        dec = None
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-2-7b")
    p.add_argument("--parts", default="kernels,gemv,step", help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--torchao", default="int8,int4", help="torchao weight-only configs for 'generate' ('' for none)")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_quant: needs a CUDA GPU", file=sys.stderr)
        return 2
    parts = [x for x in args.parts.split(",") if x]
    schemes = tuple(x for x in args.schemes.split(",") if x)
    dev = torch.device("cuda")
    copy_gbps = copy_bandwidth(dev)["gb_per_s"]
    emit({"part": "device", "name": torch.cuda.get_device_name(dev), "torch": torch.__version__,
          "copy_gb_per_s": copy_gbps})
    model = random_hf_model(args.model, dev, torch.bfloat16) if {"step", "generate"} & set(parts) else None
    for part in parts:
        t = time.perf_counter()
        if part == "kernels":
            part_kernels(schemes)
        elif part == "gemv":
            part_gemv(schemes, args.reps)
        elif part == "step":
            part_step(model, schemes, copy_gbps, args.reps)
        elif part == "generate":
            part_generate(model, schemes, tuple(x for x in args.torchao.split(",") if x), copy_gbps, args.runs)
        else:
            p.error(f"unknown part {part!r}")
        print(f"[bench_quant] {part}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(OUT, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
