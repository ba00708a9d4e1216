"""Pass side-effects on models in several styles: eager-only logging in the step, .item() checks and branches.

Each rewritten model gives the original's outputs (float32), compiles with
``fullgraph=True`` (aot_eager) with no break, still logs in eager runs, and logs
nothing from compiled runs except the root forward's reorderable calls.
"""

from __future__ import annotations

import ast
import logging
import re
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphfix.rewrite.blocks import source_rewrite as sr
from graphfix.rewrite.blocks.side_effects import reorder_logging, required_functions
from graphfix.rewrite.pass_manager import PassContext
from passes.side_effects import SideEffectsPass

CTX = PassContext()
logger = logging.getLogger(__name__)


# --- style 1: a research file (helpers two calls deep) and HF-style blocks with a module logger --------------

def _trace_norm(h):
    print(f"hidden norm {float(h.norm()):.3f}")
    return h


def _project(h, weight):
    return _trace_norm(h @ weight)


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(dim, 2 * dim) * 0.2)
        self.down = nn.Parameter(torch.randn(2 * dim, dim) * 0.2)

    def forward(self, x):
        logging.info("mlp input %s", tuple(x.shape))  # noqa: LOG015 - the module-level function, as written in the wild
        return _project(F.silu(_project(x, self.up)), self.down)


class Block(nn.Module):
    def __init__(self, dim: int, index: int) -> None:
        super().__init__()
        self.index = index
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)

    def forward(self, x):
        t0 = time.perf_counter()
        logger.info("block %d", self.index)
        if self.index == 0:
            warnings.warn("block 0 warns", UserWarning)
        h = x + self.mlp(self.norm(x))
        if torch.isnan(h).any().item():
            logger.warning("nan in block %d", self.index)
        logger.debug("block took %.1f ms", (time.perf_counter() - t0) * 1e3)
        return h


class LoggingModel(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, i) for i in range(2))
        self.head = nn.Linear(dim, dim)

    def forward(self, x):
        print("root step")
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def describe(self):  # not in the step: never rewritten, never reported
        print("a model")


# --- style 2: checks and value branches on .item() -------------------------------------------------------------

def _rescale(h, extra, limit):
    if h.abs().max().item() > limit:
        h = h * 0.5
        extra = extra + h  # reads the new h: the condition must be evaluated once, before
    return h, extra


