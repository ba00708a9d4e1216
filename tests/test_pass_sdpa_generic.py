"""Pass sdpa-attention on manual attention anywhere: module methods and helper functions -> one SDPA call."""

from __future__ import annotations

import ast
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.backends.registry import lookup_backend

from graphfix.rewrite import reachable
from graphfix.rewrite.blocks import source_rewrite as sr
from graphfix.rewrite.pass_manager import PassContext
from passes.sdpa import SdpaAttentionPass, SdpaContextPass
from tests.fixtures import manual_attention as ma

CTX = PassContext()
REWRITTEN = [ma.NanoGPTAttention, ma.LlamaAttention, ma.EinsumAttention, ma.DropoutAttention,
             ma.QueryScaledAttention, ma.BmmAttention]
UNFUSED = {torch.softmax, F.softmax, torch.matmul, torch.bmm, torch.einsum, "softmax", "matmul", "bmm"}


def _pair(cls: type[nn.Module], seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    model = ma.Block(cls()).eval()
    return copy.deepcopy(model), model


def _prefill_and_decode(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """A causal prefill of 6 positions, then one decode step against the 7 keys it leaves."""
    gen = torch.Generator().manual_seed(1)
    prompt, step = (torch.randn(2, n, ma.DIM, generator=gen).to(dtype) for n in (6, 1))
    prefill, cache = model(prompt)
    decode, _ = model(step, cache)
    return [prefill, decode]


def _assert_same(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> None:
    for want, got in zip(expected, actual, strict=True):
        assert (want - got).abs().max().item() <= 1e-5 * want.abs().max().item()


def _sdpa_sites(model: nn.Module) -> list[tuple[object, ast.Call]]:
    """Every call in the code the model runs that resolves to F.scaled_dot_product_attention (the contract)."""
    sites = []
    for fn, _, _ in reachable.reachable_functions(model):
        try:
            tree = sr.function_tree(fn)
        except sr.Unrewritable:
            continue
        sites += [(fn, n) for n in ast.walk(tree) if sr.is_call_to(fn, n, F.scaled_dot_product_attention)]
    return sites


def _unfused_calls(fn, tree: ast.FunctionDef) -> list[str]:
    """Softmax, matmul, bmm or einsum calls and ``@`` left in a rewritten function."""
    return [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call) and (
        sr.resolve(fn, n.func) in UNFUSED or (isinstance(n.func, ast.Attribute) and n.func.attr in UNFUSED))
        or isinstance(n, ast.BinOp) and isinstance(n.op, ast.MatMult)]


@pytest.mark.parametrize("cls", REWRITTEN, ids=lambda c: c.__name__)
def test_manual_attention_becomes_one_sdpa_call_with_parity(cls):
    ref, model = _pair(cls)
    expected = _prefill_and_decode(ref)
    result = SdpaAttentionPass().apply(model, CTX)
    assert result.rewritten == 1 and not result.skipped, result
    _assert_same(expected, _prefill_and_decode(model))

    sites = _sdpa_sites(model)
    assert len(sites) == 1
    fn, call = sites[0]
    keywords = {k.arg for k in call.keywords}
    assert len(call.args) == 3 and "scale" in keywords and keywords <= {"attn_mask", "dropout_p", "scale"}
    assert "attn_mask" in keywords  # every fixture masks (causal prefill, decode against the cache)
    assert not _unfused_calls(fn, sr.function_tree(fn)), sr.function_tree(fn)
    assert SdpaAttentionPass().apply(model, CTX).rewritten == 0  # idempotent
    _assert_same(expected, _prefill_and_decode(model))


def _capturing(graphs: list) -> object:
    aot_eager = lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return backend


def _called(graphs: list) -> set:
    return {n.target for g in graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")}


@pytest.mark.parametrize("cls", REWRITTEN, ids=lambda c: c.__name__)
def test_rewritten_model_compiles_whole_and_calls_sdpa(cls):
    ref, model = _pair(cls)
    SdpaAttentionPass().apply(model, CTX)
    torch._dynamo.reset()
    graphs: list = []
    compiled = torch.compile(model, backend=_capturing(graphs), fullgraph=True)  # fullgraph: a break raises
    _assert_same(_prefill_and_decode(ref), _prefill_and_decode(compiled))
    called = _called(graphs)
    assert F.scaled_dot_product_attention in called and not called & UNFUSED, called
    head_dim = ma.DIM // ma.HEADS
    for node in (n for g in graphs for n in g.graph.nodes if n.target is F.scaled_dot_product_attention):
        shapes = [tuple(a.meta["example_value"].shape) for a in node.args[:3]]
        if cls is ma.BmmAttention:  # (batch * heads, seq, head_dim)
            assert all(len(s) == 3 and s[0] == 2 * ma.HEADS and s[-1] == head_dim for s in shapes), shapes
        else:  # the contract: (batch, heads, seq, head_dim)
            assert all(len(s) == 4 and s[:2] == (2, ma.HEADS) and s[-1] == head_dim for s in shapes), shapes


def test_the_graph_check_sees_the_unfused_original():
    _, model = _pair(ma.NanoGPTAttention)
    torch._dynamo.reset()
    graphs: list = []
    torch.compile(model, backend=_capturing(graphs), fullgraph=True)(torch.randn(1, 3, ma.DIM))
    called = _called(graphs)
    assert F.softmax in called and F.scaled_dot_product_attention not in called


def test_helper_function_is_rewritten_for_this_model_only():
    ref, model = _pair(ma.LlamaAttention)
    result = SdpaAttentionPass().apply(model, CTX)
    assert result.rewritten == 1 and any("helper llama_attention" in n for n in result.notes)
    assert any("float32" in n and "bf16" in n for n in result.notes)  # the upcast the rewrite drops is noted
    assert "_graphfix_fn_llama_attention(" in sr.rewritten_source(model.attention)
    assert ma.llama_attention.__code__ is not _sdpa_sites(model)[0][0].__code__  # the module's helper is untouched
    assert sr.rewritten_source(ref.attention) is None


@pytest.mark.parametrize(("cls", "set_p"), [
    (ma.DropoutAttention, lambda a, p: setattr(a, "dropout", p)),
    (ma.NanoGPTAttention, lambda a, p: setattr(a.attn_dropout, "p", p)),
], ids=["functional", "module"])
def test_dropout_becomes_dropout_p_under_the_same_training_condition(cls, set_p):
    ref, model = _pair(cls)
    SdpaAttentionPass().apply(model, CTX)
    assert "dropout_p=" in ast_source(model)
    x = torch.randn(2, 5, ma.DIM)
    for m in (ref, model):
        set_p(m.attention, 1.0)
    _assert_same([ref(x)[0]], [model(x)[0]])  # eval: no dropout, both attend
    assert not torch.allclose(model(x)[0], x)
    ref.train(), model.train()
    _assert_same([x], [ref(x)[0]])  # training with p=1: every probability dropped, attention adds 0
    _assert_same([x], [model(x)[0]])
    set_p(model.attention, 0.5)
    torch.manual_seed(3)
    first, second = model(x)[0], model(x)[0]
    assert not torch.equal(first, second)  # p=0.5 in training: random, as the original


def ast_source(model: nn.Module) -> str:
    """The rewritten forward of the block's attention ("" when it was not rewritten)."""
    return sr.rewritten_source(model.attention) or ""


@pytest.mark.parametrize(("cls", "reason"), [
    (ma.WeightsReturned, "`attn_weights`, computed by the attention at line"),
    (ma.FiniteFill, "masked_fill with `-1000000000.0`, not -inf"),
    (ma.SoftCapped, "`torch.tanh(scores / 50.0) * 50.0` between the q·k product and the softmax"),
], ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_attention_that_does_not_match_in_full_is_reported_and_unchanged(cls, reason):
    ref, model = _pair(cls)
    x = torch.randn(2, 5, ma.DIM)
    result = SdpaAttentionPass().apply(model, CTX)
    assert result.rewritten == 0 and len(result.skipped) == 1
    where, why = result.skipped[0]
    assert where == "attention" and reason in why and "tests/fixtures/manual_attention.py:" in why
    assert sr.rewritten_source(model.attention) is None
    assert torch.equal(ref(x)[0], model(x)[0])


# --- smaller spellings, checked in eager mode ------------------------------------------------------------

def _qkv(heads_first: bool = True, t: int = 5, s: int = 7):
    gen = torch.Generator().manual_seed(2)
    shape = (lambda n: (2, 4, n, 8)) if heads_first else (lambda n: (2, n, 4, 8))
    return torch.randn(shape(t), generator=gen), torch.randn(shape(s), generator=gen), torch.randn(shape(s),
                                                                                                    generator=gen)


class HFOlderMask(nn.Module):
    """transformers 4.3x eager: the mask sliced inside the `if` that adds it."""

    def forward(self, q, k, v, attention_mask=None):
        attn_weights = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
        if attention_mask is not None:
            causal_mask = attention_mask[:, :, :, : k.shape[-2]]
            attn_weights = attn_weights + causal_mask
        attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(q.dtype)
        attn_output = torch.matmul(attn_weights, v)
        return attn_output.transpose(1, 2).contiguous()


class TwoMasks(nn.Module):
    """A boolean padding mask and an additive bias on the same scores, with an nn.Softmax module."""

    def __init__(self):
        super().__init__()
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, q, k, v, keep, bias):
        scores = torch.einsum("bhid,bhjd->bhij", q, k)
        scores = scores + bias
        scores.masked_fill_(keep == 0, float("-inf"))
        return torch.einsum("bhij,bhjd->bhid", self.softmax(scores), v)


class TensorScale(nn.Module):
    """A learned temperature: a tensor, not a float SDPA's scale accepts."""

    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.tensor(0.3))

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * self.temperature, dim=-1) @ v


class MaskBeforeScale(nn.Module):
    def forward(self, q, k, v, mask):
        return torch.softmax((q @ k.mT + mask) / 8.0, dim=-1) @ v


class CastQuery(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q.float() @ k.float().mT, dim=-1).type_as(v) @ v


class SplitOverBlocks(nn.Module):
    def forward(self, q, k, v, mask=None):
        scores = q @ k.mT
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        else:
            scores = scores * 0.5
        return torch.softmax(scores, dim=-1) @ v


class ConditionCalls(nn.Module):
    def forward(self, q, k, v, mask):
        scores = q @ k.mT
        if mask.any():
            scores = scores + mask
        return torch.softmax(scores, dim=-1) @ v


class DeletedProbabilities(nn.Module):
    def forward(self, q, k, v):
        probs = torch.softmax(q @ k.mT, dim=-1)
        out = probs @ v
        del probs
        return out


class CallInBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.steps = 0

    def forward(self, q, k, v):
        scores = q @ torch.tanh(k).mT
        self.count_step()
        return torch.softmax(scores, dim=-1) @ v

    def count_step(self):
        self.steps += 1


class LoggedScores(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, q, k, v):
        scores = q @ k.transpose(-2, -1)
        self.seen.append(scores)
        return torch.softmax(scores, dim=-1) @ v


class SelfAndCross(nn.Module):
    """Two attentions in one block (self, then cross): each becomes its own call."""

    def forward(self, q, k, v, memory):
        s = q @ k.transpose(-2, -1) / 8.0
        p = s.softmax(-1)
        x = p @ v
        c = x @ memory.transpose(-2, -1)
        c = torch.softmax(c * 0.125, dim=-1)
        return c @ memory


def _rewritten(cls: type[nn.Module], sites: int = 1) -> tuple[nn.Module, nn.Module, str]:
    """An original and a rewritten instance (``sites`` rewritten) and the rewritten forward's source."""
    ref, model = cls(), cls()
    assert SdpaAttentionPass().apply(model, CTX).rewritten == sites
    return ref, model, sr.rewritten_source(model)


def test_two_sites_in_one_block():
    q, k, v = _qkv()
    memory = torch.randn(2, 4, 3, 8)
    ref, model, source = _rewritten(SelfAndCross, sites=2)
    assert source.count("_graphfix_sdpa(") == 2 and "softmax" not in source, source
    _assert_same([ref(q, k, v, memory)], [model(q, k, v, memory)])


def test_mask_under_if_with_other_statements_keeps_them():
    q, k, v = _qkv()
    mask = torch.randn(2, 1, 5, 9)
    ref, model, source = _rewritten(HFOlderMask)
    assert "causal_mask = attention_mask[:, :, :, :k.shape[-2]]" in source
    assert "attn_mask=causal_mask if attention_mask is not None else None" in source
    for m in (mask, None):
        _assert_same([ref(q, k, v, m)], [model(q, k, v, m)])


def test_boolean_and_additive_masks_join_into_one_and_nn_softmax_matches():
    q, k, v = _qkv()
    keep, bias = torch.rand(5, 7) > 0.3, torch.randn(4, 5, 7)
    keep[:, 0] = True
    ref, model, source = _rewritten(TwoMasks)
    assert "attn_mask=_graphfix_where(keep != 0, bias, -inf)" in source.replace("1e309", "inf")
    _assert_same([ref(q, k, v, keep, bias)], [model(q, k, v, keep, bias)])


@pytest.mark.parametrize(("cls", "reason"), [
    (TensorScale, "scale `self.temperature` is not provably a Python number"),
    (LoggedScores, "`scores`, computed by the attention at line"),
    (MaskBeforeScale, "a mask is applied before a scale"),
    (CastQuery, "q is cast (`q.float()`) for the product"),
    (SplitOverBlocks, "`scores` is written at line"),
    (ConditionCalls, "`if mask.any()` calls a function"),
    (DeletedProbabilities, "`probs`, computed by the attention at line"),
    (CallInBetween, "`torch.tanh(k)` calls a function and line"),
], ids=["tensor-scale", "logged-scores", "mask-before-scale", "cast-query", "split-over-blocks", "condition-calls",
        "deleted", "call-in-between"])
def test_small_forms_that_cannot_be_rewritten_are_reported(cls, reason):
    result = SdpaAttentionPass().apply(cls(), CTX)
    assert result.rewritten == 0 and len(result.skipped) == 1 and reason in result.skipped[0][1], result


def test_low_precision_differs_at_rounding_level_only():
    """The dropped float32 softmax upcast (the pass notes it): in bf16 the rewrite is no farther from a float64
    reference than the original."""
    ref, model = _pair(ma.LlamaAttention)
    SdpaAttentionPass().apply(model, CTX)
    exact = _prefill_and_decode(copy.deepcopy(ref).double(), torch.float64)
    scale = max(t.abs().max().item() for t in exact)
    error = {}
    for name, m in (("original", ref), ("rewritten", model)):
        got = _prefill_and_decode(m.to(torch.bfloat16), torch.bfloat16)
        error[name] = max((g.double() - e).abs().max().item() for g, e in zip(got, exact)) / scale
    assert error["rewritten"] <= 1.5 * error["original"] and error["rewritten"] < 2e-2, error


def test_an_output_that_is_viewed_is_made_contiguous():
    _, model = _pair(ma.BmmAttention)
    SdpaAttentionPass().apply(model, CTX)
    assert ".contiguous().view(b, h, t, d)" in sr.rewritten_source(model.attention)


def test_plain_matmuls_and_other_softmaxes_are_left_alone():
    class Router(nn.Module):
        def forward(self, x, w, experts):
            gates = torch.softmax(x @ w, dim=-1)  # a softmax of a product, never multiplied with values here
            return gates, torch.matmul(x, experts)

    result = SdpaAttentionPass().apply(Router(), CTX)
    assert result.rewritten == 0 and len(result.skipped) == 1
    assert "not multiplied with v" in result.skipped[0][1]

    class Gates(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(8, 4)

        def forward(self, x, experts):
            return self.router(torch.softmax(self.router(x), dim=-1)) @ experts  # no product under the softmax

    result = SdpaAttentionPass().apply(Gates(), CTX)
    assert result.rewritten == 0 and not result.skipped

    class Mlp(nn.Module):
        def forward(self, x, w1, w2):
            return torch.relu(x @ w1) @ w2

    result = SdpaAttentionPass().apply(Mlp(), CTX)
    assert result.rewritten == 0 and not result.skipped
    assert result.notes == ["no manual attention graphfix can rewrite found"]


# --- sdpa-context reaches helpers too --------------------------------------------------------------------

def _math_only_attention(q):
    with torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False,
                                        enable_cudnn=False):
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)


class HelperContext(nn.Module):
    def forward(self, q):
        return _math_only_attention(q) * 2


def test_sdp_kernel_context_in_a_helper_is_rewritten():
    model, q = HelperContext(), torch.randn(1, 2, 4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = model(q)
    result = SdpaContextPass().apply(model, CTX)
    assert result.rewritten == 1 and any("helper _math_only_attention" in n for n in result.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated call left on the model's path
        assert torch.equal(model(q), ref)
        torch._dynamo.reset()
        assert torch.equal(torch.compile(model, backend="eager", fullgraph=True)(q), ref)
    assert SdpaContextPass().apply(model, CTX).rewritten == 0
