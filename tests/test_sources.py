"""Every MODEL form ``graphfix report`` accepts loads to a model that the diagnosis can drive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graphfix.cli.app import main
from graphfix.diagnose import sources
from graphfix.diagnose.diagnosis import diagnose
from tests.fixtures.tiny_hf import tiny_hf


def _tiny_llama_dir(tmp_path: Path) -> Path:
    out = tmp_path / "hf"
    tiny_hf("llama", max_position_embeddings=2048).save_pretrained(out)  # LlamaConfig's default length
    return out


def test_hf_directory(tmp_path: Path) -> None:
    loaded = sources.load(str(_tiny_llama_dir(tmp_path)))
    assert loaded.source == "hf" and loaded.model.device.type == "cpu"
    report = diagnose(loaded.model, decode_steps=16, backend="eager")
    assert not report.graph_breaks and report.recompiles


def test_hf_directory_on_meta_device(tmp_path: Path) -> None:
    loaded = sources.load(str(_tiny_llama_dir(tmp_path)), meta_device=True)
    assert next(loaded.model.parameters()).device.type == "meta"


def test_meta_checkpoint_folder(tmp_path: Path) -> None:
    from graphfix.convert import convert

    meta_dir = convert(_tiny_llama_dir(tmp_path), tmp_path / "meta", to="meta", progress=False)
    loaded = sources.load(str(meta_dir))
    assert loaded.source == "meta"
    assert type(loaded.model).__module__ == "llama_models.llama3.model"
    report = diagnose(loaded.model, decode_steps=16, backend="eager", fullgraph_check=False)
    assert any(f.category.value == "autograd_function_ctx" for f in report.graph_breaks)


def test_callable_with_inputs() -> None:
    loaded = sources.load("tests.fixtures.bad_models:broken_forward")
    assert loaded.inputs and loaded.source == "callable"


@pytest.mark.slow
def test_real_smollm2_full_report(tmp_path: Path) -> None:
    out = tmp_path / "smollm2.json"
    code = main(["-q", "report", "smollm2", "--format", "json", "--output", str(out), "--max-recompiles", "2"])
    data = json.loads(out.read_text())
    assert code == 0
    assert data["model"] == "SmolLM2-135M-Instruct" and data["source"] == "gguf"
    assert data["counts"]["graph_break"] == 0 and data["counts"]["compile_failure"] == 0
    assert data["stats"]["graphs_per_decode"] == 1
    assert {f["category"] for f in data["findings"]} == {"dynamic_cache_or_position"}
    assert all(f["module_paths"] == ["(root)"] for f in data["findings"])
