"""Wall time and peak memory of a full ``graphfix report``, as a user runs it.

Two cases from issue #2: the real SmolLM2-135M (GGUF, weights loaded, fp32) and
a Llama-2-70B ``config.json`` built on the meta device (no weights). Each runs
in a fresh process (``python -m graphfix.cli report ...``); peak memory is the
child's maximum resident set size. This script imports no torch itself, so the
child's figure is not inflated by the parent.

    python benchmarks/bench_report.py            # both cases
    python benchmarks/bench_report.py --only 70b
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

LLAMA2_70B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 32000,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "torch_dtype": "float16",
}


def run_case(name: str, args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "graphfix.cli", "--quiet", "report", *args, "--format", "json"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{name}: graphfix exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    report = json.loads(proc.stdout)
    return {
        "case": name,
        "wall_s": round(wall, 1),
        "diagnose_s": report["wall_seconds"],
        "peak_rss_mb": round(peak_kb / 1024),
        "graphs": report["stats"]["graphs"],
        "breaks": report["counts"]["graph_break"],
        "recompiles": report["counts"]["recompile"],
        "command": " ".join(["graphfix", "report", *args]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["smollm2", "70b"])
    opts = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if opts.only in (None, "smollm2"):
            rows.append(run_case("SmolLM2-135M (gguf, fp32)", ["smollm2"]))
        if opts.only in (None, "70b"):
            cfg = os.path.join(tmp, "config.json")
            with open(cfg, "w") as fh:
                json.dump(LLAMA2_70B, fh)
            rows.append(run_case("Llama-2-70B config.json (meta device)", [cfg]))
    print(f"{'case':40} {'wall s':>7} {'diagnose s':>10} {'peak MB':>8} {'graphs':>6} {'breaks':>6} {'recompiles':>10}")
    for r in rows:
        print(f"{r['case']:40} {r['wall_s']:7.1f} {r['diagnose_s']:10.1f} {r['peak_rss_mb']:8d} {r['graphs']:6d} "
              f"{r['breaks']:6d} {r['recompiles']:10d}")
    print(json.dumps({"schema": "graphfix.bench.report", "schema_version": 1, "rows": rows}))


if __name__ == "__main__":
    main()
