"""What ``optimize`` does to save wall time keeps what it proves: representative-layer diagnoses, the compile cache.

One optimize of a 4-layer HF Llama (``aot_eager``): the diagnoses run 2 of its 4 layers and say so,
find what the whole model's diagnoses find (the DynamicCache recompiles, the pass they name), the
model keeps its 4 layers and verifies; ``cache_dir`` is activated before compiling and saved after.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from graphfix.diagnose.findings import Kind
from graphfix.errors import InputError
from graphfix.optimize.api import optimize
from tests.fixtures.tiny_hf import tiny_hf


def test_optimize_diagnoses_representative_layers_and_keeps_the_cache(tmp_path, monkeypatch) -> None:
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # CompileCache.activate sets them process-wide
        monkeypatch.setenv(var, os.environ.get(var, str(tmp_path / "unused")))
    monkeypatch.setattr(sys, "pycache_prefix", sys.pycache_prefix)
    model = tiny_hf("llama", num_hidden_layers=4)
    layers = list(model.model.layers)
    messages: list[str] = []
    prompt = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    result = optimize(model, backend="aot_eager", max_seq_len=64, decode_steps=4, diagnose_steps=2, prompt=prompt,
                      cache_dir=tmp_path / "cache", progress=messages.append)
    assert result.verified
    for report in (result.before, result.after):
        assert any(n.startswith("diagnosed 2 of 4 layers (the others repeat them): model.layers 0, 3,")
                   for n in report.notes)
    assert result.before.stats.recompiles == 2 and result.before.stats.graph_breaks == 0
    assert [f.kind for f in result.before.findings] == [Kind.RECOMPILE, Kind.RECOMPILE]
    assert [p.name for p in result.passes] == ["static-kv-cache"]
    assert result.after.stats.graph_breaks == 0
    assert result.after.stats.recompiles == 1  # the static cache's prefill-to-decode one, as with every layer
    assert list(model.model.layers) == layers and model.config.num_hidden_layers == 4
    assert [m.self_attn.layer_idx for m in layers] == [0, 1, 2, 3]
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    assert any(m.startswith("compile cache saved") for m in messages)
    assert any(m.startswith("compile cache ") and "GEMV tile choices" in m for m in messages)
    with pytest.raises(InputError):
        optimize(tiny_hf("llama"), diagnose_layers="half")