class Checked(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.limit = 1e3
        self.lin = nn.Linear(dim, dim)

    def forward(self, x):
        if torch.isnan(x).any().item() or x.abs().max().item() > self.limit:
            raise ValueError(f"bad activations (limit {self.limit})")
        h = self.lin(x)
        assert not h.isinf().any().item(), "activations overflowed"
        if h.abs().max().item() > 2.0:
            h = h - h.mean()
        h, extra = _rescale(h, torch.zeros_like(h), 1.5)
        return h + extra


class Counting(nn.Module):
    """Branches with a side effect: reported, left as they are."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.positive_calls = 0
        self.lin = nn.Linear(dim, dim)

    def forward(self, x):
        if x.sum().item() > 0:
            self.positive_calls += 1
        h = x * 2
        if h.mean().item() > 0:
            h = self.lin(h)
        return h


class NoTensorForm(nn.Module):
    """.item() control flow with no exact tensor form: each one reported with the reason."""

    strict = True

    def forward(self, x):
        h = x * 2
        if h.max().item() > 1:
            h = h - 1
        else:
            h = h + 1
        if h.sum().item() > 0 and self.strict:
            raise ValueError("positive")
        if x.tolist() == [0.0]:
            raise ValueError("zero")
        if x.mean().item() > 0:
            fresh = x + 1  # noqa: F841 - bound only in the branch
        if x.mean().item() < 0:
            h = F.dropout(h, 0.5)
        return h


# --- helpers ---------------------------------------------------------------------------------------------------

def _twins(cls, seed: int = 0):
    torch.manual_seed(seed)
    original = cls()
    torch.manual_seed(seed)
    return original, cls()


def _compiled(model, backend: str = "aot_eager"):
    torch._dynamo.reset()
    return torch.compile(model, backend=backend, fullgraph=True)


def _run_capturing(fn, x, capsys, caplog):
    """Output of ``fn(x)`` and what it printed, logged (this module's logger and the root logger) and warned."""
    capsys.readouterr()
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(x)
    logged = [re.sub(r"[\d.]+ ms", "N ms", r.getMessage()) for r in caplog.records if r.name in (__name__, "root")]
    return out, capsys.readouterr().out, logged, [str(w.message) for w in caught if "block" in str(w.message)]


def _closure_function(method, name: str):
    fn = method.__func__
    return fn.__closure__[fn.__code__.co_freevars.index(name)].cell_contents


def _notes(result) -> str:
    return "\n".join(result.notes)


# --- tests -----------------------------------------------------------------------------------------------------

def test_logging_outside_the_root_forward_runs_in_eager_and_not_when_compiled(capsys, caplog):
    caplog.set_level(logging.DEBUG)
    original, model = _twins(LoggingModel)
    result = SideEffectsPass().apply(model, CTX)
    notes = _notes(result)
    # mlp logging.info, helper print (2 calls deep), logger.info, the warn branch, the nan-logging branch,
    # logger.debug and the clock read that only feeds it; plus the root print, registered.
    assert result.rewritten == 8 and not result.skipped, result.skipped
    assert "`print(f'hidden norm {float(h.norm()):.3f}')` no longer runs when compiled" in notes
    assert "`logging.info('mlp input %s', tuple(x.shape))` no longer runs when compiled" in notes
    assert "`t0 = time.perf_counter()` (a clock read that only fed eager-only logging)" in notes
    assert "rewritten in helper _trace_norm" in notes and "describe" not in notes
    assert required_functions(model) == {print}
    assert sr.rewritten_source(model) is None  # the root forward keeps its print: registered, not rewritten

    x = torch.randn(2, 8)
    expected, printed, logged, warned = _run_capturing(original, x, capsys, caplog)
    out, printed_eager, logged_eager, warned_eager = _run_capturing(model, x, capsys, caplog)
    assert torch.equal(out, expected)
    assert (printed_eager, logged_eager, warned_eager) == (printed, logged, warned)  # eager: all of it, as before
    assert printed.count("hidden norm") == 4 and "block 1" in logged and warned == ["block 0 warns"]

    with reorder_logging(model):
        compiled = _compiled(model)
        out, printed, logged, warned = _run_capturing(compiled, x, capsys, caplog)
        out_again, printed_again, _, _ = _run_capturing(compiled, x, capsys, caplog)
    assert torch.allclose(out, expected, atol=1e-6) and torch.allclose(out_again, expected, atol=1e-6)
    assert printed.strip() == "root step" and printed_again.strip() == "root step"  # reordered, still runs
    assert not logged and not warned

    again = SideEffectsPass().apply(model, CTX)
    assert again.rewritten == 0 and not again.skipped and "nothing new" in _notes(again)


def test_dynamo_traces_the_rewritten_logging_without_a_break():
    _, model = _twins(LoggingModel)
    SideEffectsPass().apply(model, CTX)
    torch._dynamo.reset()
    with reorder_logging(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explained = torch._dynamo.explain(model)(torch.randn(2, 8))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_checks_become_async_asserts_and_still_fail_on_bad_inputs():
    original, model = _twins(Checked)
    result = SideEffectsPass().apply(model, CTX)
    notes = _notes(result)
    assert result.rewritten == 4 and not result.skipped, result.skipped
    assert "raises RuntimeError, not ValueError" in notes and "raises RuntimeError, not AssertionError" in notes
    assert notes.count("-> torch.where") == 2
    source = sr.rewritten_source(model)
    assert ".item()" not in source and "_graphfix_assert_async(~(" in source
    helper = _closure_function(model.forward, "_graphfix_fn__rescale")  # the rewritten copy the forward calls
    assert "_graphfix_cond = " in ast.unparse(helper.__graphfix_ast__)  # two assignments: one condition, first

    compiled = _compiled(model)
    for scale in (0.1, 1.0, 30.0):  # below and above both branch thresholds
        x = torch.randn(3, 8) * scale
        expected = original(x)
        assert torch.equal(model(x), expected)
        assert torch.allclose(compiled(x), expected, atol=1e-6)

    bad = torch.full((3, 8), 5e3)
    with pytest.raises(ValueError, match="bad activations"):
        original(bad)
    with pytest.raises(RuntimeError, match=r"ValueError: bad activations \(limit \{self.limit\}\)"):
        model(bad)
    with pytest.raises(RuntimeError, match="ValueError: bad activations"):
        compiled(bad)
    nan = torch.randn(3, 8)
    nan[1, 2] = float("nan")
    with pytest.raises(RuntimeError, match="ValueError"):
        compiled(nan)
    assert SideEffectsPass().apply(model, CTX).rewritten == 0


def test_assert_on_item_fails_compiled_when_violated():
    original, model = _twins(Checked)
    SideEffectsPass().apply(model, CTX)
    with torch.no_grad():
        model.lin.bias.fill_(float("inf"))  # the linear's output overflows: the assert must fire
        original.lin.bias.fill_(float("inf"))
    x = torch.randn(2, 8)
    with pytest.raises(AssertionError, match="activations overflowed"):
        original(x)
    with pytest.raises(RuntimeError, match="AssertionError: activations overflowed"):
        model(x)
    with pytest.raises(RuntimeError, match="AssertionError: activations overflowed"):
        _compiled(model)(x)


def test_checks_and_branches_compile_with_inductor():
    original, model = _twins(Checked)
    SideEffectsPass().apply(model, CTX)
    compiled = _compiled(model, "inductor")
    x = torch.randn(3, 8) * 30.0
    assert torch.allclose(compiled(x), original(x), atol=1e-5)
    with pytest.raises(RuntimeError, match="ValueError: bad activations"):
        compiled(torch.full((3, 8), 5e3))


def test_branches_with_side_effects_are_reported_and_left_as_they_are():
    model = Counting()
    result = SideEffectsPass().apply(model, CTX)
    assert result.rewritten == 0 and sr.rewritten_source(model) is None
    reasons = "\n".join(r for _, r in result.skipped)
    assert len(result.skipped) == 2, result.skipped
    assert "its body does more than assign names (line" in reasons and "`self.positive_calls += 1`" in reasons
    assert "both sides would be computed, and `self.lin(...)` may run a submodule or method of `self`" in reasons
    assert "replace `if h.mean().item() > 0: ...` by `h = torch.where(h.mean() > 0, self.lin(h), h)`" in reasons
    x = torch.ones(2, 8)
    model(x)
    assert model.positive_calls == 1  # the model still does what it did


def test_control_flow_without_an_exact_tensor_form_is_reported_with_the_reason():
    model = NoTensorForm()
    result = SideEffectsPass().apply(model, CTX)
    assert result.rewritten == 0 and sr.rewritten_source(model) is None
    reasons = [r for _, r in result.skipped]
    expected = ["it has an `else`/`elif` branch",
                "`self.strict` is not built from .item() values",
                "`x.tolist()` is not a scalar (`.item()`) read",
                "`fresh` is not bound before the branch",
                "`F.dropout(...)` draws random numbers"]
    assert len(reasons) == len(expected), reasons
    for text in expected:
        assert any(text in r for r in reasons), (text, reasons)


def test_select_falls_back_to_the_python_branch_when_where_would_broadcast():
    from graphfix.rewrite.blocks.scalar_checks import scalar, select

    row, column = torch.ones(1, 3), torch.zeros(3, 1)
    assert select(scalar(torch.tensor(1.0)) > 0, row, column) is row  # where() would give a 3x3 tensor
    assert select(scalar(torch.tensor(1.0)) > 0, 2.0, 1.0) == 2.0
    # .item() compares in double precision: so does scalar(), where float32 would round 0.1 first
    value = torch.tensor(0.1, dtype=torch.float32)
    assert bool(scalar(value) > 0.1) == (value.item() > 0.1)


def test_only_the_step_is_looked_at_in_a_hugging_face_model():
    """generate(), save_pretrained() and the rest log a lot, outside the step: not rewritten, not reported."""
    from tests.fixtures.tiny_hf import tiny_hf

    model = tiny_hf("llama")
    tokens = torch.randint(0, 128, (1, 6))
    expected = model(tokens).logits
    result = SideEffectsPass().apply(model, CTX)
    assert result.rewritten == 0 and not result.skipped, result.skipped
    assert "generate" not in model.__dict__ and "save_pretrained" not in model.__dict__
    assert torch.equal(model(tokens).logits, expected)
