"""Benchmark checkpoint conversion on a synthetic Llama-2-7B-shaped checkpoint: throughput and peak memory.

Writes a random HF checkpoint with Llama-2-7B shapes (13.5 GB in bfloat16,
written shard by shard so the benchmark itself never holds it), converts it
HF -> Meta and back, and reports for each direction the wall time, the
throughput in GB/s of tensor data and the peak RSS of the converting process.
Each conversion runs in its own subprocess, so the peak RSS is that of the
conversion alone (not of writing the synthetic checkpoint or of a previous
run). Use ``--layers`` for a quick run.

    python benchmarks/bench_convert.py --workdir /tmp/bench            # full 7B shapes
    python benchmarks/bench_convert.py --layers 2                      # quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LLAMA2_7B = {
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "intermediate_size": 11008, "vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "max_position_embeddings": 4096, "tie_word_embeddings": False,
}

# Peak RSS is read from /proc/self/status VmHWM: Linux carries ru_maxrss across fork+exec, so a child's
# getrusage(RUSAGE_SELF/RUSAGE_CHILDREN) maximum starts at the parent's RSS, whereas VmHWM belongs to the
# new process image alone. ru_maxrss is reported too, for comparison.
_CHILD = """
import json, resource, sys, time
from graphfix.convert import convert
t = time.perf_counter()
convert(sys.argv[1], sys.argv[2], to=sys.argv[3], progress=False)
seconds = time.perf_counter() - t
hwm = None
try:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
except OSError:
    pass
ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "peak_rss_bytes": hwm or ru, "ru_maxrss_bytes": ru}))
"""


def write_synthetic(folder: Path, config: dict, dtype: torch.dtype, seed: int = 0) -> int:
    """Write a random HF Llama checkpoint tensor by tensor (5 GB shards); returns tensor bytes written."""
    from graphfix.convert.formats.hf import DEFAULT_MAX_SHARD_BYTES, INDEX, plan_shards
    from graphfix.convert.formats.safetensors_io import SafetensorsWriter
    from graphfix.convert.spec import ModelSpec

    spec = ModelSpec(**{k: v for k, v in config.items() if k in ModelSpec.__dataclass_fields__})
    shapes = spec.expected_shapes()
    names = list(shapes)
    sizes = [torch.Size(shapes[n]).numel() * dtype.itemsize for n in names]
    assign = plan_shards(sizes, shards=None, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES)
    count = max(assign) + 1
    files = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    for i, fname in enumerate(files):
        members = [n for n, s in zip(names, assign) if s == i]
        w = SafetensorsWriter(folder / fname, [(n, shapes[n], dtype) for n in members])
        for n in members:
            if len(shapes[n]) == 1:
                t = 1 + 0.1 * torch.randn(shapes[n], generator=gen)
            else:
                t = torch.randn(shapes[n], generator=gen) * 0.02
            w.write(n, t.to(dtype))
            del t
        w.close()
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": sum(sizes)},
                                            "weight_map": {n: files[s] for n, s in zip(names, assign)}}))
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
           "dtype": str(dtype).removeprefix("torch."), **config}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return sum(sizes)


def run_conversion(src: Path, dst: Path, to: str) -> dict:
    """Convert in a fresh subprocess; returns its wall time and peak RSS."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(dst), to], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"conversion {src} -> {dst} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def verify(a: Path, b: Path, names: list[str]) -> None:
    """Check a few tensors came back bit-exact after HF -> Meta -> HF."""
    from graphfix.convert import open_checkpoint

    with open_checkpoint(a) as ca, open_checkpoint(b) as cb:
        for n in names:
            if not torch.equal(ca.tensors[n].load(None), cb.tensors[n].load(None)):
                raise SystemExit(f"round trip changed {n}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=None, help="folder for the checkpoints (default: a temp dir)")
    p.add_argument("--layers", type=int, default=32, help="number of layers (32 = full Llama-2-7B)")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    args = p.parse_args(argv)

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    work = Path(tempfile.mkdtemp(prefix="bench_convert-", dir=args.workdir)) if args.workdir is None or \
        args.workdir.exists() else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    config = {**LLAMA2_7B, "num_hidden_layers": args.layers}
    dtype = getattr(torch, args.dtype)
    try:
        t = time.perf_counter()
        total = write_synthetic(work / "hf", config, dtype)
        print(f"synthetic checkpoint: {args.layers} layers, {total / 1e9:.2f} GB {args.dtype}, "
              f"written in {time.perf_counter() - t:.1f} s")
        rows = []
        for src, dst, to in (("hf", "meta", "meta"), ("meta", "hf_back", "hf")):
            r = run_conversion(work / src, work / dst, to)
            rows.append((f"{src} -> {to}", r))
            print(f"{src:>4} -> {to:<4}  {r['seconds']:7.1f} s  {total / r['seconds'] / 1e9:5.2f} GB/s  "
                  f"peak RSS {r['peak_rss_bytes'] / 2**20:7.0f} MiB")
        verify(work / "hf", work / "hf_back", ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                                               "model.layers.0.self_attn.k_proj.weight", "lm_head.weight"])
        print("round trip: sampled tensors bit-exact")
        print(json.dumps({"tensor_bytes": total, "layers": args.layers, "dtype": args.dtype,
                          "results": {k: v for k, v in rows}}))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
