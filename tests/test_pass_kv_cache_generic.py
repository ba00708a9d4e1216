"""Pass static-kv-cache on growing caches in any module: torch.cat onto self.A -> a preallocated cache.

Research-style attention modules (tests/fixtures/growing_cache.py) keep their caches on the
module and grow them with torch.cat. After the pass, the same calls give the same logits, a
reset and a second prompt still match, and decode compiles once for every position.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch._dynamo.testing

from graphfix.rewrite.blocks import source_rewrite as sr
from graphfix.rewrite.blocks.kv_cache import PreallocatedCache, attend_written
from graphfix.rewrite.pass_manager import PassContext
from passes import _cache_views as cv
from passes.kv_cache import StaticKVCachePass
from tests.fixtures import growing_cache as gc

VOCAB = 96
GROWING = [gc.NoneCatAttention, gc.EmptyCatAttention, gc.SeqFirstAttention, gc.HelperAttention,
           gc.RepeatKvAttention]


def _ctx(*example, **kwargs) -> PassContext:
    options = {"example_inputs": example} if example else {}
    return PassContext(max_seq_len=32, max_batch_size=2, options=options, **kwargs)


def _rewritten(cls, seed: int = 0):
    ref, model = gc.tiny_lm(cls, seed), gc.tiny_lm(cls, seed)
    extra = (0,) if cls is gc.StartPosAttention else ()
    result = StaticKVCachePass().apply(model, _ctx(torch.zeros(2, 3, dtype=torch.long), *extra))
    return ref, model, result


def _generate(ref, model, prompt: torch.Tensor, steps: int, start_pos: bool = False,
              stance_after: int | None = None) -> tuple[float, bool]:
    """Greedy decoding of ``ref``; ``model`` gets the same tokens. Largest logit gap (relative), same tokens."""
    extra = (lambda p: (p,)) if start_pos else (lambda p: ())
    with torch.no_grad():
        want, got = ref(prompt, *extra(0)), model(prompt, *extra(0))
        scale = want.abs().max()
        gap, same_tokens, pos = (want - got).abs().max() / scale, True, prompt.shape[1]
        for step in range(steps):
            token = want[:, -1:].argmax(-1)
            same_tokens &= bool(torch.equal(token, got[:, -1:].argmax(-1)))
            stance = "fail_on_recompile" if stance_after is not None and step >= stance_after else "default"
            with torch.compiler.set_stance(stance):
                got = model(token, *extra(pos))
            want = ref(token, *extra(pos))
            gap, pos = max(gap, (want - got).abs().max() / scale), pos + 1
    return float(gap), same_tokens


@pytest.mark.parametrize("cls", [*GROWING, gc.StartPosAttention])
def test_parity_over_prefill_decode_reset_and_second_prompt(cls):
    ref, model, result = _rewritten(cls)
    assert result.rewritten >= 3 and not result.skipped, result.skipped  # two writes and the attention, at least
    attention = model.layers[0].attention
    slots = [m for m in attention.children() if isinstance(m, PreallocatedCache)]
    assert len(slots) == 2 and all(s.length.item() == 0 for s in slots)  # the probe left nothing behind
    start_pos = cls is gc.StartPosAttention
    torch.manual_seed(1)
    gap, same = _generate(ref, model, torch.randint(0, VOCAB, (2, 5)), 9, start_pos)
    assert gap <= 1e-5 and same
    assert all(s.length.item() == 14 for s in slots)
    if not start_pos:  # start_pos == 0 is the reset of the start_pos style
        ref.reset()
        model.reset()
        assert all(s.length.item() == 0 for s in slots)
    gap, same = _generate(ref, model, torch.randint(0, VOCAB, (2, 3)), 8, start_pos)
    assert gap <= 1e-5 and same


@pytest.mark.parametrize("cls", GROWING)
def test_decode_compiles_once_for_all_positions(cls):
    torch._dynamo.reset()
    ref, model, _ = _rewritten(cls)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    slot = model.layers[0].attention.get_submodule(next(n for n, m in model.layers[0].attention.named_children()
                                                         if isinstance(m, PreallocatedCache)))
    address = slot.buffer.data_ptr()
    torch.manual_seed(2)
    gap, same = _generate(ref, compiled, torch.randint(0, VOCAB, (2, 4)), 9, stance_after=1)
    assert gap <= 1e-5 and same
    assert counter.frame_count == 2  # the prefill and one decode graph for positions 4..12
    assert slot.buffer.data_ptr() == address


@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_over_the_buffer_equals_sdpa_over_the_written_prefix(is_causal):
    """Also for a 3-token call into a cache that already holds 4 (SDPA's is_causal is top-left aligned)."""
    torch.manual_seed(3)
    cache_k, cache_v = PreallocatedCache((2, 2, 16, 8), 2), PreallocatedCache((2, 2, 16, 8), 2)
    for chunk in (4, 3):
        k, v = torch.randn(2, 2, chunk, 8), torch.randn(2, 2, chunk, 8)
        cache_k.append(k)
        cache_v.append(v)
    q = torch.randn(2, 4, 3, 8)
    got = attend_written(cache_k.length, q, cache_k.buffer, cache_v.buffer, is_causal=is_causal, enable_gqa=True)
    want = torch.nn.functional.scaled_dot_product_attention(q, cache_k.buffer[:, :, :7], cache_v.buffer[:, :, :7],
                                                            is_causal=is_causal, enable_gqa=True)
    assert (got - want).abs().max() <= 1e-6
    cache_k.reset(torch.tensor(False))
    assert cache_k.seq_len() == 7 and not cache_k.is_empty()
    cache_k.reset()
    assert cache_k.is_empty() and cache_k.buffer.abs().sum() > 0  # forgotten, not zeroed


def test_shape_steps_keep_batch_and_sequence_or_are_refused():
    seq_first = cv.View.of_cache("k", seq_dim=1)  # (b, s, h, d)
    b, s, h, d = seq_first.sizes
    grown = cv.expanded(cv.unsqueezed(seq_first, 3), [[b], [s], [h], ["n_rep"], [d]])
    merged = cv.reshaped(grown, [[b], [s], [h, "n_rep"], [d]])
    assert cv.transposed(merged, 1, 2).sdpa_ready  # Meta's repeat_kv, then (b, heads, s, d)
    assert cv.reshaped(grown, [[b], [s], None, [d]]).sizes == merged.sizes
    assert cv.reshaped(seq_first, [[b], None, [d]]) is None  # s merged with the heads
    assert cv.reshaped(seq_first, [[b], [s], ["other"], [d]]) is None  # a size it cannot trace
    assert cv.expanded(seq_first, [[b], ["T"], [h], [d]]) is None  # the sequence dim resized
    assert cv.repeated(seq_first, 1, "n") is None and cv.repeated(seq_first, 2, "n") is not None
    assert cv.joined([merged, seq_first], "f") is not None
    assert cv.joined([merged, cv.transposed(merged, 1, 2)], "f") is None


def test_rewritten_source_reads_as_the_construct():
    _, model, _ = _rewritten(gc.NoneCatAttention)
    source = sr.rewritten_source(model.layers[0].attention)
    assert "torch.cat" not in source and "is None" not in source
    assert "self.cache_k.append(k)" in source and "self.cache_v.append(v, restart=" in source
    assert "pos = self.cache_k.seq_len()" in source and "_graphfix_take_positions(self.cos, 0, pos, seqlen)" in source
    assert "_graphfix_attend_written(self.cache_k.length, q, self.cache_k.buffer" in source
    assert sr.rewritten_source(model.layers[0].attention, "reset_cache").count(".reset()") == 2


def test_helpers_get_rewritten_copies_and_stay_unchanged():
    _, model, _ = _rewritten(gc.HelperAttention)
    source = sr.rewritten_source(model.layers[0].attention)
    assert "_graphfix_fn_attend_" in source and "_graphfix_length_k=self.cache_k.length" in source
    assert "_graphfix_fn_table_rows_" in source
    assert gc.attend.__code__.co_kwonlyargcount == 0  # the module's helper is not patched


def test_state_dict_keys_unchanged_and_idempotent():
    ref, model, _ = _rewritten(gc.EmptyCatAttention)
    assert set(model.state_dict()) == set(ref.state_dict())
    model.load_state_dict(ref.state_dict(), strict=True)
    again = StaticKVCachePass().apply(model, _ctx(torch.zeros(2, 3, dtype=torch.long)))
    assert again.rewritten == 0 and not again.skipped
    assert any("already preallocated" in n for n in again.notes)


def test_cache_content_at_pass_time_is_kept_without_a_probe():
    ref, model = gc.tiny_lm(gc.NoneCatAttention), gc.tiny_lm(gc.NoneCatAttention)
    prompt = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        ref(prompt)
        model(prompt)
    result = StaticKVCachePass().apply(model, _ctx())  # shapes from what the caches hold
    assert result.rewritten and not result.skipped
    assert model.layers[1].attention.cache_v.length.item() == 6
    gap, same = _generate(ref, model, torch.randint(0, VOCAB, (1, 1)), 4)
    assert gap <= 1e-5 and same


def test_none_cache_without_example_is_reported_and_left_alone():
    model = gc.tiny_lm(gc.NoneCatAttention)
    result = StaticKVCachePass().apply(model, _ctx())
    assert result.rewritten == 0
    assert any("self.cache_k is None" in reason and "example_inputs" in reason for _, reason in result.skipped)
    assert model.layers[0].attention.cache_k is None and sr.rewritten_source(model.layers[0].attention) is None


def _left_alone(model, ctx) -> list[tuple[str, str]]:
    before = {n: type(m) for n, m in model.named_modules()}
    result = StaticKVCachePass().apply(model, ctx)
    assert result.rewritten == 0
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert all(sr.rewritten_source(m) is None for m in model.modules())
    return result.skipped


def test_explicit_mask_is_widened_over_the_buffer():
    """The caller's mask over the grown cache (bool or additive, full or broadcast keys) keeps its meaning."""
    torch.manual_seed(4)
    ref = gc.MaskedConsumerAttention(32, 4, 2, 64)
    model = gc.MaskedConsumerAttention(32, 4, 2, 64)
    model.load_state_dict(ref.state_dict())
    result = StaticKVCachePass().apply(model, _ctx(torch.zeros(2, 3, 32), torch.ones(3, 3, dtype=torch.bool)))
    assert result.rewritten and not result.skipped
    prompt = torch.randn(2, 5, 32)
    masks = [torch.ones(5, 5, dtype=torch.bool).tril(), None, torch.rand(1, 7) > 0.3, torch.ones(1, 1, dtype=torch.bool),
             torch.randn(2, 1, 1, 9), torch.zeros(1, 1)]
    with torch.no_grad():
        gaps = [(ref(prompt, masks[0]) - model(prompt, masks[0])).abs().max()]
        for mask in masks[1:]:
            x = torch.randn(2, 1, 32)
            gaps.append((ref(x, mask) - model(x, mask)).abs().max())
    assert max(gaps) <= 1e-5, gaps


def test_window_consumer_is_skipped():
    attention = gc.WindowConsumerAttention(32, 4, 2, 64)
    skipped = _left_alone(attention, _ctx(torch.zeros(1, 3, 32)))
    assert len(skipped) == 2 and all("growing_cache.py:" in r for _, r in skipped)
    lines, start = inspect.getsourcelines(gc.WindowConsumerAttention.forward)
    line = start + next(i for i, text in enumerate(lines) if "[:, :, -4:]" in text)
    assert f"growing_cache.py:{line}: `self.cache_k` uses the cache self.cache_k other than as the key/value" \
        in skipped[0][1]
    assert attention.cache_k is None


def test_manual_attention_consumer_is_skipped():
    skipped = _left_alone(gc.tiny_lm(gc.ManualConsumerAttention), _ctx(torch.zeros(1, 3, dtype=torch.long)))
    assert skipped and all(site == "layers.*.attention" for site, _ in skipped)
    assert any("self.cache_k other than as the key/value of F.scaled_dot_product_attention" in r for _, r in skipped)


def test_caller_owned_tuple_cache_is_reported():
    skipped = _left_alone(gc.tiny_lm(gc.TupleCacheAttention), _ctx())
    assert len(skipped) == 1
    site, reason = skipped[0]
    assert site == "layers.*.attention" and reason.startswith("caller-owned cache: `past_key_value_state`")
    assert "compiled with a dynamic cache length instead" in reason


class _LayerPastAttention(gc._Projections):
    """GPT-2 style: the past comes in as ``layer_past`` and is unpacked before it grows."""

    def forward(self, x: torch.Tensor, layer_past: tuple | None = None):
        q, k, v = self.heads_first(x)
        if layer_past is not None:
            past_key, past_value = layer_past
            k, v = torch.cat((past_key, k), dim=-2), torch.cat((past_value, v), dim=-2)
        return self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)), (k, v)


