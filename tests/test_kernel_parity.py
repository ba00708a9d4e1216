"""The GPU checks of the decode kernels (``graphfix.bench.kernel_parity``), run on CPU.

With ``--interpret`` the compiled kernel path runs the Triton kernels in Triton's interpreter
(``aot_eager``); the other runs check the checks themselves: a GPU session runs them once,
and a Python error there costs the whole call.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from graphfix.bench.kernel_parity import batch_scaling
from graphfix.bench.timing import Budget


def test_compiled_kernel_path_equals_eager_with_both_settings_alternating_in_the_interpreter():
    """``kernel_parity --interpret``: the Triton kernels in the interpreter, compiled with aot_eager, at batch 2 (rows
    at different positions), each setting warmed up once and then used alternately under fail_on_recompile."""
    import triton  # noqa: F401 - a test dependency: its absence is a failure, not a skip

    proc = subprocess.run([sys.executable, "-m", "graphfix.bench.kernel_parity", "--interpret", "--models", "qwen2",
                           "--batches", "2", "--new", "4"], check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    (res,) = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert res["ok"] and set(res["batches"]) == {"2"}
    for row in res["batches"].values():
        assert row["kernel_path_ran"] and row["compiled_kernels_equal_eager"], row
        assert row["kernel_calls"] == {"decode_attention": 2, "fused_gemv": 9, "rope_cache": 2}


def test_batch_scaling_reports_a_ratio_per_variant_and_skips_what_the_budget_cannot_hold():
    rows = batch_scaling(torch.device("cpu"), layers=1, variants=("kernels", "fused"), batches=(1, 2), new=4,
                         runs=1, preset="tiny", backend="aot_eager", budget=Budget(600))
    assert [r["variant"] for r in rows] == ["kernels", "fused"]
    assert [r["decode_kernels"] for r in rows] == ["all", False]
    for r in rows:
        assert r["ratio"]["batch1"] == 1.0 and r["ratio"]["batch2"] > 0
        assert r["batch2"]["per_sequence_tok_s"] > 0
    skipped = batch_scaling(torch.device("cpu"), layers=1, variants=("kernels",), preset="tiny", budget=Budget(0))
    assert "skipped" in skipped[0]
