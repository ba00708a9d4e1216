"""Pass ``side-effects``: print/logging/warnings in forward, and ``.item()``-driven control flow.

Nothing is rewritten in the source. Calls Dynamo can reorder after the graph
(``print``, ``logging.<function>``, ``warnings.warn`` with plain arguments, in the
root forward) are recorded on the model, and ``graphfix.rewrite.blocks.side_effects.
reorder_logging(model)`` registers them while compiling and running. Everything
else is reported as skipped with a concrete suggestion: a rewrite would change
what the model does.
"""

from __future__ import annotations

import ast
import builtins
import copy
import dataclasses
import logging
import time
import types
import warnings

from torch import nn

from graphfix.diagnose.findings import Category
from graphfix.rewrite.blocks import side_effects as se
from graphfix.rewrite.blocks import source_rewrite as sr
from graphfix.rewrite.pass_manager import Pass, PassContext, PassResult
from passes._common import no_match, parsed_methods, where

_LOGGING_FUNCTIONS = {getattr(logging, n) for n in ("debug", "info", "warning", "warn", "error", "exception",
                                                     "critical", "fatal", "log")}
_TIMERS = {time.time, time.perf_counter, time.monotonic, time.time_ns, time.perf_counter_ns, time.process_time}
_SCALAR_METHODS = ("item", "tolist")
_DROPPED = ("Dynamo (torch 2.13, measured) drops reorderable logging calls in inlined frames silently, so "
            "registering it would lose the output")


