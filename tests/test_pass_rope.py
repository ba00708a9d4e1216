"""Pass real-rope: Meta's complex RoPE -> real cos/sin tables (interleaved layout, model's scaling)."""

from __future__ import annotations

import llama_models.llama3.model as meta_model
import pytest
import torch

from graphfix.rewrite.pass_manager import PassContext
from passes.rope import RealRopePass
from tests.helpers_meta import (
    apply_beside_reference,
    attention_max_diff,
    attention_pair,
    build_meta_transformer,
    max_decode_diff,
)

CTX = PassContext()


def test_attention_module_alone():
    model, attn, converted = attention_pair()
    converted.rope = "interleaved"
    assert converted.wq is attn.wq
    assert attention_max_diff(model, attn, converted, real_freqs=True) <= 1e-6


@pytest.mark.parametrize("use_scaled_rope", [True, False])
def test_whole_meta_model(use_scaled_rope):
    ref_model, model, result = apply_beside_reference(RealRopePass(), CTX, use_scaled_rope=use_scaled_rope)
    assert result.rewritten == 2 and not result.skipped
    assert not model.freqs_cis.is_complex() and model.freqs_cis.shape == (128, 8, 2)
    assert all(layer.attention.rope == "interleaved" for layer in model.layers)
    assert max_decode_diff(ref_model, model, torch.randint(0, 128, (2, 6)), steps=6) <= 1e-5
    again = RealRopePass().apply(model, CTX)
    assert again.rewritten == 0 and again.notes


def test_table_not_matching_args_is_skipped():
    model = build_meta_transformer(0)
    model.freqs_cis = meta_model.precompute_freqs_cis(16, 128, 10000.0, False)  # not the args' theta
    result = RealRopePass().apply(model, CTX)
    assert result.rewritten == 0 and "does not match ModelArgs" in result.skipped[0][1]
    assert model.freqs_cis.is_complex() and meta_model.Attention is type(model.layers[0].attention)


def test_other_complex_rope_is_rewritten_by_construct():
    """Outside Meta's Transformer the construct is rewritten (tests/test_pass_rope_generic.py has the rest)."""

    class ComplexRope(torch.nn.Module):
        def forward(self, x):
            return torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)) * 1j).flatten(-2)

    model, x = ComplexRope(), torch.randn(2, 3, 8)
    expected = model(x)
    result = RealRopePass().apply(model, CTX)
    assert result.rewritten == 3 and not result.skipped
    assert torch.equal(model(x), expected)
