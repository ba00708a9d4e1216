"""graphfix.testing: the pytest helpers users call on their own models."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from graphfix.testing import GraphBreak, assert_no_graph_breaks, assert_no_recompiles, graph_breaks


def _line_of(obj, text: str) -> int:
    """The line number of the first line of ``obj``'s source that contains ``text``."""
    lines, start = inspect.getsourcelines(obj)
    return start + next(i for i, ln in enumerate(lines) if text in ln)


def prints(x):
    x = x * 2
    print("debug")
    return x + 1


def _log(x):
    print("step")
    return x


def prints_twice(x):
    x = _log(x) * 2
    return _log(x) + 1


class Clean(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


class ItemInLoop(Clean):
    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
            if x.sum().item() > 0:
                x = -x
        return x


def scale(x, n):
    return x * n


def test_clean_module_passes():
    assert_no_graph_breaks(Clean(), torch.randn(2, 4))
    assert graph_breaks(Clean(), torch.randn(2, 4)) == []


def test_print_breaks_with_file_line_and_reason():
    with pytest.raises(AssertionError) as info:
        assert_no_graph_breaks(prints, torch.randn(3))
    message = str(info.value)
    line = _line_of(prints, 'print("debug")')
    assert message.startswith("prints: 1 graph-break site(s)")
    assert f"test_testing_helpers.py:{line} in prints" in message
    assert "print" in message and 'print("debug")' in message


def test_break_in_a_called_function_points_at_the_innermost_user_line():
    found = graph_breaks(prints_twice, torch.randn(3))
    assert len(found) == 1 and isinstance(found[0], GraphBreak)  # one site, however often it is hit
    assert (found[0].function, found[0].line) == ("_log", _line_of(_log, 'print("step")'))
    twice = GraphBreak(found[0].file, found[0].line, "_log", 'print("step")', "Failed to trace\nmore", count=2)
    assert twice.describe().endswith(f':{twice.line} in _log (x2): Failed to trace\n      print("step")')


def test_break_inside_a_loop_is_found_although_explain_lists_nothing():
    # Dynamo skips a frame with a break in a loop; the fullgraph=True retry finds the site.
    with pytest.raises(AssertionError) as info:
        assert_no_graph_breaks(ItemInLoop(), torch.randn(2, 4))
    message = str(info.value)
    assert f"test_testing_helpers.py:{_line_of(ItemInLoop, '.item()')} in forward" in message
    assert "item()" in message


def test_an_already_compiled_module_is_checked_as_the_original():
    with pytest.raises(AssertionError, match="graph-break site"):
        assert_no_graph_breaks(torch.compile(prints, backend="eager"), torch.randn(3))


def test_same_python_int_does_not_recompile():
    assert_no_recompiles(scale, [(torch.randn(3), 2), (torch.randn(3), 2), (torch.randn(3), 2)])


def test_changing_python_int_recompiles_with_the_guard_in_the_message():
    with pytest.raises(AssertionError) as info:
        assert_no_recompiles(scale, [(torch.randn(3), 2), (torch.randn(3), 2), (torch.randn(3), 3)])
    message = str(info.value)
    assert message.startswith("scale: call 3 of 3 recompiled")
    assert "frame: scale at " in message and f"test_testing_helpers.py:{_line_of(scale, 'def scale')}" in message
    assert "n == 2" in message  # the guard that failed


def test_shape_change_recompiles_unless_dynamic():
    inputs = [torch.randn(3), torch.randn(4), torch.randn(5)]
    with pytest.raises(AssertionError, match="size mismatch"):
        assert_no_recompiles(torch.relu, inputs)
    assert_no_recompiles(torch.relu, inputs, dynamic=True)


def test_non_tuple_items_are_single_arguments_and_compiled_fns_are_used_as_is():
    compiled = torch.compile(Clean(), backend="eager", dynamic=True)
    assert_no_recompiles(compiled, [torch.randn(2, 4), torch.randn(3, 4)])


def test_needs_two_inputs():
    with pytest.raises(ValueError, match="at least two inputs"):
        assert_no_recompiles(scale, [(torch.randn(3), 2)])


def test_errors_from_the_function_itself_are_not_turned_into_assertions():
    def boom(x):
        raise RuntimeError("model bug")

    with pytest.raises(RuntimeError, match="model bug"):
        assert_no_recompiles(boom, [torch.randn(2), torch.randn(2)])
