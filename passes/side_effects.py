"""Pass ``side-effects``: print/logging/warnings in the step, clocks, and ``.item()``-driven checks and branches.

The step is every module's ``forward``, the methods they call on ``self`` and the
helpers they call (``graphfix.rewrite.step_code``); code outside it (``generate``,
``save_pretrained``) is left alone. In the step:

- logging in the root forward that Dynamo can reorder after the graph (``print``,
  ``logging.<function>``, ``warnings.warn`` with plain arguments) is recorded on the
  model, and ``graphfix.rewrite.blocks.side_effects.reorder_logging(model)`` registers
  it while compiling and running: it still runs, after the graph;
- any other logging statement (submodule forwards, helpers at any depth, Logger
  methods, and root-forward calls Dynamo cannot reorder) is made eager-only,
  ``if not torch.compiler.is_compiling(): <call>`` (``passes._eager_only``): it runs in
  eager and is left out of compiled code, each site noted "no longer runs when
  compiled"; so is a clock read that only feeds such logging;
- an ``.item()`` check that only raises becomes ``torch._assert_async``, and an
  ``.item()`` branch that only assigns tensors becomes ``torch.where``
  (``passes._scalar_checks``).

Registration is per function, not per call, and Dynamo (torch 2.13, measured) drops
a registered call in an inlined frame silently. Eager-only calls are never traced,
so they do not stand in the way: a function is registered unless an inlined call of
it is left unguarded (its function could not be rewritten, its value is used). Then
the root call is reported instead. Everything not rewritten is reported with a
concrete suggestion.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import types

from torch import nn

from graphfix.diagnose.findings import Category
from graphfix.rewrite.blocks import side_effects as se
from graphfix.rewrite.blocks import source_rewrite as sr
from graphfix.rewrite.pass_manager import Pass, PassContext, PassResult
from graphfix.rewrite.step_code import StepFunction, step_functions
from passes import _eager_only as eo
from passes import _scalar_checks as checks
from passes._common import helper_site, no_match, rewrite_methods, where

_DROPPED = "Dynamo drops a registered call in an inlined frame silently (torch 2.13, measured)"


class SideEffectsPass(Pass):
    name = "side-effects"
    summary = ("print / logging / warnings.warn: registered as reorderable in the root forward, eager-only "
               "(if not torch.compiler.is_compiling()) elsewhere in the step; .item() checks -> torch._assert_async, "
               ".item() value branches -> torch.where; other side effects reported with a suggestion")
    fixes = frozenset({Category.PYTHON_SIDE_EFFECT, Category.DATA_DEPENDENT})
    order = 70

    def apply(self, model: nn.Module, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        pending: dict[str, str] = {}
        steps = step_functions(model)
        root, in_step = _root_forward(steps, model), {id(fn) for fn, _, _ in steps}

        def transform(fn: types.FunctionType, tree: ast.FunctionDef) -> tuple[int, list[str], dict]:
            # The rewriter also follows calls outside the step (a decorator factory): leave those alone.
            return _transform(fn, tree, fn is root, pending) if id(fn) in in_step else (0, [], {})

        rewrite_methods(model, result, transform, methods=[s for s in steps if s[1]])
        steps = step_functions(model)
        root = _root_forward(steps, model)
        sites: list[_LoggingSite] = []
        handled = 0
        for fn, name, instances in steps:
            try:
                tree = sr.function_tree(fn)
            except sr.Unrewritable:
                continue
            loc = where([p for p, _ in instances], name) if name else helper_site(fn)
            handled += _Report(fn, tree, fn is root, loc, result, sites, pending).run()
        _register(model, sites, result)
        handled += sum(s.root for s in sites)
        if result.rewritten == 0 and not result.skipped and handled:
            result.notes.append(f"{handled} site(s) already eager-only, rewritten or registered: nothing new")
            return result
        return no_match(result, "print/logging/warnings call or .item() control flow in the step")


def _root_forward(steps: list[StepFunction], model: nn.Module) -> types.FunctionType | None:
    """The root module's forward, unless other modules share the function (then its frames may be inlined)."""
    for fn, name, instances in steps:
        if name == "forward" and any(m is model for _, m in instances):
            return fn if len(instances) == 1 else None
    return None


def _receiver(fn: types.FunctionType, tree: ast.FunctionDef) -> str | None:
    """The instance parameter (``self``) of a method; ``None`` for a plain function."""
    parts = fn.__qualname__.split(".")
    is_method = len(parts) > 1 and parts[-2] != "<locals>"
    return tree.args.args[0].arg if is_method and tree.args.args else None


