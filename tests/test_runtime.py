"""The generation engine (graphfix.engine) on tiny models, CPU, float32.

The engine's greedy tokens equal Hugging Face ``generate(do_sample=False)`` (each row
against HF on that row alone, also for left-padded batches of different lengths),
for Llama (llama3 RoPE scaling), Qwen2 (q/k/v biases) and Mistral (sliding window);
prefill buckets and chunks, decode length buckets, EOS, streaming, cache reuse and
zero recompiles after warmup; parameters are moved, not copied; Meta models through
the ``graphfix_step`` adapter and through ``from_meta``.

Compiled runs use the ``aot_eager`` backend (the engine's graphs, without Inductor's
code generation, to stay fast on CPU); one slow test adds a run
with Inductor (about a minute on two cores).
"""

from __future__ import annotations

import pytest
import torch

from graphfix.engine import Generator, MetaStepModel, SamplingParams, from_hf, from_meta
from graphfix.engine.llama import LlamaDecoder
from graphfix.errors import InputError
from tests.fixtures.tiny_hf import tiny_hf as fixtures_tiny_hf

PROMPTS = [[5, 7, 9, 11, 13], [3, 4, 100, 22, 9, 8, 1, 17, 44]]
NEW = 10


def tiny_hf(kind: str = "llama", seed: int = 0, **overrides):
    """``tests.fixtures.tiny_hf`` with llama3 RoPE scaling for ``llama`` and large weights."""
    if kind == "llama":
        overrides.setdefault("rope_parameters", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 32})
    model = fixtures_tiny_hf(kind, seed, **overrides)
    with torch.no_grad():  # large weights: well separated logits, so greedy tokens are stable across kernels
        for p in model.parameters():
            p.normal_(0, 0.5) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


def hf_greedy(model, prompt: list[int], new: int = NEW) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def llama():
    model = tiny_hf("llama")
    refs = [hf_greedy(model, p) for p in PROMPTS]
    return model, refs


@pytest.fixture(scope="module")
def compiled(llama):
    """A decoder sharing the HF model's weights and an aot_eager generator warmed for batch 1 and 2."""
    model, refs = llama
    dec = from_hf(model, max_batch_size=2, max_seq_len=64, share=True)
    gen = Generator(dec, backend="aot_eager")
    gen.warmup(batch_sizes=(1, 2), modes=("greedy", "filtered"))
    return gen, refs


def test_from_hf_moves_parameters_and_leaves_a_meta_shell():
    model = tiny_hf("llama")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    q, down, emb = attn.q_proj.weight, mlp.down_proj.weight, model.model.embed_tokens.weight
    dec = from_hf(model, max_batch_size=1, max_seq_len=32, fuse=False)
    assert dec.layers[0].attention.wq.weight is q and dec.layers[0].feed_forward.w2.weight is down
    assert dec.tok_embeddings.weight is emb
    assert all(p.is_meta for p in model.parameters()), "the HF model must not keep the moved weights"
    assert dec.max_seq_len == 64 and dec.layers[0].attention.kv_cache.k_cache.shape == (1, 2, 64, 16)


def test_fused_share_keeps_hf_working_on_the_same_storage(llama):
    model, _ = llama
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        before = model(ids).logits
        dec = from_hf(model, max_batch_size=1, max_seq_len=32, fuse=True, share=True)
        after = model(ids).logits
        mine = dec.step(ids, torch.arange(ids.shape[1])[None])
    wqkv = dec.layers[0].attention.wqkv.weight
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.untyped_storage().data_ptr() == wqkv.untyped_storage().data_ptr()
    assert torch.equal(before, after)
    assert (mine - before).abs().max() < 1e-4


def test_greedy_equals_hf_eager_engine(llama):
    model, refs = llama
    gen = Generator(from_hf(model, max_batch_size=2, max_seq_len=64, share=True), compile=False)
    assert gen.generate(PROMPTS, NEW).tokens == refs
    assert gen.generate(PROMPTS[1:], NEW).tokens == refs[1:]


def test_compiled_greedy_equals_hf_and_never_recompiles(compiled):
    gen, refs = compiled
    left_padded = torch.tensor([[0] * 4 + PROMPTS[0], PROMPTS[1]])
    mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    with torch.compiler.set_stance("fail_on_recompile"):
        assert gen.generate(PROMPTS, NEW).tokens == refs
        assert gen.generate(PROMPTS[:1], NEW).tokens == refs[:1]
        assert gen.generate(left_padded, NEW, attention_mask=mask).tokens == refs  # HF-style left padding
        assert gen.generate([PROMPTS[1] * 3], 4).tokens[0]  # another prompt length: dynamic prefill
        filtered = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=1)
        first = gen.generate(PROMPTS, NEW, sampling=filtered).tokens
        assert first == gen.generate(PROMPTS, NEW, sampling=filtered).tokens


def test_cache_is_reused_across_requests_without_reallocation(compiled):
    gen, refs = compiled
    cache = gen.model.layers[0].attention.kv_cache
    ptrs = (cache.k_cache.data_ptr(), cache.v_cache.data_ptr())
    first = gen.generate(PROMPTS, NEW).tokens
    gen.generate([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]], 12)  # dirties more slots
    second = gen.generate(PROMPTS, NEW).tokens
    assert first == second == refs
    assert (cache.k_cache.data_ptr(), cache.v_cache.data_ptr()) == ptrs


