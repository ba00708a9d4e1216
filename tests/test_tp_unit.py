"""Tensor parallelism pieces in one process: the plan, the readers, the all-reduce choice, world size 1.

World size 1 runs the same code as 8 (the functional collectives reduce over one rank), so
``shard`` at world size 1 must give exactly the plain decoder's logits, from HF, Meta and
decoder inputs; the multi-process proof is tests/test_tp.py.
"""

from __future__ import annotations

import pytest
import torch

import graphfix
from graphfix.engine import from_hf, from_meta
from graphfix.engine.llama import DecoderConfig
from graphfix.engine.tp import ShardPlan, init_tp
from graphfix.engine.tp.allreduce import decide
from graphfix.engine.tp.plan import Slice
from graphfix.engine.tp.readers import MetaSource, read_slice
from graphfix.errors import InputError
from tests.helpers_meta import build_meta_transformer
from tests.test_tp import _write_meta

TOKENS, POS = torch.tensor([[5, 9, 3, 77]]), torch.arange(4)[None]


def _cfg(**kw) -> DecoderConfig:
    base = {"vocab_size": 130, "dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "head_dim": 8,
            "intermediate_size": 96, "norm_eps": 1e-5, "rope_theta": 10000.0}
    return DecoderConfig(**{**base, **kw})


def test_plan_replicates_kv_heads_and_pads_the_vocabulary():
    plans = [ShardPlan(_cfg(), r, 4) for r in range(4)]
    # 8 query heads, 2 KV heads (n_rep 4), tp 4: ranks 0-1 hold KV head 0, ranks 2-3 KV head 1
    assert [p.first_kv_head for p in plans] == [0, 0, 1, 1]
    assert {p.kv_heads for p in plans} == {1} and plans[0].kv_replicas == 2
    assert plans[3].slice_for("layers.0.attention.wk.weight") == Slice(0, ((8, 8),))
    assert plans[3].slice_for("layers.0.attention.wo.weight") == Slice(1, ((48, 16),))
    last = plans[3].slice_for("output.weight")  # 130 rows over 4 ranks: 33 each, the last 31 real + 2 zeros
    assert last == Slice(0, ((99, 31),), pad_to=33)
    local = plans[1].local_config()
    assert (local.n_heads, local.n_kv_heads, local.intermediate_size, local.n_rep) == (2, 1, 24, 2)


def test_plan_refuses_a_size_that_does_not_divide():
    with pytest.raises(InputError, match="tp=3"):
        ShardPlan(_cfg(), 0, 3)
    with pytest.raises(InputError, match="KV heads"):
        ShardPlan(_cfg(n_kv_heads=3, n_heads=6), 0, 4)


def test_meta_source_reshards_across_files(tmp_path):
    _write_meta(tmp_path / "m", shards=2)
    full = build_meta_transformer(0).state_dict()
    src = MetaSource(tmp_path / "m")
    for name, sl in (("layers.0.attention.wq.weight", Slice(0, ((16, 32),))),   # spans both files
                     ("layers.0.feed_forward.w2.weight", Slice(1, ((10, 20),))),  # columns, across the boundary
                     ("output.weight", Slice(0, ((96, 32),), pad_to=40)),
                     ("norm.weight", Slice(None))):
        got = read_slice(src, name, sl, torch.float32)
        want = full[name] if sl.dim is None else full[name].narrow(sl.dim, *sl.ranges[0])
        assert torch.equal(got.narrow(0, 0, want.shape[0]), want), name
        if sl.pad_to:
            assert got.shape[0] == sl.pad_to and not got[want.shape[0]:].any()


def test_all_reduce_choice_and_its_reasons():
    assert decide("cpu", (True, ""), None).kind == "gloo"
    no_symm = decide("cuda", (False, "this torch has no torch.distributed._symmetric_memory"), {"nccl": 20.0})
    assert no_symm.kind == "nccl" and "no torch.distributed._symmetric_memory" in no_symm.reason
    failed = decide("cuda", (True, ""), {"nccl": 20.0, "one_shot_error": "RuntimeError: peer access"})
    assert failed.kind == "nccl" and "peer access" in failed.reason
    assert decide("cuda", (True, ""), {"nccl": 20.0, "one_shot": 8.0}, 16384).kind == "one_shot"
    slower = decide("cuda", (True, ""), {"nccl": 7.0, "one_shot": 8.0}, 16384)
    assert slower.kind == "nccl" and "NCCL measured faster" in slower.reason and "8.0" in slower.describe()


def _logits(dec) -> torch.Tensor:
    with torch.no_grad():
        return dec.step(TOKENS, POS)