class SideEffectsPass(Pass):
    name = "side-effects"
    summary = ("print / logging / warnings.warn in the root forward -> registered as reorderable logging "
               "(graphfix.rewrite.blocks.side_effects.reorder_logging); .item() control flow and other side effects "
               "reported with a suggestion")
    fixes = frozenset({Category.PYTHON_SIDE_EFFECT})
    order = 70

    def apply(self, model: nn.Module, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        sites: list[_LoggingSite] = []
        for fn, name, instances, tree in parsed_methods(model):
            root_forward = name == "forward" and any(m is model for _, m in instances)
            _Scan(fn, tree, root_forward, where([p for p, _ in instances], name), result, sites).run()
        self._register(model, sites, result)
        return no_match(result, "print/logging/warnings call or .item() control flow")

    def _register(self, model: nn.Module, sites: list[_LoggingSite], result: PassResult) -> None:
        """Register the functions of root-forward sites, unless that would drop a call elsewhere."""
        registered: set = set(getattr(model, se.ATTR, set()))
        done: set = set(model.__dict__.get("_graphfix_reordered_sites", set()))
        # Registration is per function, not per call: registering `print` for the root forward would
        # also make Dynamo drop every print in an inlined frame. So such functions stay unregistered.
        dropped = {s.target: s for s in sites if not s.root}
        for s in sites:
            other = dropped.get(s.target)
            if other is s:
                result.skipped.append((s.loc, (f"line {s.node.lineno}: `{s.what}(...)` outside the root forward: "
                                       f"{_DROPPED}; move it to the root forward or out of the model, or guard it "
                                       "with `if not torch.compiler.is_compiling():` (eager only)")))
            elif other is not None:
                result.skipped.append((s.loc, (f"line {s.node.lineno}: registering {_qualname(s.target)} would also "
                                       f"drop `{other.what}(...)` at {other.loc} line {other.node.lineno} "
                                       "(inlined frame); move that call first")))
            else:
                registered.add(s.target)
                if s.key not in done:
                    done.add(s.key)
                    result.rewritten += 1
                    result.notes.append(s.note())
        if registered:
            setattr(model, se.ATTR, registered)
            model._graphfix_reordered_sites = done
            result.notes.append("enter graphfix.rewrite.blocks.side_effects.reorder_logging(model) around compile and calls "
                                "(registers " + ", ".join(sorted(_qualname(f) for f in registered)) + ")")


@dataclasses.dataclass
class _LoggingSite:
    """A call to a function Dynamo could reorder: where, what, and whether it is in the root forward."""

    loc: str
    node: ast.Call
    target: object
    root: bool
    key: str

    @property
    def what(self) -> str:
        return ast.unparse(self.node.func)

    def note(self) -> str:
        text = f"{self.loc} line {self.node.lineno}: `{self.what}(...)` registered as reorderable (runs after the graph)"
        formatted = [ast.unparse(v.value) for v in ast.walk(self.node) if isinstance(v, ast.FormattedValue)]
        if formatted:
            text += (f"; it formats {', '.join(f'`{f}`' for f in formatted)}: fine while Dynamo treats it as a "
                     "constant, a graph break ('BUILD_STRING type error') once it is dynamic (a SymInt or tensor)")
        return text


def _qualname(f: object) -> str:
    module = getattr(f, "__module__", None)
    return f"{module}.{f.__name__}" if module and module != "builtins" else f.__name__


class _Scan:
    def __init__(self, fn: types.FunctionType, tree: ast.FunctionDef, root_forward: bool, loc: str,
                 result: PassResult, sites: list[_LoggingSite]) -> None:
        self.fn, self.tree, self.root_forward, self.loc = fn, tree, root_forward, loc
        self.result, self.sites = result, sites
        self.in_branch: set[int] = set()

    def skip(self, node: ast.AST, reason: str) -> None:
        self.result.skipped.append((self.loc, f"line {node.lineno}: {reason}"))

    def run(self) -> None:
        for node in ast.walk(self.tree):
            if isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)) and _scalar_calls(node.test):
                self.data_dependent(node)
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Call) and id(node) not in self.in_branch:
                self.call(node)

    def data_dependent(self, node: ast.AST) -> None:
        for sub in ast.walk(node):
            self.in_branch.add(id(sub))
        test = ast.unparse(node.test)
        cond = ast.unparse(_strip_scalar(node.test))
        body = node.body if isinstance(node, (ast.If, ast.While)) else []
        assigns = [s for s in body if isinstance(s, ast.Assign) and len(s.targets) == 1
                   and isinstance(s.targets[0], ast.Name)]
        effects = [s for s in body if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)]
        if isinstance(node, ast.If) and not node.orelse and assigns and len(assigns) + len(effects) == len(body):
            new = "; ".join(f"{a.targets[0].id} = torch.where({cond}, {ast.unparse(a.value)}, {a.targets[0].id})"
                            for a in assigns)
            suggestion = f"replace `if {test}: ...` by `{new}`"
            if effects:
                suggestion += (" (the branch's " + ", ".join(f"`{ast.unparse(e)}`" for e in effects)
                               + " cannot run conditionally inside a graph: drop it, or check outside the compiled call)")
        else:
            suggestion = (f"compute both outcomes and select with `torch.where({cond}, a, b)`, or use "
                          f"`torch.cond({cond}, true_fn, false_fn, operands)`")
        self.skip(node, f"data-dependent control flow on `{test}` (graph break; graphfix never rewrites it): "
                  + suggestion)

    def call(self, node: ast.Call) -> None:
        target = sr.resolve(self.fn, node.func)
        if target is builtins.print:
            bad = [k.arg for k in node.keywords if k.arg == "file"]
            self.logging_call(node, target, f"print(file=...) passes a {bad[0]} object Dynamo cannot reorder; "
                              "print to stdout or log outside forward" if bad else None)
        elif target in _LOGGING_FUNCTIONS:
            self.logging_call(node, target, None)
        elif target is warnings.warn:
            extra = [a for a in node.args[1:]] + [k.value for k in node.keywords if k.arg in ("category", "source")]
            self.logging_call(node, target, "warnings.warn with a category/source argument cannot be reordered "
                              "(Dynamo reorders only tensor, constant and format-string arguments): warn once "
                              "outside forward, e.g. where the model is built" if extra else None)
        elif isinstance(node.func, ast.Attribute) and isinstance(sr.resolve(self.fn, node.func.value), logging.Logger):
            self.skip(node, f"`{ast.unparse(node.func)}(...)`: Dynamo can only drop Logger methods "
                      "(torch._dynamo.config.ignore_logging_functions), which changes behaviour; log outside "
                      "forward, or use the logging module's function (logging.info), which can be reordered")
        elif target in _TIMERS:
            self.skip(node, f"`{ast.unparse(node)}` reads the clock inside forward (graph break); time the "
                      "compiled call from outside")
        elif isinstance(node.func, ast.Attribute) and node.func.attr in _SCALAR_METHODS and not node.args:
            self.skip(node, f"`{ast.unparse(node)}` copies a tensor to a Python number (graph break); keep it a "
                      "tensor, or set torch._dynamo.config.capture_scalar_outputs = True if it feeds tensor ops only")

    def logging_call(self, node: ast.Call, target: object, unsupported: str | None) -> None:
        if unsupported:
            self.skip(node, unsupported)
            return
        key = f"{self.fn.__code__.co_filename}:{node.lineno}"
        self.sites.append(_LoggingSite(self.loc, node, target, self.root_forward, key))


def _scalar_calls(node: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr in _SCALAR_METHODS and not n.args and not n.keywords]


class _StripScalar(ast.NodeTransformer):
    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Attribute) and node.func.attr in _SCALAR_METHODS and not node.args:
            return node.func.value
        return node


def _strip_scalar(node: ast.expr) -> ast.expr:
    return _StripScalar().visit(copy.deepcopy(node))
