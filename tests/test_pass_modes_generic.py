"""Pass inference-mode on grad-mode constructs anywhere in the step: submodule forwards, methods, helpers.

``inference_mode(True)`` entered inside a compiled region fails under ``aot_eager`` once a view
is updated in place; the pass moves the root forward's site out (the eager wrapper) and turns
every other one into ``no_grad``. ``no_grad``/``enable_grad`` compile as they are and stay.
"""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphfix.diagnose.dispatch_state import compile_failure_contained
from graphfix.rewrite.blocks.source_rewrite import rewritten_source
from graphfix.rewrite.pass_manager import PassContext
from passes.inference_mode import InferenceModePass

CTX = PassContext()
AMBIENTS = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


# ---------------------------------------------------------------------------
# A tiny decoder with inference_mode in a submodule's decorator, a helper's `with` and a decorated helper
# ---------------------------------------------------------------------------


def write_cache(cache: torch.Tensor, value: torch.Tensor, pos: int) -> torch.Tensor:
    with torch.inference_mode():
        cache[:, pos : pos + value.shape[1]] = value  # an in-place update of a view: what fails under aot_eager
    return cache[:, : pos + value.shape[1]]


@torch.inference_mode()
def gated(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """A decorated helper."""
    return F.silu(gate) * x


class CachedAttention(nn.Module):
    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.register_buffer("cache_k", torch.zeros(1, max_len, dim), persistent=False)
        self.register_buffer("cache_v", torch.zeros(1, max_len, dim), persistent=False)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        keys = write_cache(self.cache_k, self.wk(x), pos)
        values = write_cache(self.cache_v, self.wv(x), pos)
        scores = self.wq(x) @ keys.transpose(1, 2) / math.sqrt(x.shape[-1])
        rows = torch.arange(pos, pos + x.shape[1])[:, None]
        scores = scores.masked_fill(torch.arange(keys.shape[1])[None, :] > rows, float("-inf"))
        return self.wo(scores.softmax(-1) @ values)


class Block(nn.Module):
    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = CachedAttention(dim, max_len)
        self.up, self.gate, self.down = nn.Linear(dim, 2 * dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        x = x + self.attn(self.norm(x), pos)
        return x + self.down(gated(self.up(x), self.gate(x)))


class TinyDecoder(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 16, layers: int = 2, max_len: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, max_len) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h, pos)
        return self.head(h)


def decoder(seed: int = 0) -> TinyDecoder:
    torch.manual_seed(seed)
    return TinyDecoder().eval()


def greedy(call, prompt: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Logits of a prefill and ``steps`` greedy decode steps, and the tokens."""
    logits, tokens, pos, ids = [], [], 0, prompt
    for _ in range(steps + 1):
        out = call(ids, pos)
        logits.append(out[:, -1].clone())
        pos += ids.shape[1]
        ids = out[:, -1:].argmax(-1)
        tokens.append(ids)
    return logits, torch.cat(tokens, 1)


def test_the_construct_fails_under_aot_eager_whatever_the_callers_mode():
    model = decoder()
    for ambient in AMBIENTS.values():
        torch._dynamo.reset()
        with pytest.raises(Exception, match="version_counter"), compile_failure_contained(), ambient():
            torch.compile(model, backend="aot_eager", fullgraph=True)(torch.tensor([[1, 2, 3]]), 0)
        # the failed graph had entered inference mode: the thread must not stay in it (graphfix.diagnose.dispatch_state)
        assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()


def test_submodule_helper_and_decorated_helper_sites_become_no_grad():
    ref_model, model = decoder(), decoder()
    result = InferenceModePass().apply(model, CTX)
    assert result.rewritten == 3 and not result.skipped, result  # attention's decorator, write_cache, gated
    assert any("became torch.no_grad()" in n for n in result.notes)
    assert "graphfix_forward_core" not in model.__dict__  # no root site: no wrapper, forward compiles as it is
    source = rewritten_source(model.layers[0].attn)
    assert source.startswith("def forward") and "with _graphfix_no_grad():" in source
    assert "_graphfix_fn_write_cache" in source and "_graphfix_fn_gated" in rewritten_source(model.layers[1])
    assert InferenceModePass().apply(model, CTX).rewritten == 0
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    for name, ambient in AMBIENTS.items():
        ref_model, model = decoder(), decoder()
        InferenceModePass().apply(model, CTX)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        with ambient():
            ref_logits, ref_tokens = greedy(ref_model, prompt, 3)
            logits, tokens = greedy(compiled, prompt, 3)
        scale = max(x.abs().max().item() for x in ref_logits)
        assert torch.equal(tokens, ref_tokens), name
        assert max((a - b).abs().max().item() for a, b in zip(logits, ref_logits)) <= 1e-5 * scale, name


def test_the_helpers_module_functions_are_not_patched():
    model = decoder()
    before = (write_cache, gated, CachedAttention.forward)
    InferenceModePass().apply(model, CTX)
    assert (write_cache, gated, CachedAttention.forward) == before
    assert decoder().layers[0].attn.forward.__func__ is CachedAttention.forward  # other instances untouched


# ---------------------------------------------------------------------------
# What the outputs are: values, requires_grad, inference-ness
# ---------------------------------------------------------------------------


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * 2


class Partial(nn.Module):
    """Sites in a submodule and in part of the root: the outputs are made outside them."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Scaled()
        self.bias = nn.Parameter(torch.full((4,), 0.5))
        self.register_buffer("state", torch.zeros(2, 4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.inner(x)
        with torch.inference_mode():
            self.state[:, :2] = h[:, :2]
            h = h + self.state
        return h + self.bias, x * self.bias


class Covered(nn.Module):
    """The root's own site covers its whole body: the outputs are inference tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Scaled()
        self.register_buffer("state", torch.zeros(2, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Docstring kept."""
        with torch.inference_mode():
            self.state[:, :2] = x[:, :2]
            return self.inner(x) + self.state


def _kind(t: torch.Tensor) -> tuple[bool, bool]:
    return t.requires_grad, t.is_inference()


@pytest.mark.parametrize("cls", [Partial, Covered])
def test_outputs_keep_values_requires_grad_and_inference_ness(cls):
    x = torch.randn(2, 4)
    ambients = {"grad": torch.enable_grad, **AMBIENTS}
    for name, ambient in ambients.items():
        torch.manual_seed(0)
        ref_model = cls()
        torch.manual_seed(0)
        model = cls()
        InferenceModePass().apply(model, CTX)
        with ambient():
            ref, out = ref_model(x), model(x)
        ref, out = (ref, out) if isinstance(ref, tuple) else ((ref,), (out,))
        for a, b in zip(ref, out):
            assert torch.equal(a.detach(), b.detach()), name
            assert _kind(a) == _kind(b), (name, _kind(a), _kind(b))
    if cls is Partial:
        assert ref[0].requires_grad is False and _kind(out[1]) == (False, True)  # under inference_mode: as given
        for ambient in AMBIENTS.values():
            torch._dynamo.reset()
            with ambient():
                ref, compiled = ref_model(x), torch.compile(model, backend="aot_eager", fullgraph=True)(x)
            assert all(torch.equal(a, b) and _kind(a) == _kind(b) for a, b in zip(ref, compiled))
        assert InferenceModePass().apply(model, CTX).rewritten == 0


def test_root_with_block_covering_the_body_moves_into_the_wrapper():
    torch.manual_seed(0)
    ref_model = Covered()
    torch.manual_seed(0)
    model = Covered()
    result = InferenceModePass().apply(model, CTX)
    assert result.rewritten == 2 and not result.skipped  # the root's with, the child's decorator
    assert model.graphfix_inference_mode == "outside" and model.graphfix_inference_mode_enabled is True
    core = rewritten_source(model, "graphfix_forward_core")
    assert "inference_mode" not in core and core.splitlines()[1].strip() == '"""Docstring kept."""'
    x = torch.randn(2, 4)
    ref = ref_model(x)
    for ambient in AMBIENTS.values():
        torch._dynamo.reset()
        with ambient():
            out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
            core_out = torch.compile(model.graphfix_forward_core, backend="aot_eager", fullgraph=True)(x)
        assert out.is_inference() and torch.equal(out, ref) and torch.equal(core_out, ref)
    assert InferenceModePass().apply(model, CTX).rewritten == 0


def test_a_tensor_made_inside_a_converted_site_is_no_longer_an_inference_tensor():
    """The one documented difference: under no_grad the caller gets a normal tensor from inside the old site."""
    torch.manual_seed(0)
    ref_model = Scaled()
    model = Scaled()
    model.load_state_dict(ref_model.state_dict())
    assert InferenceModePass().apply(nn.Sequential(model), CTX).rewritten == 1  # a submodule: no wrapper
    x = torch.randn(2, 4)
    with torch.no_grad():
        ref, out = ref_model(x), model(x)
    assert torch.equal(ref, out) and ref.is_inference() and not out.is_inference() and not out.requires_grad


# ---------------------------------------------------------------------------
# Left alone: what compiles already, what is outside the step, and what cannot be proven equal
# ---------------------------------------------------------------------------


def masked_fill_cache(cache: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        cache[:, :2] = x[:, :2]
    return cache + x


class Rotary(nn.Module):
    """HF's rotary embedding style: a no_grad decorator on forward."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("inv_freq", torch.arange(1, 3, dtype=torch.float32))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = x[..., :2] * self.inv_freq
        return torch.cat((angles.cos(), angles.sin()), -1)


class GradModes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rotary = Rotary()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("cache", torch.zeros(2, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            y = self.lin(x)
        return masked_fill_cache(self.cache, y) + self.rotary(x)

    @torch.inference_mode()
    def generate(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


def test_no_grad_enable_grad_and_generate_are_left_alone_and_compile():
    torch.manual_seed(0)
    model = GradModes()
    x = torch.randn(2, 4)
    result = InferenceModePass().apply(model, CTX)
    assert result.rewritten == 0 and not result.skipped
    notes = " | ".join(result.notes)
    assert "3 no_grad/enable_grad/set_grad_enabled/inference_mode(False) use(s) left in place" in notes
    assert "<root>.generate: @torch.inference_mode() outside the step" in notes
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    for ambient in AMBIENTS.values():
        torch._dynamo.reset()
        with ambient():
            ref = model(x)
            out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
        assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    assert model.generate(x).is_inference()


def custom(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


@torch.inference_mode()
@custom
def wrapped_helper(x: torch.Tensor) -> torch.Tensor:
    return x + 1


ENABLED = True


@torch.inference_mode(ENABLED)
def runtime_mode_helper(x: torch.Tensor) -> torch.Tensor:
    return x * 3


class Unprovable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(self.enabled):
            x = x * 2
        with torch.inference_mode() as mode:
            x = x + float(mode is None)
        manager = torch.inference_mode()
        with manager:
            x = x - 1
        return runtime_mode_helper(wrapped_helper(x))


def test_sites_that_cannot_be_proven_equal_are_reported():
    model = Unprovable()
    result = InferenceModePass().apply(model, CTX)
    assert result.rewritten == 0 and "forward" not in model.__dict__
    reasons = [r for _, r in result.skipped]
    assert len(reasons) == 5, reasons
    line = Unprovable.forward.__code__.co_firstlineno
    assert reasons[0].startswith(f"line {line + 1}:") and "its mode is a runtime value" in reasons[0]
    assert f"line {line + 3}:" in reasons[1] and "`with ... as` binds" in reasons[1]
    assert f"line {line + 5}:" in reasons[2] and "other than as a decorator or `with`" in reasons[2]
    assert any("wrapped_helper is wrapped by a decorator graphfix does not see through" in r for r in reasons[3:])
    [(site, why)] = [s for s in result.skipped if "runtime_mode_helper" in s[1]]
    assert "a decorator's mode is a runtime value" in why and "test_pass_modes_generic.py:" in site
    assert all(site == "<root>" for site, _ in result.skipped[:3])


class EnablesGrad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Scaled()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(True):
            y = self.lin(x)
        return self.inner(y)


def test_a_step_that_switches_grad_on_keeps_its_inference_mode_sites():
    model = EnablesGrad()
    result = InferenceModePass().apply(model, CTX)
    assert result.rewritten == 0
    [(site, reason)] = result.skipped
    assert site == "inner" and "grad is switched on at" in reason and "test_pass_modes_generic.py:" in reason
    assert "forward" not in model.inner.__dict__


def test_the_zoo_research_models_grad_mode_and_collective_constructs_are_gone():
    """tests/zoo/research_style.py: an async all_reduce inside an inference_mode-decorated forward, and a
    mark_dirty collective Function; after functional-collectives and inference-mode only its .item() breaks."""
    from passes.collectives import FunctionalCollectivesPass
    from tests.zoo import load
    from tests.zoo.research_style import PROMPT

    ref_model, loop = load("research")
    model, _ = load("research")
    assert FunctionalCollectivesPass().apply(model, CTX).rewritten == 2  # the Function call, the async all_reduce
    result = InferenceModePass().apply(model, CTX)
    assert result.rewritten == 1 and not result.skipped
    assert "with _graphfix_no_grad():" in rewritten_source(model.layers[0].feed_forward)
    torch._dynamo.reset()
    model.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        breaks = [b.reason.splitlines()[0] for b in torch._dynamo.explain(model)(PROMPT).break_reasons]
    assert len(breaks) == 1 and "item()" in breaks[0], breaks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(loop(model, steps=4), loop(ref_model, steps=4))