def _transform(fn: types.FunctionType, tree: ast.FunctionDef, root: bool,
               pending: dict[str, str]) -> tuple[int, list[str], dict]:
    """Rewrite ``.item()`` checks and branches, then make logging eager-only. Reasons come from ``_Report``."""
    receiver = _receiver(fn, tree)
    sites = 0
    replaced: list[tuple[list[ast.stmt], ast.stmt, list[ast.stmt]]] = []
    eager = eo.eager_only_nodes(fn, tree)  # code that never runs compiled needs no tensor form
    for block in sr.statement_lists(tree):
        for stmt in block:
            if id(stmt) in eager or not checks.is_data_dependent(stmt):
                continue
            try:
                replaced.append((block, stmt, checks.rewrite(fn, tree, stmt, receiver)))
            except checks.Unsupported:
                continue
    for block, stmt, new in replaced:
        index = block.index(stmt)
        block[index:index + 1] = new
        pending[eo.statement_key(fn, stmt)] = _check_note(stmt, new)
        sites += 1
    keep = {id(n) for node in ast.walk(tree) if checks.is_data_dependent(node) for n in ast.walk(node)}
    sites += eo.EagerOnly(fn, tree, root=root, receiver=receiver, keep=keep, pending=pending).run()
    return sites, [], {**checks.HELPERS, **eo.HELPERS}


def _check_note(old: ast.stmt, new: list[ast.stmt]) -> str:
    test = ast.unparse(old.test)
    if any(isinstance(n, ast.Name) and n.id == checks.SELECT for s in new for n in ast.walk(s)):
        return (f"`if {test}: ...` -> torch.where (both sides computed; the Python branch is kept where the two "
                "values differ in type, shape, dtype or device)")
    if isinstance(old, ast.If):
        exc = old.body[0].exc
        raised, kind = ast.unparse(exc.func if isinstance(exc, ast.Call) else exc), f"if {test}: raise ..."
    else:
        raised, kind = "AssertionError", f"assert {test}"
    return (f"`{kind}` -> torch._assert_async (no host sync; a failure raises RuntimeError, not {raised}, "
            "and on CUDA it is a device-side assert, fatal to the process's CUDA context)")


@dataclasses.dataclass
class _LoggingSite:
    """A logging call left in the compiled step: in the root forward (to register) or inlined (blocks registering)."""

    loc: str
    call: eo.LoggingCall
    root: bool
    key: str

    @property
    def line(self) -> int:
        return self.call.node.lineno

    def note(self) -> str:
        text = f"{self.loc} line {self.line}: `{self.call.what}(...)` registered as reorderable (runs after the graph)"
        formatted = [ast.unparse(v.value) for v in ast.walk(self.call.node) if isinstance(v, ast.FormattedValue)]
        if formatted:
            text += (f"; it formats {', '.join(f'`{f}`' for f in formatted)}: fine while Dynamo treats it as a "
                     "constant, a graph break ('BUILD_STRING type error') once it is dynamic (a SymInt or tensor)")
        return text


def _register(model: nn.Module, sites: list[_LoggingSite], result: PassResult) -> None:
    """Register the functions of root-forward sites, unless an inlined call of the same function is left."""
    registered: set = set(getattr(model, se.ATTR, set()))
    done: set = set(model.__dict__.get("_graphfix_reordered_sites", set()))
    inlined = {id(s.call.target): s for s in sites if not s.root}
    for s in sites:
        other = inlined.get(id(s.call.target))
        if not s.root:
            continue
        if other is not None:
            result.skipped.append((s.loc, (f"line {s.line}: registering {_qualname(s.call.target)} would also drop "
                                   f"`{other.call.what}(...)` at {other.loc} line {other.line} ({_DROPPED}); make "
                                   "that call eager-only or move it first")))
            continue
        registered.add(s.call.target)
        if s.key not in done:
            done.add(s.key)
            result.rewritten += 1
            result.notes.append(s.note())
    if registered:
        setattr(model, se.ATTR, registered)
        model._graphfix_reordered_sites = done
        result.notes.append("enter graphfix.rewrite.blocks.side_effects.reorder_logging(model) around compile and "
                            "calls (registers " + ", ".join(sorted(_qualname(f) for f in registered)) + ")")


def _qualname(f: object) -> str:
    module = getattr(f, "__module__", None)
    return f"{module}.{f.__name__}" if module and module != "builtins" else f.__name__