def test_eos_stops_one_row_while_the_other_continues(compiled):
    gen, refs = compiled
    eos = next(t for t in refs[0][2:] if t not in refs[1])
    stop = refs[0].index(eos)
    gen.check_interval = 2
    try:
        res = gen.generate(PROMPTS, NEW, eos_token_id=[eos])
    finally:
        gen.check_interval = 16
    assert res.tokens[0] == refs[0][: stop + 1]
    assert res.tokens[1] == refs[1] and res.finished == [True, False]


def test_stream_gets_every_token_in_order(compiled):
    gen, refs = compiled
    chunks = []
    res = gen.generate(PROMPTS, NEW, stream=chunks.append, stream_interval=3)
    assert [c.start for c in chunks] == [0, 3, 6, 9]
    streamed = torch.cat([c.tokens for c in chunks], dim=1).tolist()
    assert streamed == res.tokens == refs


def test_prefill_buckets_and_chunks(llama):
    model, refs = llama
    long_prompt = list(range(1, 21))  # 20 tokens: chunks of 16 + 8 with buckets (8, 16)
    ref_long = hf_greedy(model, long_prompt, 6)
    gen = Generator(from_hf(model, max_batch_size=2, max_seq_len=64, share=True), backend="aot_eager",
                    prefill="buckets", buckets=(8, 16))
    gen.warmup(batch_sizes=(2,))
    with torch.compiler.set_stance("fail_on_recompile"):
        assert gen.generate(PROMPTS, NEW).tokens == refs
        assert gen.generate([long_prompt, PROMPTS[0]], 6).tokens == [ref_long, refs[0][:6]]


def test_decode_length_buckets_cross_a_boundary(llama):
    model, _ = llama
    prompt = list(range(30, 42))  # 12 tokens + 10 new: decode crosses the 16-slot bucket
    ref = hf_greedy(model, prompt)
    gen = Generator(from_hf(model, max_batch_size=1, max_seq_len=64, share=True), compile=False, kv_buckets=(16, 32))
    assert gen.kv_buckets == [16, 32, 64]
    assert gen.generate([prompt], NEW).tokens == [ref]
    assert {k[3] for k in gen._fns if k[0] == "decode"} == {16, 32}


@pytest.mark.parametrize("kind,overrides", [("qwen2", {}), ("mistral", {"sliding_window": 4})])
def test_other_architectures_equal_hf(kind, overrides):
    model = tiny_hf(kind, **overrides)
    refs = [hf_greedy(model, p) for p in PROMPTS]
    dec = from_hf(model, max_batch_size=2, max_seq_len=64)
    if kind == "mistral":
        assert dec.layers[0].attention.window == 4
    assert Generator(dec, compile=False).generate(PROMPTS, NEW).tokens == refs


def test_sampling_seed_repeats_and_top_k1_is_greedy(llama):
    model, refs = llama
    gen = Generator(from_hf(model, max_batch_size=2, max_seq_len=64, share=True), compile=False)
    a = gen.generate(PROMPTS, NEW, sampling=SamplingParams(temperature=1.0, seed=7)).tokens
    b = gen.generate(PROMPTS, NEW, sampling=SamplingParams(temperature=1.0, seed=7)).tokens
    c = gen.generate(PROMPTS, NEW, sampling=SamplingParams(temperature=1.0, seed=8)).tokens
    assert a == b and a != c
    assert gen.generate(PROMPTS, NEW, sampling=SamplingParams(temperature=1.0, top_k=1, seed=3)).tokens == refs


def test_request_errors_are_one_line_input_errors(llama):
    model, _ = llama
    gen = Generator(from_hf(model, max_batch_size=1, max_seq_len=16, share=True), compile=False)
    with pytest.raises(InputError, match="exceeds the cache length"):
        gen.generate([list(range(60))], 8)
    with pytest.raises(InputError, match="cache holds 1 rows"):
        gen.generate(PROMPTS, 4)
    with pytest.raises(InputError, match="at least one token"):
        gen.generate([[]], 4)


def _meta_pair():
    from tests.helpers_meta import apply_passes, build_meta_transformer

    original = build_meta_transformer(0)
    rewritten = build_meta_transformer(0)
    apply_passes(rewritten)
    return original, rewritten


def test_meta_adapter_and_from_meta_equal_metas_greedy_loop():
    from tests.helpers_meta import meta_generate_greedy

    original, rewritten = _meta_pair()
    prompts = [[5, 9, 17, 3], [8, 1, 44, 23, 12, 90, 7]]
    expected = []
    for p in prompts:  # Meta's own loop, one row at a time
        toks = meta_generate_greedy(original.forward, [p], max_seq_len=64, max_gen_len=8)
        expected.append(toks[0, len(p):len(p) + 8].tolist())
    adapter = MetaStepModel(rewritten)
    assert Generator(adapter, compile=False).generate(prompts[:1], 8).tokens == expected[:1]
    with pytest.raises(InputError, match="equal lengths"):
        Generator(adapter, compile=False).generate(prompts, 8)
    wq = rewritten.layers[0].attention.wq.weight
    dec = from_meta(rewritten, fuse=False)
    assert isinstance(dec, LlamaDecoder) and dec.layers[0].attention.wq.weight is wq
    assert dec.config.rope_layout == "interleaved" and dec.config.rope_scaling is not None
    assert Generator(dec, compile=False).generate(prompts, 8).tokens == expected


@pytest.mark.slow
def test_inductor_on_cpu_equals_hf(llama):
    model, refs = llama
    gen = Generator(from_hf(model, max_batch_size=2, max_seq_len=64, share=True), backend="inductor")
    gen.warmup(batch_sizes=(2,))
    with torch.compiler.set_stance("fail_on_recompile"):
        assert gen.generate(PROMPTS, NEW).tokens == refs
