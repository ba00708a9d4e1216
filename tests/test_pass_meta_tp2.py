"""Meta Transformer at fairscale model-parallel size 2 (two gloo processes): the passes keep the logits.

Each rank builds the tiny model from the same seed; ``helpers_meta`` draws every
master weight from ``(seed, name)`` and keeps the rank's fairscale shard, so the
sharded model equals the world-size-1 one. Rank 0 sends back the logits of
Meta's original model, of the rewritten one, and of the rewritten one with its
core compiled (``fullgraph=True``, functional collectives in the graph); this
process compares them with the world-size-1 logits.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers_meta import build_meta_transformer, free_port, run_decode, run_processes

STEPS = 6
pytestmark = pytest.mark.slow


def _worker(rank: int, port: int, path: str, prompt: torch.Tensor, fed: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    from graphfix.rewrite.blocks.meta_llama import set_compiled_core
    from tests.helpers_meta import apply_passes, init_model_parallel

    init_model_parallel(2, rank, port)
    original = build_meta_transformer(0)
    rewritten = build_meta_transformer(0)
    results = apply_passes(rewritten)
    compiled = build_meta_transformer(0)
    apply_passes(compiled)
    set_compiled_core(compiled, torch.compile(compiled.graphfix_step, backend="aot_eager", fullgraph=True))
    logits = {name: run_decode(m.forward, prompt, STEPS, fed)[0]
              for name, m in (("original", original), ("rewritten", rewritten), ("compiled", compiled))}
    if rank == 0:
        notes = [n for r in results for n in r.notes]
        torch.save({"logits": logits, "notes": notes, "layer": repr(rewritten.layers[0].attention.wo)}, path)
    dist.barrier()
    dist.destroy_process_group()


def test_world_size_2_matches_world_size_1(tmp_path):
    model = build_meta_transformer(0)  # world size 1: the full weights
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    ref, fed = run_decode(model.forward, prompt, STEPS)

    path = str(tmp_path / "rank0.pt")
    run_processes(_worker, (free_port(), path, prompt, fed))
    got = torch.load(path, weights_only=False)

    assert "ws=2" in got["layer"]
    assert any("all_reduce/all_gather_tensor in the graph" in n for n in got["notes"])
    scale = max(r.abs().max().item() for r in ref)
    for name in ("original", "rewritten", "compiled"):
        diff = max((a - b).abs().max().item() for a, b in zip(ref, got["logits"][name]))
        assert diff <= 1e-4 * scale, (name, diff)
