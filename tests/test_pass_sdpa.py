"""Passes sdpa-attention (manual -> SDPA with GQA) and sdpa-context (sdp_kernel -> sdpa_kernel)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphfix.rewrite.blocks.source_rewrite import rewritten_source
from graphfix.rewrite.pass_manager import PassContext
from passes.sdpa import SdpaAttentionPass, SdpaContextPass
from tests.helpers_meta import apply_beside_reference, attention_max_diff, attention_pair, max_decode_diff

CTX = PassContext()


def test_attention_module_alone_prefill_and_decode():
    model, attn, converted = attention_pair()
    converted.attention = "sdpa"
    assert attention_max_diff(model, attn, converted) <= 1e-5


def test_whole_meta_model():
    ref_model, model, result = apply_beside_reference(SdpaAttentionPass(), CTX)
    assert result.rewritten == 2 and not result.skipped
    assert all(layer.attention.attention == "sdpa" for layer in model.layers)
    assert max_decode_diff(ref_model, model, torch.randint(0, 128, (2, 6)), steps=6) <= 1e-5
    assert SdpaAttentionPass().apply(model, CTX).rewritten == 0


def test_other_manual_attention_is_rewritten_too():
    """Outside Meta's class the construct is rewritten in the source (tests/test_pass_sdpa_generic.py has more)."""
    class Manual(nn.Module):
        def forward(self, q, k, v):
            return torch.matmul(torch.softmax(q @ k.transpose(-1, -2), dim=-1), v)

    model, (q, k, v) = Manual(), torch.randn(3, 1, 2, 5, 8).unbind(0)
    ref = model(q, k, v)
    result = SdpaAttentionPass().apply(model, CTX)
    assert result.rewritten == 1 and not result.skipped
    assert "_graphfix_sdpa(q, k, v, scale=1.0)" in rewritten_source(model)
    assert torch.allclose(model(q, k, v), ref, atol=1e-6)


class OldContext(nn.Module):
    def forward(self, q):
        with torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False,
                                            enable_cudnn=False):
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)


class OldContextUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.flash = False

    def forward(self, q):
        with torch.backends.cuda.sdp_kernel(enable_flash=self.flash):
            q = F.scaled_dot_product_attention(q, q, q)
        with torch.backends.cuda.sdp_kernel(False, False, False, False):
            q = q * 2
        with torch.backends.cuda.sdp_kernel() as ctx:
            q = q + (ctx is None)
        return q


def test_sdp_kernel_replaced_with_the_same_backends():
    model = OldContext()
    q = torch.randn(1, 2, 4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = model(q)
        with pytest.raises(torch._dynamo.exc.Unsupported):  # the deprecated manager breaks the graph
            torch.compile(OldContext(), backend="eager", fullgraph=True)(q)
    result = SdpaContextPass().apply(model, CTX)
    assert result.rewritten == 1 and not result.skipped
    assert "_graphfix_sdpa_kernel([_graphfix_SDPBackend.MATH])" in rewritten_source(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated call left
        assert torch.equal(model(q), ref)
        assert torch.equal(torch.compile(model, backend="eager", fullgraph=True)(q), ref)
    assert SdpaContextPass().apply(model, CTX).rewritten == 0


def test_sdp_kernel_that_cannot_be_mapped_is_skipped():
    result = SdpaContextPass().apply(OldContextUnsupported(), CTX)
    reasons = " | ".join(r for _, r in result.skipped)
    assert result.rewritten == 0 and len(result.skipped) == 3
    assert "not a constant" in reasons and "every backend is disabled" in reasons and "binds" in reasons
