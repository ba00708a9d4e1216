"""Pass inference-mode: @torch.inference_mode() on forward -> entered outside the compiled core."""

from __future__ import annotations

import torch
from torch import nn

from graphfix.rewrite.blocks.inference_mode import inference_mode_of
from graphfix.rewrite.blocks.source_rewrite import rewritten_source
from graphfix.rewrite.pass_manager import PassContext
from passes.inference_mode import InferenceModePass
from tests.helpers_meta import apply_passes, build_meta_transformer, max_decode_diff

CTX = PassContext()


class Decorated(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.inner = DecoratedChild()

    @torch.inference_mode()
    def forward(self, x, scale: float = 2.0):
        return self.inner(self.lin(x)) * scale


class DecoratedChild(nn.Module):
    @torch.inference_mode()
    def forward(self, x):
        return x + 1


def test_detection_is_exact():
    assert inference_mode_of(Decorated.forward) is not None
    assert inference_mode_of(torch.no_grad()(lambda x: x)) is None
    assert inference_mode_of(lambda x: x) is None


def test_module_alone():
    model = Decorated()
    x = torch.randn(2, 4)
    ref = model(x, scale=3.0)
    result = InferenceModePass().apply(model, CTX)
    assert result.rewritten == 2 and not result.skipped  # the root's decorator moved out, the child's became no_grad
    assert inference_mode_of(model.graphfix_forward_core) is None  # the core is undecorated
    assert "with _graphfix_no_grad():" in rewritten_source(model.inner)
    out = model(x, scale=3.0)
    assert out.is_inference() and torch.equal(out, ref)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x, scale=3.0)
    assert compiled.is_inference() and torch.equal(compiled, ref)
    again = InferenceModePass().apply(model, CTX)
    assert again.rewritten == 0


def test_optimize_sets_the_compiled_core():
    model = Decorated()
    InferenceModePass().apply(model, CTX)
    calls = []
    model.graphfix_core_fn = lambda *a, **k: calls.append(torch.is_inference_mode_enabled()) or model.graphfix_forward_core(*a, **k)
    model(torch.randn(1, 4))
    assert calls == [True]


def test_whole_meta_model_before_and_after_static_cache():
    ref_model = build_meta_transformer(0)
    prompt = torch.randint(0, 128, (2, 5))
    # inference-mode first: the generic split, then static-kv-cache keeps "outside"
    first = build_meta_transformer(0)
    assert InferenceModePass().apply(first, CTX).rewritten == 1 and first.graphfix_inference_mode == "outside"
    assert max_decode_diff(ref_model, first, prompt, steps=3) == 0.0
    apply_passes(first, ["static-kv-cache"])
    assert first.graphfix_inference_mode == "outside" and "graphfix_forward_core" not in first.__dict__
    # static-kv-cache first: the core still enters inference mode itself until the pass moves it out
    second = build_meta_transformer(0)
    apply_passes(second, ["static-kv-cache"])
    assert second.graphfix_inference_mode == "inside"
    assert InferenceModePass().apply(second, CTX).rewritten == 1 and second.graphfix_inference_mode == "outside"
    assert InferenceModePass().apply(second, CTX).rewritten == 0
    for model in (first, second):
        assert model.forward(prompt, 0).is_inference()
        assert max_decode_diff(ref_model, model, prompt, steps=3) <= 1e-5
