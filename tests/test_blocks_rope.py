"""RoPE building blocks: tables and rotations equal Meta's complex RoPE and Hugging Face's rotate-half."""

from __future__ import annotations

import llama_models.llama3.model as meta_model
import pytest
import torch

from graphfix.rewrite.blocks.rope import (
    RopeScaling,
    apply_rotary_half,
    apply_rotary_interleaved,
    hf_rope_theta,
    rope_tables,
)

HEAD_DIM = 16
END = 128


@pytest.mark.parametrize("use_scaled", [False, True])
def test_interleaved_tables_equal_meta_polar(use_scaled):
    theta = 500000.0
    ref = meta_model.precompute_freqs_cis(HEAD_DIM, END, theta, use_scaled)
    scaling = RopeScaling.from_meta_args(type("A", (), {"use_scaled_rope": use_scaled})())
    cos, sin = rope_tables(HEAD_DIM, END, theta, scaling, layout="interleaved")
    assert cos.shape == (END, HEAD_DIM // 2)
    # torch.polar's cos/sin kernel and torch.cos/sin may differ in the last bit
    assert (cos - ref.real).abs().max() <= 1e-7 and (sin - ref.imag).abs().max() <= 1e-7


@pytest.mark.parametrize("use_scaled", [False, True])
def test_interleaved_rotation_matches_meta_complex(use_scaled):
    torch.manual_seed(0)
    seqlen = 7
    xq = torch.randn(2, seqlen, 4, HEAD_DIM)
    xk = torch.randn(2, seqlen, 2, HEAD_DIM)
    freqs = meta_model.precompute_freqs_cis(HEAD_DIM, END, 500000.0, use_scaled)[5 : 5 + seqlen]
    ref_q, ref_k = meta_model.apply_rotary_emb(xq, xk, freqs)
    scaling = RopeScaling("llama3", 8.0) if use_scaled else None
    cos, sin = rope_tables(HEAD_DIM, END, 500000.0, scaling)
    cos, sin = cos[5 : 5 + seqlen, None, :], sin[5 : 5 + seqlen, None, :]
    assert (apply_rotary_interleaved(xq, cos, sin) - ref_q).abs().max() <= 1e-6
    assert (apply_rotary_interleaved(xk, cos, sin) - ref_k).abs().max() <= 1e-6


def test_interleaved_rotation_keeps_dtype():
    x = torch.randn(1, 3, 2, HEAD_DIM, dtype=torch.bfloat16)
    cos, sin = rope_tables(HEAD_DIM, 3, 10000.0)
    assert apply_rotary_interleaved(x, cos[:, None], sin[:, None]).dtype == torch.bfloat16


def test_linear_scaling_divides_frequencies():
    plain_cos, _ = rope_tables(HEAD_DIM, 16, 10000.0)
    lin_cos, _ = rope_tables(HEAD_DIM, 32, 10000.0, RopeScaling("linear", 2.0))
    # position 2p under linear factor 2 is position p unscaled
    assert torch.allclose(lin_cos[::2], plain_cos, atol=1e-6)


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    ],
    ids=["default", "linear", "llama3"],
)
def test_half_layout_matches_transformers(rope_parameters):
    import transformers
    from transformers.models.llama import modeling_llama as hf

    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, rope_parameters=rope_parameters)
    rotary = hf.LlamaRotaryEmbedding(config)
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, HEAD_DIM)
    k = torch.randn(2, 2, 9, HEAD_DIM)
    position_ids = torch.arange(100, 109)[None].expand(2, -1)
    hf_cos, hf_sin = rotary(q, position_ids)
    ref_q, ref_k = hf.apply_rotary_pos_emb(q, k, hf_cos, hf_sin)

    scaling = RopeScaling.from_hf_config(config)
    assert (scaling is None) == (rope_parameters["rope_type"] == "default")
    cos, sin = rope_tables(HEAD_DIM, 256, hf_rope_theta(config), scaling, layout="half")
    cos, sin = cos[position_ids][:, None], sin[position_ids][:, None]
    assert torch.allclose(cos, hf_cos[:, None], atol=1e-6, rtol=0)
    assert (apply_rotary_half(q, cos, sin) - ref_q).abs().max() <= 1e-6
    assert (apply_rotary_half(k, cos, sin) - ref_k).abs().max() <= 1e-6


def test_unsupported_hf_scaling_is_an_error():
    config = type("C", (), {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}})()
    with pytest.raises(ValueError, match="yarn"):
        RopeScaling.from_hf_config(config)