class _Report:
    """What is left in one function of the step after the rewrite: notes for what changed, skips for the rest."""

    def __init__(self, fn: types.FunctionType, tree: ast.FunctionDef, root: bool, loc: str, result: PassResult,
                 sites: list[_LoggingSite], pending: dict[str, str]) -> None:
        self.fn, self.tree, self.root, self.loc = fn, tree, root, loc
        self.result, self.sites, self.pending = result, sites, pending
        self.receiver = _receiver(fn, tree)
        self.eager = eo.eager_only_nodes(fn, tree)
        self.in_branch: set[int] = set()
        self.statement_of = {id(node.value): node for node in ast.walk(tree) if isinstance(node, ast.Expr)}

    def skip(self, node: ast.AST, reason: str) -> None:
        self.result.skipped.append((self.loc, f"line {node.lineno}: {reason}"))

    def run(self) -> int:
        """Report this function; the number of sites found eager-only or rewritten (by this apply or an earlier one)."""
        handled = self.confirm_rewrites()
        for node in ast.walk(self.tree):
            if id(node) not in self.eager and checks.is_data_dependent(node):
                self.data_dependent(node)
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Call) and id(node) not in self.eager:
                self.call(node)
        return handled

    def confirm_rewrites(self) -> int:
        """Note each site this apply rewrote that is in the installed code (installing can fail); count all such sites.

        A site is a statement made eager-only, or the statements that replaced one check or branch (one key).
        """
        lines: dict[str, int] = {}
        for node in ast.walk(self.tree):
            for stmt in eo.eager_block(self.fn, node):
                lines[eo.statement_key(self.fn, stmt)] = stmt.lineno
            if isinstance(node, (ast.Expr, ast.Assign)) and self.calls_check_helper(node):
                lines[eo.statement_key(self.fn, node)] = node.lineno
        for key, line in sorted(lines.items(), key=lambda item: item[1]):
            if key in self.pending:
                self.result.notes.append(f"{self.loc} line {line}: {self.pending.pop(key)}")
        return len(lines)

    def calls_check_helper(self, node: ast.AST) -> bool:
        helpers = {checks.SELECT: checks.HELPERS[checks.SELECT], checks.ASSERT: checks.HELPERS[checks.ASSERT]}
        return any(isinstance(n, ast.Name) and n.id in helpers and sr.resolve(self.fn, n) is helpers[n.id]
                   for n in ast.walk(node))

    def data_dependent(self, node: ast.AST) -> None:
        for sub in ast.walk(node):
            self.in_branch.add(id(sub))
        test = ast.unparse(node.test)
        try:
            checks.rewrite(self.fn, self.tree, node, self.receiver)  # builds new nodes, changes none
            why = f"rewritable, but {self.fn.__qualname__} could not be rewritten (see its reason)"
        except checks.Unsupported as exc:
            why = str(exc)
        self.skip(node, f"data-dependent control flow on `{test}` (graph break; not rewritten: {why}): "
                  + _suggestion(node))

    def call(self, node: ast.Call) -> None:
        found = eo.logging_call(self.fn, node)
        if found is not None:
            self.logging(node, found)
        elif eo.is_timer_call(self.fn, node) and id(node) not in self.in_branch:
            self.skip(node, f"`{ast.unparse(node)}` reads the clock inside forward (graph break); time the "
                      "compiled call from outside (a clock read is removed with the logging only when its value "
                      "feeds nothing else)")
        elif (isinstance(node.func, ast.Attribute) and node.func.attr in checks.SCALAR_METHODS and not node.args
              and id(node) not in self.in_branch):
            self.skip(node, f"`{ast.unparse(node)}` copies a tensor to a Python number (graph break); keep it a "
                      "tensor, or set torch._dynamo.config.capture_scalar_outputs = True if it feeds tensor ops only")

    def logging(self, node: ast.Call, found: eo.LoggingCall) -> None:
        key = f"{self.fn.__code__.co_filename}:{node.lineno}"
        if self.root and found.not_reorderable is None:
            if id(node) not in self.in_branch:
                self.sites.append(_LoggingSite(self.loc, found, True, key))
            return
        if not self.root:
            self.sites.append(_LoggingSite(self.loc, found, False, key))
        if id(node) in self.in_branch:
            return  # reported with its branch
        statement = self.statement_of.get(id(node))
        why = eo.guard_refusal(self.fn, found, statement, self.receiver)
        if found.not_reorderable and self.root:
            why = f"{found.not_reorderable}, and it was not made eager-only: {why}"
        self.skip(node, f"`{found.what}(...)` left in the step: {why}; guard it with "
                  "`if not torch.compiler.is_compiling():` (eager only) or move it out of the model")


def _suggestion(node: ast.AST) -> str:
    """How to remove the break by hand: ``torch.where`` for assignments (side effects named), else ``torch.cond``."""
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
        return suggestion
    return (f"compute both outcomes and select with `torch.where({cond}, a, b)`, or use "
            f"`torch.cond({cond}, true_fn, false_fn, operands)`")


class _StripScalar(ast.NodeTransformer):
    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Attribute) and node.func.attr in checks.SCALAR_METHODS and not node.args:
            return node.func.value
        return node


def _strip_scalar(node: ast.expr) -> ast.expr:
    return _StripScalar().visit(copy.deepcopy(node))
