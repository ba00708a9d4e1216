"""``optimize(meta_model, tp=N)`` on CPU with gloo: Meta's ``forward(tokens, start_pos)`` on each rank's shard.

Two gloo ranks each build the same tiny Meta ``Transformer``s (``helpers_meta``) and call
``optimize`` on them with ``tp=2``: the tiny model (4 heads, 2 KV heads: one KV head per rank),
a one-layer one with a single KV head, fewer KV heads than ranks, so each rank keeps a replica
of it, and a one-layer one built by fairscale at model-parallel size 2, each rank
holding its slices (served in place). The checks then run Meta's own loops through ``model.forward``
(the token loop of ``Llama3.generate``, slicing a wider buffer, and a prefill + 32 decode steps
keeping logits) under ``fail_on_recompile``. The reference is world size 1: the original model,
eager, in this process. One spawn serves every check; ``optimize`` compiles with Dynamo only (the
``eager`` backend: fullgraph and recompiles are Dynamo's) and skips the diagnoses, which the
single-device tests cover. A second spawn runs the 2-KV-head model at tp=4 (one query head per rank,
each KV head replicated on two).
"""

from __future__ import annotations

import os

import pytest
import torch

from graphfix.errors import InputError, UnsupportedModelError
from tests.helpers_meta import build_meta_transformer, free_port, meta_generate_greedy, run_decode, run_processes

STEPS = 32
VERIFY_STEPS = 8
"""optimize's own warm-up and verification (each call costs a few ms here); the 32 steps are the checks' own loops."""
PROMPT = [[3, 17, 42, 99, 7]]
WORLD = 2
CASES = {"gqa": {}, "one_kv_head": {"n_kv_heads": 1, "n_layers": 1}, "model_parallel": {}}
"""``build_meta_transformer`` overrides; ``model_parallel`` is built by fairscale at model-parallel size 2 (each
rank holding its slices, as Meta's ``Llama.build`` loads ``consolidated.NN.pth``), the others at size 1."""


def _meta_runs(forward) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """``(tokens of Meta's generate loop, last-position logits of prefill + STEPS decode steps, their tokens)``."""
    prompt = torch.tensor(PROMPT)
    tokens = meta_generate_greedy(forward, PROMPT, max_seq_len=64, max_gen_len=STEPS + 1)
    with torch.no_grad():
        outs, fed = run_decode(forward, prompt, STEPS)
    return tokens, [o[:, -1].float() for o in outs], torch.cat(fed, dim=1)


