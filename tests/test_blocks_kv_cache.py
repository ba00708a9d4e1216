"""StaticKVCache and causal_mask: fixed addresses, tensor positions, one compile for every decode position."""

from __future__ import annotations

import torch
import torch._dynamo.testing

from graphfix.rewrite.blocks.attention import manual_attention, repeat_kv_heads, sdpa
from graphfix.rewrite.blocks.kv_cache import StaticKVCache, causal_mask


def test_update_writes_at_positions_and_keeps_addresses():
    cache = StaticKVCache(2, 16, 2, 4)
    k_ptr, v_ptr = cache.k_cache.data_ptr(), cache.v_cache.data_ptr()
    k = torch.randn(2, 2, 3, 4)
    v = torch.randn(2, 2, 3, 4)
    k_all, _ = cache.update(torch.tensor([5, 6, 7]), k, v)
    assert k_all.shape == (2, 2, 16, 4)
    assert torch.equal(cache.k_cache[:, :, 5:8], k) and torch.equal(cache.v_cache[:, :, 5:8], v)
    assert cache.k_cache[:, :, :5].abs().sum() == 0
    assert (cache.k_cache.data_ptr(), cache.v_cache.data_ptr()) == (k_ptr, v_ptr)
    # a smaller batch writes the first rows only
    cache.update(torch.tensor([8]), torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))
    assert cache.k_cache[0, :, 8].eq(1).all() and cache.k_cache[1, :, 8].eq(0).all()
    assert "k_cache" not in cache.state_dict()
    cache.reset()
    assert cache.k_cache.abs().sum() == 0 and cache.k_cache.data_ptr() == k_ptr


def test_causal_mask_and_sliding_window():
    pos = torch.tensor([3, 4])
    assert causal_mask(pos, 6).tolist() == [[True] * 4 + [False] * 2, [True] * 5 + [False]]
    assert causal_mask(pos, 6, sliding_window=2).tolist() == [
        [False, False, True, True, False, False],
        [False, False, False, True, True, False],
    ]


def test_sdpa_and_manual_attention_agree_with_gqa_and_mask():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 3, 8)
    k = torch.randn(2, 2, 10, 8)
    v = torch.randn(2, 2, 10, 8)
    mask = causal_mask(torch.tensor([4, 5, 6]), 10)
    a = sdpa(q, k, v, mask)
    b = manual_attention(q, k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv_heads(k, 2), repeat_kv_heads(v, 2), mask)
    assert (a - b).abs().max() <= 1e-5 and (a - ref).abs().max() <= 1e-6


def test_decode_step_compiles_once_for_all_positions():
    cache = StaticKVCache(1, 32, 2, 8)

    def step(q, k, v, input_pos):
        keys, values = cache.update(input_pos, k, v)
        return sdpa(q, keys, values, causal_mask(input_pos, 32, sliding_window=8))

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for pos in range(12):
        q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
        input_pos = torch.tensor([pos])
        with torch.compiler.set_stance("fail_on_recompile" if pos > 0 else "default"):
            out = compiled(q, k, v, input_pos)
        ref_k, ref_v = cache.k_cache[:, :, : pos + 1], cache.v_cache[:, :, : pos + 1]
        lo = max(0, pos - 7)
        ref = sdpa(q, ref_k[:, :, lo:], ref_v[:, :, lo:])
        assert (out - ref).abs().max() <= 1e-5
    assert counter.frame_count == 1
