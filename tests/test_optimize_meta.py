"""``graphfix.optimize`` on Meta's reference ``Transformer`` (world size 1) and on unknown Llama-style code.

The world-size-2 run of the same passes and compiled core is tests/test_pass_meta_tp2.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphfix.errors import GraphfixError, InputError, UnsupportedModelError
from graphfix.optimize.api import META_PASSES, OptimizeWarning, optimize
from graphfix.optimize.verification import verify
from tests.helpers_meta import build_meta_transformer, meta_generate_greedy, run_decode


@pytest.fixture(scope="module")
def meta():
    prompt = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))  # Meta's max_batch_size
    return optimize(build_meta_transformer(0), prompt=prompt, backend="aot_eager", diagnose_steps=2)


def test_meta_verified_after_the_five_passes(meta):
    assert meta.verified, meta.summary()
    assert meta.kind == "meta" and [p.name for p in meta.passes] == list(META_PASSES)
    assert all(p.rewritten > 0 and not p.skipped for p in meta.passes)
    before, v = meta.before.stats, meta.verification
    assert before.graph_breaks > 0 and before.recompiles > 0  # fairscale's mark_dirty, int start_pos
    assert meta.after.stats.graph_breaks == 0 and meta.after.stats.compile_failures == 0
    assert v.graphs == {"prefill": 1, "decode": 1} and v.recompiles == 0 and v.graph_breaks == 0
    assert meta.parity.tokens_match and meta.parity.relative_error <= 1e-4
    rows = {what: (b, a) for what, b, a in meta.rows()}
    assert rows["graph breaks"] == (str(before.graph_breaks), "0") and rows["recompiles"][1] == "0"


def test_meta_forward_keeps_the_calling_convention(meta):
    reference = build_meta_transformer(0)
    prompt = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    ref, fed = run_decode(reference.forward, prompt, 12)
    with torch.compiler.set_stance("fail_on_recompile"):  # warm: another prompt length, then decode
        out, _ = run_decode(meta.model.forward, prompt, 12, fed)
    scale = max(r.abs().max().item() for r in ref)
    assert max((a - b).abs().max().item() for a, b in zip(ref, out)) <= 1e-4 * scale


def test_meta_generation_loop_gives_the_same_tokens(meta):
    prompts = [[5, 17, 99, 3, 42], [7, 8, 9]]  # padded batch: a prefill of 3, then one position at a time
    expected = meta_generate_greedy(build_meta_transformer(0).forward, prompts, max_seq_len=64, max_gen_len=20)
    out = meta_generate_greedy(meta.model.forward, prompts, max_seq_len=64, max_gen_len=20)
    assert torch.equal(out, expected)
    assert meta.model.graphfix_optimized.graphs() == {"prefill": 1, "decode": 1}


def test_verify_needs_an_optimized_model(meta):
    with pytest.raises(InputError, match="not optimized by graphfix"):
        verify(build_meta_transformer(0))
    with pytest.raises(InputError, match="already optimized"):
        optimize(meta.model)
    again = verify(meta.model, decode_steps=4, measure_speed=False, other_prompt_length=False)
    assert again.ok and again.parity.greedy_steps == 5 and again.strict_decode_steps == 3


def test_meta_without_the_static_cache_is_not_compiled_and_not_verified():
    with pytest.warns(OptimizeWarning, match="not compiled"):
        result = optimize(build_meta_transformer(0), passes=["functional-collectives"], diagnose=False,
                          backend="aot_eager", decode_steps=4)
    assert not result.verified and not result.compiled
    assert result.parity.tokens_match  # the rewrite itself kept the numerics
    assert any(n.startswith("not compiled: Meta's Transformer without the static-kv-cache") for n in result.notes)


def test_unknown_pass_is_a_one_line_error():
    model = build_meta_transformer(0)
    with pytest.raises(GraphfixError) as info:
        optimize(model, passes="real-rope,no-such-pass")
    assert "unknown pass 'no-such-pass'" in str(info.value) and "\n" not in str(info.value)
    assert "graphfix_optimized" not in model.__dict__


class StartPosModel(nn.Module):
    """Unknown Llama-style code: ``forward(tokens, start_pos)`` with an attribute cache written at an int position.

    ``growing``: the cache is concatenated instead (its shape changes every step);
    ``data_dependent``: a branch on a tensor value.
    """

    def __init__(self, growing: bool = False, data_dependent: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.out = nn.Embedding(128, 32), nn.Linear(32, 128)
        self.growing, self.data_dependent = growing, data_dependent
        self.register_buffer("cache", torch.zeros(1, 64, 32))
        self.past = torch.zeros(1, 0, 32)

    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        h = self.emb(tokens)
        if self.growing:
            self.past = torch.cat([self.past[:, :start_pos], h], dim=1)
            ctx = self.past.mean(1, keepdim=True)
        else:
            self.cache[:, start_pos: start_pos + tokens.shape[1]] = h
            ctx = self.cache[:, : start_pos + tokens.shape[1]].mean(1, keepdim=True)
        if self.data_dependent and ctx.abs().sum() > 1e9:  # a branch on a tensor value
            ctx = ctx * 0
        return self.out(h + ctx)


def test_unknown_code_with_a_static_cache_compiles_clean():
    result = optimize(StartPosModel().eval(), backend="aot_eager", diagnose=False)
    assert result.kind == "generic" and result.verified, result.summary()
    assert result.verification.graphs == {"prefill": 1, "decode": 1}  # prefill (length dynamic) and decode


def test_unknown_code_with_a_growing_cache_compiles_once_per_phase_after_warm_up():
    result = optimize(StartPosModel(growing=True).eval(), backend="aot_eager", diagnose_steps=2)
    assert result.before.stats.recompiles > 0  # the diagnosis shows the cache growing
    assert result.kind == "generic" and result.verified, result.summary()
    assert result.verification.recompiles == 0 and result.parity.tokens_match
    assert result.verification.graphs["decode"] <= 2  # one static, then one dynamic graph, both from warm-up


def test_unknown_code_that_cannot_compile_is_refused_and_left_as_it_was():
    model = StartPosModel(data_dependent=True).eval()
    before = dict(model.__dict__)
    tokens = torch.tensor([[1, 2, 3]])
    expected = model(tokens, 0)
    for strict in (False, True):
        with pytest.raises(UnsupportedModelError) as info:
            optimize(model, backend="aot_eager", diagnose=False, strict=strict)
        message = str(info.value)
        assert "\n" not in message and "cannot" in message and "test_optimize_meta.py" in message, message
        assert dict(model.__dict__).keys() == before.keys() and "graphfix_optimized" not in model.__dict__
        assert all(model.__dict__[k] is v for k, v in before.items() if not isinstance(v, (dict, list, set)))
    assert torch.equal(model(tokens, 0), expected)  # the model still works, as it did


def test_meta_forward_runs_on_the_engine(meta):
    """The core behind Meta's forward is the engine's decoder, sharing the model's weights (no copy)."""
    front = meta.model.graphfix_optimized.front
    assert front.decoder is not None and any(n.startswith("Meta forward runs on graphfix's engine") for n in meta.notes)
    fused = front.decoder.layers[0].attention.wqkv.weight
    wq = meta.model.layers[0].attention.wq.weight
    assert wq.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()  # a view of the fused weight


def test_meta_decode_graphs_per_attended_length_give_the_original_tokens():
    """A cache of 256 positions: decode below 64 reads 64 slots (its own graph), later steps the whole cache."""
    prompts = [[5, 17, 99, 3, 42], [7, 8, 9]]
    expected = meta_generate_greedy(build_meta_transformer(0, max_seq_len=256).forward, prompts, max_seq_len=256,
                                    max_gen_len=80)
    prompt = torch.tensor([prompts[0][:3], prompts[1]])
    result = optimize(build_meta_transformer(0, max_seq_len=256), prompt=prompt, backend="aot_eager",
                      diagnose=False, decode_steps=70)
    assert result.verified, result.summary()
    assert result.model.graphfix_optimized.front.buckets == (64,)
    out = meta_generate_greedy(result.model.forward, prompts, max_seq_len=256, max_gen_len=80)
    assert torch.equal(out, expected)
    assert result.model.graphfix_optimized.graphs() == {"prefill": 1, "decode": 1, "decode@64": 1}