def _worker(rank: int, port: int, out: str, world: int = WORLD, names: tuple[str, ...] = tuple(CASES)) -> None:
    import torch.distributed as dist

    import graphfix
    from graphfix.engine.tp import init_tp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    init_tp(world, "cpu")  # before the model: fairscale then starts at model-parallel size 1 inside this world
    results = {}
    for name in names:
        overrides = CASES[name]
        if name == "model_parallel":
            import fairscale.nn.model_parallel.initialize as fs_init

            from tests.helpers_meta import init_model_parallel

            fs_init.destroy_model_parallel()
            init_model_parallel(WORLD)
        model = build_meta_transformer(0, **overrides)
        sliced = model.layers[0].attention.wq.weight.shape[0] != model.params.dim
        result = graphfix.optimize(model, tp=world, prompt=torch.tensor(PROMPT), backend="eager",
                                   diagnose=False, decode_steps=VERIFY_STEPS)
        state = model.graphfix_optimized
        graphs_after_optimize = state.graphs()
        with torch.compiler.set_stance("fail_on_recompile"):
            runs = _meta_runs(model.forward)
        decoder, v = state.front.decoder, result.verification
        results[name] = {
            "verified": result.verified, "summary": result.summary(), "notes": result.notes, "runs": runs,
            "graphs": (graphs_after_optimize, state.graphs()), "checked": (v.graphs, v.recompiles, v.graph_breaks),
            "shape": (decoder.config.n_heads, decoder.config.n_kv_heads, type(decoder.output).__name__),
            "tensor_parallel": result.to_dict()["tensor_parallel"], "sliced": sliced,
            "embedding": type(decoder.tok_embeddings).__name__}
    torch.save(results, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def _reference(overrides: dict) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """What ``_meta_runs`` gives at world size 1, from one eager loop (Meta's eager forward is slow on CPU): the
    generate loop's tokens are the prompt, the fed tokens and the last step's choice."""
    prompt = torch.tensor(PROMPT)
    with torch.no_grad():
        outs, fed = run_decode(build_meta_transformer(0, **overrides).forward, prompt, STEPS)
    logits = [o[:, -1].float() for o in outs]
    fed = torch.cat(fed, dim=1)
    return torch.cat([prompt, fed, logits[-1].argmax(-1, keepdim=True)], dim=1), logits, fed


@pytest.fixture(scope="module")
def references():
    runs: dict[str, tuple] = {}  # the model-parallel model is the gqa one cut in two: one reference serves both
    for overrides in CASES.values():
        if repr(overrides) not in runs:
            runs[repr(overrides)] = _reference(overrides)
    return {name: runs[repr(overrides)] for name, overrides in CASES.items()}


def test_meta_forward_at_tp_2_matches_world_size_1(references, tmp_path):
    out = str(tmp_path / "result")
    run_processes(_worker, (free_port(), out), nprocs=WORLD, timeout_s=240)
    for rank in range(WORLD):
        cases = torch.load(f"{out}.{rank}", weights_only=False)
        for name, (ref_tokens, ref_logits, ref_fed) in references.items():
            got = cases[name]
            assert got["verified"], got["summary"]
            assert f"tensor parallel, tp={WORLD} rank={rank}" in got["summary"]
            assert got["tensor_parallel"].startswith(f"tp={WORLD} rank={rank}")
            assert any(n.startswith(f"tensor parallel: tp={WORLD}") and "KV head" in n for n in got["notes"])
            assert got["shape"] == (2, 1, "VocabParallelHead")  # 4 heads, 2 or 1 KV heads: 2 and 1 per rank
            assert got["sliced"] == (name == "model_parallel")
            graphs, checked = got["graphs"], got["checked"]
            assert graphs[0] == graphs[1] == {"prefill": 1, "decode": 1}  # fullgraph, no graph after warm-up
            assert checked == ({"prefill": 1, "decode": 1}, 0, 0)
            tokens, logits, fed = got["runs"]
            assert torch.equal(tokens, ref_tokens), (name, rank)
            assert torch.equal(fed, ref_fed), (name, rank)
            diff = max((a - b).abs().max().item() for a, b in zip(logits, ref_logits))
            assert diff <= 1e-4, (name, rank, diff)
    assert "each on 2 ranks" in " ".join(cases["one_kv_head"]["notes"])  # the single KV head is replicated
    assert "each on" not in " ".join(cases["gqa"]["notes"])  # two KV heads: one per rank
    assert cases["model_parallel"]["embedding"] == "VocabParallelEmbedding"  # fairscale's slices, as they were


def test_meta_forward_at_tp_4_replicates_the_kv_heads_and_matches_world_size_1(references, tmp_path):
    """Four ranks, the tiny model's 2 KV heads: one query head per rank, each KV head on 2 ranks."""
    out = str(tmp_path / "result")
    run_processes(_worker, (free_port(), out, 4, ("gqa",)), nprocs=4, timeout_s=300)
    ref_tokens, ref_logits, ref_fed = references["gqa"]
    for rank in range(4):
        got = torch.load(f"{out}.{rank}", weights_only=False)["gqa"]
        assert got["verified"], got["summary"]
        assert got["tensor_parallel"].startswith(f"tp=4 rank={rank}")
        assert got["shape"] == (1, 1, "VocabParallelHead")
        assert "each on 2 ranks" in " ".join(got["notes"])
        assert got["graphs"][0] == got["graphs"][1] == {"prefill": 1, "decode": 1}
        assert got["checked"] == ({"prefill": 1, "decode": 1}, 0, 0)
        tokens, logits, fed = got["runs"]
        assert torch.equal(tokens, ref_tokens) and torch.equal(fed, ref_fed), rank
        assert max((a - b).abs().max().item() for a, b in zip(logits, ref_logits)) <= 1e-4, rank


def _cut(model, slices: int):
    """``model`` made to look cut by fairscale for ``slices`` ranks (its wq rows and embedding rows)."""
    attn = model.layers[0].attention
    attn.wq.weight = torch.nn.Parameter(attn.wq.weight[: attn.wq.weight.shape[0] // slices].clone())
    emb = model.tok_embeddings
    emb.weight = torch.nn.Parameter(emb.weight[: emb.weight.shape[0] // slices].clone())
    return model


def test_refusals_name_the_way_out():
    """Slices for another tp, slices graphfix does not read, a custom driver: refused before joining any group."""
    import graphfix

    model = _cut(build_meta_transformer(0), 4)
    with pytest.raises(UnsupportedModelError, match="slices for 4 ranks, not 2") as info:
        graphfix.optimize(model, tp=2)
    assert "tp=4" in info.value.hint and "load_sharded" in info.value.hint
    assert "graphfix_optimized" not in model.__dict__
    model = build_meta_transformer(0)
    model.layers[0].attention.wq.weight = torch.nn.Parameter(model.layers[0].attention.wq.weight[:32].clone())
    with pytest.raises(UnsupportedModelError, match="does not read in memory") as info:
        graphfix.optimize(model, tp=2)  # wq cut, the embedding whole: not fairscale's layout
    assert "load_sharded" in info.value.hint
    with pytest.raises(InputError, match="custom driver"):
        graphfix.optimize(build_meta_transformer(0), tp=2, driver=lambda m: m(torch.tensor(PROMPT), 0))


def test_rank_slices_are_read_in_full_coordinates_and_nowhere_else():
    from graphfix.engine.tp.readers import RankSliceSource

    full = torch.arange(32.0).reshape(8, 4)
    source = RankSliceSource({"layers.0.attention.wq.weight": full[4:], "layers.0.attention.wo.weight": full[:, 2:],
                              "norm.weight": torch.ones(4)}, rank=1)
    assert torch.equal(source.read("layers.0.attention.wq.weight", 0, 4, 4), full[4:])
    assert torch.equal(source.read("layers.0.attention.wq.weight", 0, 6, 2), full[6:])
    assert torch.equal(source.read("layers.0.attention.wo.weight", 1, 2, 2), full[:, 2:])
    assert torch.equal(source.read("norm.weight", None), torch.ones(4))
    with pytest.raises(InputError, match="holds 4..7 along dim 0, not 2..5 along dim 0"):
        source.read("layers.0.attention.wq.weight", 0, 2, 4)  # another rank's rows
    with pytest.raises(InputError, match="not the whole tensor"):
        source.read("layers.0.attention.wq.weight", None)
