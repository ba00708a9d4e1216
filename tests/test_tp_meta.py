"""``optimize(meta_model, tp=N)`` on CPU with gloo: Meta's ``forward(tokens, start_pos)`` on each rank's shard.

Two gloo ranks each build the same single-device tiny Meta ``Transformer``s (``helpers_meta``) and
call ``optimize`` on them with ``tp=2``: the tiny model (4 heads, 2 KV heads: one KV head per
rank) and a one-layer one with a single KV head, fewer KV heads than ranks, so each rank keeps a
replica of it (the case tp=4 would show with 2 KV heads, at half the processes: a world of 4
cost 37 s on the shared CPU). The checks then run Meta's own loops through ``model.forward``
(the token loop of ``Llama3.generate``, slicing a wider buffer, and a prefill + 32 decode steps
keeping logits) under ``fail_on_recompile``. The reference is world size 1: the original model,
eager, in this process. One spawn serves every check; ``optimize`` compiles with Dynamo only (the
``eager`` backend: fullgraph and recompiles are Dynamo's) and skips the diagnoses, which the
single-device tests cover.
"""

from __future__ import annotations

import os

import pytest
import torch

from graphfix.errors import InputError, UnsupportedModelError
from tests.helpers_meta import build_meta_transformer, free_port, meta_generate_greedy, run_decode, run_processes

STEPS = 32
PROMPT = [[3, 17, 42, 99, 7]]
WORLD = 2
CASES = {"gqa": {}, "one_kv_head": {"n_kv_heads": 1, "n_layers": 1}}
"""``build_meta_transformer`` overrides; expected ``(query heads, KV heads)`` per rank below."""
HEADS = {"gqa": (2, 1), "one_kv_head": (2, 1)}


def _meta_runs(forward) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """``(tokens of Meta's generate loop, last-position logits of prefill + STEPS decode steps, their tokens)``."""
    prompt = torch.tensor(PROMPT)
    tokens = meta_generate_greedy(forward, PROMPT, max_seq_len=64, max_gen_len=STEPS + 1)
    with torch.no_grad():
        outs, fed = run_decode(forward, prompt, STEPS)
    return tokens, [o[:, -1].float() for o in outs], torch.cat(fed, dim=1)


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    import graphfix
    from graphfix.engine.tp import init_tp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    init_tp(WORLD, "cpu")  # before the model: fairscale then starts at model-parallel size 1 inside this world
    results = {}
    for name, overrides in CASES.items():
        model = build_meta_transformer(0, **overrides)
        result = graphfix.optimize(model, tp=WORLD, prompt=torch.tensor(PROMPT), backend="eager",
                                   diagnose=False, decode_steps=STEPS)
        state = model.graphfix_optimized
        graphs_after_optimize = state.graphs()
        with torch.compiler.set_stance("fail_on_recompile"):
            runs = _meta_runs(model.forward)
        decoder, v = state.front.decoder, result.verification
        results[name] = {
            "verified": result.verified, "summary": result.summary(), "notes": result.notes, "runs": runs,
            "graphs": (graphs_after_optimize, state.graphs()), "checked": (v.graphs, v.recompiles, v.graph_breaks),
            "shape": (decoder.config.n_heads, decoder.config.n_kv_heads, type(decoder.output).__name__),
            "tensor_parallel": result.to_dict()["tensor_parallel"]}
    torch.save(results, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def references():
    return {name: _meta_runs(build_meta_transformer(0, **overrides).forward) for name, overrides in CASES.items()}


def test_meta_forward_at_tp_2_matches_world_size_1(references, tmp_path):
    out = str(tmp_path / "result")
    run_processes(_worker, (free_port(), out), nprocs=WORLD, timeout_s=240)
    for rank in range(WORLD):
        ranks = torch.load(f"{out}.{rank}", weights_only=False)
        for name, (ref_tokens, ref_logits, ref_fed) in references.items():
            got = ranks[name]
            assert got["verified"], got["summary"]
            assert f"tensor parallel, tp={WORLD} rank={rank}" in got["summary"]
            assert got["tensor_parallel"].startswith(f"tp={WORLD} rank={rank}")
            assert any(n.startswith(f"tensor parallel: tp={WORLD}") and "KV head" in n for n in got["notes"])
            assert got["shape"] == (*HEADS[name], "VocabParallelHead")
            graphs, checked = got["graphs"], got["checked"]
            assert graphs[0] == graphs[1] == {"prefill": 1, "decode": 1}  # fullgraph, no graph after warm-up
            assert checked == ({"prefill": 1, "decode": 1}, 0, 0)
            tokens, logits, fed = got["runs"]
            assert torch.equal(tokens, ref_tokens), (name, rank)
            assert torch.equal(fed, ref_fed), (name, rank)
            diff = max((a - b).abs().max().item() for a, b in zip(logits, ref_logits))
            assert diff <= 1e-4, (name, rank, diff)
    assert "each on 2 ranks" in " ".join(ranks["one_kv_head"]["notes"])  # the single KV head is replicated
    assert "each on" not in " ".join(ranks["gqa"]["notes"])  # two KV heads: one per rank


def test_model_parallel_meta_model_is_refused_with_a_hint():
    """A Meta model holding fairscale slices (here: wq cut in half) is refused before joining any group."""
    import graphfix

    model = build_meta_transformer(0)
    attn = model.layers[0].attention
    attn.wq.weight = torch.nn.Parameter(attn.wq.weight[: attn.wq.weight.shape[0] // 2].clone())
    with pytest.raises(UnsupportedModelError, match="model-parallel shards") as info:
        graphfix.optimize(model, tp=2)
    assert "load_sharded" in info.value.hint
    assert "graphfix_optimized" not in model.__dict__
    with pytest.raises(InputError, match="custom driver"):
        graphfix.optimize(build_meta_transformer(0), tp=2, driver=lambda m: m(torch.tensor(PROMPT), 0))
