"""Pass static-kv-cache: Meta's attribute caches at an int start_pos -> StaticKVCache at tensor positions."""

from __future__ import annotations

import torch

from graphfix.rewrite.blocks.kv_cache import StaticKVCache
from graphfix.rewrite.blocks.meta_llama import has_tensor_core
from graphfix.rewrite.pass_manager import PassContext
from passes.kv_cache import HF_NOTE, StaticKVCachePass
from tests.fixtures.tiny_hf import tiny_hf
from tests.helpers_meta import (
    apply_beside_reference,
    attention_max_diff,
    attention_pair,
    build_meta_transformer,
    max_decode_diff,
    run_decode,
)

CTX = PassContext()


def test_attention_module_alone_prefill_and_decode():
    model, attn, converted = attention_pair()
    converted.use_static_cache(torch.float32, torch.device("cpu"))
    assert isinstance(converted.kv_cache, StaticKVCache) and not hasattr(converted, "cache_k")
    assert attention_max_diff(model, attn, converted, static_cache=True) <= 1e-5


def test_whole_meta_model():
    ref_model, model, result = apply_beside_reference(StaticKVCachePass(), CTX)
    assert result.rewritten == 2 and not result.skipped
    assert has_tensor_core(model) and model.graphfix_cache_len == 64
    cache = model.layers[0].attention.kv_cache
    assert cache.k_cache.shape == (2, 2, 64, 16)  # (max_batch, kv_heads, max_seq_len, head_dim) from ModelArgs
    # caches are non-persistent: Meta checkpoints still load strictly
    assert set(model.state_dict()) == set(ref_model.state_dict())
    ptr = cache.k_cache.data_ptr()
    assert max_decode_diff(ref_model, model, torch.randint(0, 128, (2, 6)), steps=8) <= 1e-5
    assert cache.k_cache.data_ptr() == ptr
    assert StaticKVCachePass().apply(model, CTX).rewritten == 0


def test_sliding_window_option():
    model = build_meta_transformer(0)
    StaticKVCachePass().apply(model, PassContext(options={"sliding_window": 4}))
    assert model.graphfix_sliding_window == 4
    ref_model = build_meta_transformer(0)
    prompt = torch.randint(0, 128, (1, 3))
    ref, fed = run_decode(ref_model.forward, prompt, 3)
    out, _ = run_decode(model.forward, prompt, 3, fed)
    # positions 0..3 see at most 4 keys: identical to full attention; position 4 and later differ
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(ref[:2], out[:2]))
    assert (ref[2] - out[2]).abs().max() > 1e-3


def test_hf_model_is_left_to_the_runtime():
    result = StaticKVCachePass().apply(tiny_hf("llama"), CTX)
    assert result.rewritten == 0 and result.notes == [HF_NOTE]
