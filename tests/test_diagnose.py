"""The diagnosis engine on real third-party code and on the synthetic model.

Counts and locations asserted here are what torch 2.13 does on these models
(see docs/diagnosis.md); each assertion could fail if the engine mislabels,
misplaces or drops a finding.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from graphfix.diagnose.diagnosis import diagnose
from graphfix.diagnose.findings import Category
from graphfix.diagnose.report import Report
from tests.fixtures import synthetic
from tests.fixtures.tiny_hf import tiny_hf
from tests.meta_models import strip_fairscale, tiny_meta_transformer

ROOT = Path(__file__).resolve().parents[1]


def _line_of(func, needle: str) -> int:
    lines, start = inspect.getsourcelines(func)
    for offset, line in enumerate(lines):
        if needle in line:
            return start + offset
    raise AssertionError(f"{needle!r} not in {func}")


@pytest.fixture(scope="module")
def synthetic_report() -> Report:
    return diagnose(synthetic.build(), decode_steps=16)


def test_synthetic_print_break_is_a_side_effect_at_its_line(synthetic_report: Report) -> None:
    line = _line_of(synthetic.SyntheticModel.forward, "print(")
    hits = [f for f in synthetic_report.graph_breaks if f.location.line == line]
    assert hits and all(f.category == Category.PYTHON_SIDE_EFFECT for f in hits)
    assert hits[0].module_paths == ["(root)"]
    assert hits[0].gb_id and hits[0].gb_id.startswith("GB")
    assert "fullgraph=True" in hits[0].mode  # the whole-graph run stops here first


def test_synthetic_item_break_is_data_dependent(synthetic_report: Report) -> None:
    line = _line_of(synthetic.SyntheticModel.forward, ".item()")
    (hit,) = [f for f in synthetic_report.graph_breaks if f.location.line == line]
    assert hit.category == Category.DATA_DEPENDENT
    assert "item" in hit.message


def test_synthetic_sdp_kernel_break_in_every_attention(synthetic_report: Report) -> None:
    line = _line_of(synthetic.SyntheticAttention.forward, "sdp_kernel")
    hits = [f for f in synthetic_report.graph_breaks if f.location.line == line]
    assert hits and {f.category for f in hits} == {Category.SDPA_CONTEXT_MANAGER}
    assert hits[0].module_paths == ["layers.*.attn"]
    # Dynamo gives up on the attention frame after the break: it is reported as skipped (runs in Python).
    assert sum(f.occurrences for f in hits) >= 2
    assert any(f.message.startswith("frame skipped") for f in hits)


def test_synthetic_async_collective_break(synthetic_report: Report) -> None:
    line = _line_of(synthetic.SyntheticBlock.forward, "async_op=True")
    (hit,) = [f for f in synthetic_report.graph_breaks if f.location.line == line]
    assert hit.category == Category.COLLECTIVE
    assert hit.module_paths == ["layers.*"]
    assert "async_op" in (hit.gb_type or hit.message)


def test_synthetic_prefill_to_decode_recompiles(synthetic_report: Report) -> None:
    recompiles = [f for f in synthetic_report.recompiles if f.hidden_behind is None]
    assert recompiles, "the prefill-to-decode shape change must be reported"
    assert all(f.phase == "decode:1" for f in recompiles)
    assert all(f.guard and "size mismatch" in f.guard for f in recompiles)
    assert {f.category for f in recompiles} == {Category.DYNAMIC_CACHE}
    assert synthetic_report.stats.graphs >= 2 * len(synthetic_report.graph_breaks) // 2


def test_meta_reference_fairscale_breaks() -> None:
    report = diagnose(tiny_meta_transformer(), decode_steps=16, backend="eager")
    from fairscale.nn.model_parallel import mappings

    line = _line_of(mappings._reduce, "mark_dirty")
    hits = [f for f in report.graph_breaks if f.location.file == mappings.__file__ and f.location.line == line]
    assert hits, [f.location for f in report.findings]
    assert {f.category for f in hits} == {Category.AUTOGRAD_FUNCTION_CTX}
    main = max(hits, key=lambda f: f.occurrences)
    # Logged once per compile: tok_embeddings, then wo and w2 in both layers.
    assert main.occurrences >= 5
    assert "tok_embeddings" in main.module_paths
    assert {"layers.*.attention.wo", "layers.*.feed_forward.w2"} <= set(main.module_paths)
    assert "mark_dirty" in main.message
    # Dynamo gives up on Transformer.forward: every decode call runs a graph per piece between breaks.
    assert report.stats.graphs_per_decode >= 5
    assert any("frame skipped" in f.message for f in hits)


def test_meta_inference_mode_failure_once_fairscale_is_gone() -> None:
    model = strip_fairscale(tiny_meta_transformer())
    report = diagnose(model, decode_steps=16, backend="aot_eager")
    (failure,) = report.compile_failures
    assert failure.category == Category.INFERENCE_MODE
    assert "inference tensor" in failure.message
    assert failure.module_paths == ["(root)"]
    from llama_models.llama3 import model as meta_model

    assert failure.location.file == meta_model.__file__
    assert not report.graph_breaks


def test_meta_start_pos_recompile_without_fairscale() -> None:
    model = strip_fairscale(tiny_meta_transformer())
    report = diagnose(model, decode_steps=16, backend="eager")
    assert not report.graph_breaks and not report.compile_failures
    (recompile,) = report.recompiles
    assert recompile.phase == "decode:1"
    assert recompile.category == Category.DYNAMIC_CACHE
    assert recompile.module_paths == ["(root)"]
    assert report.stats.graphs == 2


def test_meta_complex_rope_inductor_fallbacks() -> None:
    report = diagnose(tiny_meta_transformer(), decode_steps=1, backend="eager", inductor=True, fullgraph_check=False)
    fallbacks = report.inductor_fallbacks
    ops = {f.message.split(":")[0] for f in fallbacks}
    assert "aten.view_as_complex.default" in ops and "aten.view_as_real.default" in ops
    assert {f.category for f in fallbacks if "complex" in f.message} == {Category.COMPLEX_ROPE}
    from llama_models.llama3 import model as meta_model

    line = _line_of(meta_model.apply_rotary_emb, "view_as_complex(xq")
    assert any(f.location and f.location.line == line for f in fallbacks)
    assert all(f.module_paths == ["layers.*.attention"] for f in fallbacks if f.location.line == line)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_hf_models_have_no_breaks_but_dynamic_cache_recompiles(kind: str) -> None:
    # A 4-token prompt lets Mistral's 8-token sliding window fill up during decode.
    window = {"sliding_window": 8} if kind == "mistral" else {}
    report = diagnose(tiny_hf(kind, max_position_embeddings=128, **window), decode_steps=16, prefill_tokens=4, backend="eager")
    assert not report.graph_breaks
    assert not report.compile_failures
    assert report.recompiles, "DynamicCache recompiles after the prefill"
    assert all(f.category == Category.DYNAMIC_CACHE for f in report.recompiles)
    assert report.recompiles[0].phase == "decode:1"
    # blamed on the model's forward, not on transformers' decorator around it
    assert report.recompiles[0].module_paths == ["(root)"]
    assert report.recompiles[0].location.file.endswith(f"modeling_{kind}.py")
    if kind == "mistral":
        # the sliding window filling up (8 < 8 + 16 tokens) costs extra recompiles
        assert report.stats.recompiles > 2
        assert any(int(f.phase.split(":")[1]) > 1 for f in report.recompiles)


def test_meta_device_config_diagnosis_allocates_nothing() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=2,
                         num_attention_heads=64, num_key_value_heads=8)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).eval()
    report = diagnose(model, decode_steps=16, backend="eager")
    assert report.device == "meta"
    assert not report.graph_breaks and report.recompiles
    assert report.peak_memory_mb < 4096


def test_example_inputs_driver() -> None:
    class Tiny(torch.nn.Module):
        def forward(self, x):
            if x.sum().item() > 0:
                return x * 2
            return x

    report = diagnose(Tiny(), inputs=[(torch.ones(3),), (torch.ones(3),)], backend="eager")
    assert report.driver == "example-inputs"
    assert [f.category for f in report.graph_breaks] == [Category.DATA_DEPENDENT]


WORLD2 = textwrap.dedent(
    """
    import json, os, sys, torch
    import torch.distributed as dist
    rank = int(sys.argv[1]); out = sys.argv[2]
    os.environ["MASTER_ADDR"] = "127.0.0.1"; os.environ["MASTER_PORT"] = sys.argv[3]
    dist.init_process_group("gloo", rank=rank, world_size=2)
    import fairscale.nn.model_parallel.initialize as fs_init
    fs_init.initialize_model_parallel(2)
    from tests.meta_models import tiny_meta_transformer
    from graphfix.diagnose.diagnosis import diagnose
    report = diagnose(tiny_meta_transformer(), decode_steps=16, backend="eager", fullgraph_check=False)
    if rank == 0:
        open(out, "w").write(report.to_json())
    dist.barrier()
    """
)


@pytest.mark.slow
def test_meta_reference_world_size_2_over_gloo(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    port = str(29700 + os.getpid() % 200)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", WORLD2, str(r), str(out), port], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    logs = [p.communicate(timeout=240)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:]
    report = Report.from_dict(json.loads(out.read_text()))
    hits = [f for f in report.graph_breaks if f.category == Category.AUTOGRAD_FUNCTION_CTX]
    assert hits and max(f.occurrences for f in hits) >= 5
    assert any(f.location.file.endswith("fairscale/nn/model_parallel/mappings.py") for f in hits)


def test_a_compile_failure_leaves_the_thread_dispatch_state_as_it_was() -> None:
    """The inference-mode failure used to leave dispatch-key guards in its traceback's frames; freed later by the
    garbage collector, they switched the Python dispatcher on and every later compile in the process failed."""
    import gc

    def state() -> tuple[str, str]:
        return repr(torch._C._dispatch_tls_local_include_set()), repr(torch._C._dispatch_tls_local_exclude_set())

    before = state()
    report = diagnose(strip_fairscale(tiny_meta_transformer()), decode_steps=2, backend="aot_eager")
    assert [f.category for f in report.compile_failures] == [Category.INFERENCE_MODE]
    del report
    gc.collect()
    assert state() == before
    after = diagnose(strip_fairscale(tiny_meta_transformer()), decode_steps=2, backend="eager")
    assert not after.compile_failures