class _CacheObjectAttention(gc._Projections):
    """A cache object handed in whose ``update(k, v, layer)`` returns everything so far (HF ``Cache`` API)."""

    def forward(self, x: torch.Tensor, past_key_values=None):
        q, k, v = self.heads_first(x)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, 0)
        return self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))


@pytest.mark.parametrize("cls, argument, how", [(_LayerPastAttention, "layer_past", "grown by torch.cat"),
                                                (_CacheObjectAttention, "past_key_values", "updated")])
def test_other_caller_owned_caches_are_reported(cls, argument, how):
    skipped = _left_alone(cls(32, 4, 2, 64), _ctx())
    assert len(skipped) == 1 and skipped[0][1].startswith(f"caller-owned cache: `{argument}` is passed in and {how}")


class _ListCacheAttention(gc._Projections):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.keys, self.values = [], []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads_first(x)
        self.keys.append(k)
        self.values.append(v)
        keys, values = torch.cat(self.keys, dim=2), torch.cat(self.values, dim=2)
        return self.out(torch.nn.functional.scaled_dot_product_attention(q, keys, values, enable_gqa=True))


def test_list_cache_is_reported():
    skipped = _left_alone(_ListCacheAttention(32, 4, 2, 64), _ctx())
    assert [r.split(": ", 1)[1][:40] for _, r in skipped] == ["self.keys is a list cache (appended to a",
                                                             "self.values is a list cache (appended to"]


