"""Pass side-effects: reorderable logging registered in a scoped way, the rest eager-only or reported."""

from __future__ import annotations

import functools
import logging
import time
import warnings

import pytest
import torch
import torch._dynamo.config as dynamo_config
from torch import nn

from graphfix.rewrite.blocks.side_effects import reorder_logging, required_functions
from graphfix.rewrite.pass_manager import PassContext
from passes.side_effects import SideEffectsPass

CTX = PassContext()
LOGGER = logging.getLogger("graphfix.test")


class Child(nn.Module):
    def forward(self, x):
        print("child", x.sum())
        return x + 1


def _passthrough(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        return method(*args, **kwargs)

    return wrapper


class DecoratedChild(nn.Module):
    @_passthrough
    def forward(self, x):
        print("decorated child", x.sum())
        return x + 1


class Chatty(nn.Module):
    def __init__(self, child=None):
        super().__init__()
        self.child = child or nn.Identity()
        self.step = 3

    def forward(self, x):
        print("step", self.step, x.sum())
        logging.info("forward")  # noqa: LOG015 - the module-level function is what Dynamo can reorder
        warnings.warn("careful")
        y = self.child(x) + 1
        return y * 2


class Awkward(nn.Module):
    def forward(self, x):
        LOGGER.info("logger method")
        warnings.warn("with a category", RuntimeWarning)
        start = time.perf_counter()
        if x.abs().max().item() > 10:
            warnings.warn("large")
            x = x / 10
        n = x.sum().item()
        return x * n + start


def test_registration_is_scoped_and_compiles_without_breaks(capsys):
    model = Chatty()
    result = SideEffectsPass().apply(model, CTX)
    assert result.rewritten == 3
    assert required_functions(model) == {print, logging.info, warnings.warn} and not result.skipped
    x = torch.ones(2)
    with pytest.raises(torch._dynamo.exc.Unsupported):  # not registered outside the block
        torch.compile(model, backend="eager", fullgraph=True)(x)
    torch._dynamo.reset()
    capsys.readouterr()
    with reorder_logging(model), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(model, backend="eager", fullgraph=True)(x)
        assert print in dynamo_config.reorderable_logging_functions
    assert torch.equal(out, (x + 1) * 2)
    assert "step 3 tensor(2.)" in capsys.readouterr().out  # printed after the graph, same text (an int, no f-string)
    assert [str(w.message) for w in caught] == ["careful"]
    assert print not in dynamo_config.reorderable_logging_functions  # restored
    again = SideEffectsPass().apply(model, CTX)
    assert again.rewritten == 0 and required_functions(model) == {print, logging.info, warnings.warn}


def test_print_in_a_submodule_is_eager_only_so_print_can_be_registered():
    """The inlined print is never traced (guarded), so registering print for the root cannot drop it."""
    model = Chatty(child=Child())
    result = SideEffectsPass().apply(model, CTX)
    assert result.rewritten == 4 and not result.skipped  # 3 registrations + the child's print made eager-only
    assert required_functions(model) == {print, logging.info, warnings.warn}
    assert any(n.startswith("child line") and "no longer runs when compiled" in n for n in result.notes)


def test_an_inlined_call_left_unguarded_still_keeps_print_unregistered():
    model = Chatty(child=DecoratedChild())
    result = SideEffectsPass().apply(model, CTX)
    assert required_functions(model) == {logging.info, warnings.warn}
    child = "\n".join(r for loc, r in result.skipped if loc == "child")
    root = "\n".join(r for loc, r in result.skipped if loc == "<root>")
    assert "is decorated" in child and "`print(...)` left in the step" in child
    assert "would also drop `print(...)` at child" in root


def test_everything_else_is_reported_with_a_suggestion():
    result = SideEffectsPass().apply(Awkward(), CTX)
    assert result.rewritten == 2  # the Logger call and the warning with a category: eager-only
    notes = "\n".join(result.notes)
    assert "`LOGGER.info('logger method')` no longer runs when compiled" in notes
    assert "`warnings.warn('with a category', RuntimeWarning)` no longer runs when compiled" in notes
    reasons = [r for _, r in result.skipped]
    assert len(reasons) == 3, reasons
    text = "\n".join(reasons)
    assert "clock" in text  # its value feeds the output: not removable
    assert ("replace `if x.abs().max().item() > 10: ...` by `x = torch.where(x.abs().max() > 10, x / 10, x)`"
            in text) and "`warnings.warn('large')` cannot run conditionally" in text
    assert "`x.sum().item()` copies a tensor to a Python number" in text


def test_dynamo_drops_reorderable_logging_in_inlined_frames(capsys):
    """The torch behaviour the pass relies on: if this starts failing, registration can cover submodules."""
    model = Chatty(child=Child())
    torch._dynamo.reset()
    capsys.readouterr()
    with reorder_logging(functions={print, logging.info, warnings.warn}), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.compile(model, backend="eager", fullgraph=True)(torch.ones(2))
    printed = capsys.readouterr().out
    assert "step 3" in printed and "child" not in printed