def test_world_size_1_runs_the_same_path():
    from graphfix.bench.presets import tiny_hf
    from graphfix.engine.tp.layers import RowParallelLinear, VocabParallelHead

    tp = init_tp(1)
    hf = tiny_hf("qwen2", 0)
    ref = from_hf(hf, max_seq_len=32, share=True)
    sharded = graphfix.shard(hf, tp, max_seq_len=32)
    assert isinstance(sharded.layers[0].attention.wo, RowParallelLinear)
    assert isinstance(sharded.output, VocabParallelHead)
    assert torch.equal(_logits(sharded), _logits(ref))
    assert torch.equal(_logits(graphfix.shard(ref, tp)), _logits(ref))  # from a decoder: fused wqkv cut back
    meta = build_meta_transformer(0)
    meta_ref = _logits(from_meta(build_meta_transformer(0), max_batch_size=1, max_seq_len=32))
    assert torch.allclose(_logits(graphfix.shard(meta, tp, max_seq_len=32)), meta_ref, atol=1e-6)
    with pytest.raises(InputError, match="sharded already"):
        graphfix.shard(sharded, tp)


def test_random_source_builds_a_shard_the_benchmark_can_run():
    from graphfix.bench.tp import RandomSource
    from graphfix.engine.tp.build import build_shard

    tp, cfg = init_tp(1), _cfg()
    dec = build_shard(RandomSource(cfg, torch.device("cpu"), torch.float32), cfg, tp, max_seq_len=16)
    again = build_shard(RandomSource(cfg, torch.device("cpu"), torch.float32), cfg, tp, max_seq_len=16)
    out = _logits(dec)
    assert out.shape == (1, 4, 130) and torch.isfinite(out).all() and torch.equal(out, _logits(again))


def test_a_forced_all_reduce_must_be_one_we_have(monkeypatch):
    from graphfix.engine.tp import choose_all_reduce

    monkeypatch.setenv("GRAPHFIX_TP_ALL_REDUCE", "ring")
    with pytest.raises(InputError, match="GRAPHFIX_TP_ALL_REDUCE"):
        choose_all_reduce(init_tp(1))
    monkeypatch.setenv("GRAPHFIX_TP_ALL_REDUCE", "nccl")
    assert choose_all_reduce(init_tp(1)).kind == "gloo"  # on CPU there is nothing else


def test_tp_must_match_the_processes_started():
    init_tp(1)
    with pytest.raises(InputError, match="torchrun --nproc-per-node 2"):
        init_tp(2)


def test_weight_only_quantization_reaches_the_shards():
    """``graphfix.quantize`` swaps the linears inside the TP layers and keeps the LM head, as on the plain decoder."""
    from graphfix.bench.presets import tiny_hf

    tp, hf = init_tp(1), tiny_hf("llama", 0)
    sharded = graphfix.shard(hf, tp, max_seq_len=32)
    report = graphfix.quantize(sharded, "int8")
    assert "layers.0.attention.wo.linear" in report.quantized and "output.output" in report.skipped
    ref = from_hf(tiny_hf("llama", 0), max_seq_len=32)
    graphfix.quantize(ref, "int8")
    assert torch.equal(_logits(sharded), _logits(ref))
    sharded.use_decode_kernels()
    ref.use_decode_kernels()
    step = torch.tensor([[7]]), torch.tensor([[4]])
    with torch.no_grad():
        assert torch.equal(sharded.step(*step), ref.step(*step))


def test_the_vocabulary_gather_never_needs_chunk_cat(monkeypatch):
    """torch 2.11's ``all_gather_tensor`` along a dim other than 0 calls ``_maybe_view_chunk_cat``, which Dynamo
    will not trace (a fullgraph break on an H200): the head gathers along dim 0 and rearranges itself."""
    import torch._utils

    from graphfix.bench.presets import tiny_hf

    def refuse(*args, **kwargs):
        raise AssertionError("_maybe_view_chunk_cat called")

    import torch.distributed._functional_collectives as funcol

    monkeypatch.setattr(torch._utils, "_maybe_view_chunk_cat", refuse)
    monkeypatch.setattr(funcol, "_maybe_view_chunk_cat", refuse, raising=False)  # bound by name there
    tp = init_tp(1)
    hf = tiny_hf("llama", 0)
    ref = from_hf(hf, max_seq_len=32, share=True)
    sharded = graphfix.shard(hf, tp, max_seq_len=32)
    assert torch.equal(_logits(sharded), _logits(ref))
    x = torch.arange(24.0).view(2, 3, 4)
    assert torch.equal(sharded.output.all_gather_last(x), x)  # world of one: the identity, in the right layout


def test_a_rank_whose_verification_raises_still_votes_before_it_propagates(monkeypatch):
    """Its peers wait in the keep-or-undo agreement: the failing rank votes ``False`` there, then raises."""
    from graphfix.optimize import tp_front

    votes = []
    monkeypatch.setattr(tp_front, "agree", lambda tp, flag: votes.append(flag) or flag)

    def failing():
        raise RuntimeError("comparison failed")

    with pytest.raises(RuntimeError, match="comparison failed"):
        tp_front.verification_on_every_rank(object(), failing)
    assert votes == [False]
    assert tp_front.verification_on_every_rank(object(), lambda: "done") == "done" and votes == [False]