class _ViewBeforeWrite(gc.NoneCatAttention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads_first(x)
        old_k, old_v = self.cache_k, self.cache_v
        self.cache_k = torch.cat([self.cache_k, k], dim=2)
        self.cache_v = torch.cat([self.cache_v, v], dim=2)
        return self.out(torch.nn.functional.scaled_dot_product_attention(q, old_k, old_v, enable_gqa=True))


def test_view_taken_before_a_write_is_skipped():
    attention = _ViewBeforeWrite(32, 4, 2, 64)
    attention.cache_k, attention.cache_v = torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8)
    skipped = _left_alone(attention, _ctx())
    assert any("`old_k` holds the cache as it was before a later write" in r for _, r in skipped)


class _RootReadsLayerCache(gc.TinyLM):
    """Positions from layer 0's cache, read by the root: another module's attribute."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        first = self.layers[0].attention
        _ = 0 if first.cache_k is None else first.cache_k.shape[2]
        return super().forward(tokens)


def test_cache_reached_from_another_module_is_skipped():
    torch.manual_seed(0)
    model = _RootReadsLayerCache(gc.NoneCatAttention).eval()
    skipped = _left_alone(model, _ctx(torch.zeros(1, 3, dtype=torch.long)))
    assert any("`first.cache_k` reaches the cache of another module" in r for _, r in skipped)


def test_after_sdpa_attention_on_the_zoo_research_model():
    """Manual einsum attention over the growing cache: sdpa-attention makes it SDPA (repeat_kv kept, the mask as
    attn_mask), then the cache becomes static; the research model's own loop gives the same tokens."""
    from passes.sdpa import SdpaAttentionPass
    from tests.zoo import research_style

    ref, model = research_style.build(), research_style.build()
    ctx = PassContext(max_seq_len=64, options={"example_inputs": (research_style.PROMPT,)})
    assert SdpaAttentionPass().apply(model, ctx).rewritten == 1
    before = model.pos
    result = StaticKVCachePass().apply(model, ctx)
    assert result.rewritten and not result.skipped, result.skipped
    assert model.pos == before and model.layers[0].attention.cache_k.seq_len() == 0  # the probe left no trace
    assert "_graphfix_fn_repeat_kv_" in sr.rewritten_source(model.layers[0].attention)
    with pytest.warns(UserWarning):
        assert torch.equal(research_style.loop(ref, 10), research_style.loop(model, 10))
