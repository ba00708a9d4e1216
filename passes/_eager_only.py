"""Logging kept in eager runs and left out of compiled code: ``if not torch.compiler.is_compiling(): <call>``.

Dynamo folds ``torch.compiler.is_compiling()`` to ``True`` while tracing (it is one of
its tracing-state functions, torch 2.3 onward; the rewrite binds it as a closure cell,
which Dynamo resolves to the same function), so the guarded statement is never
traced: no graph break, nothing of it in the graph. In an eager run the guard is
``False`` and the statement runs as before.

What is guarded: a statement that is only a call to ``print``, a ``logging``
function, a ``logging.Logger``/``LoggerAdapter`` method or ``warnings.warn`` (its
arguments free of side effects); an ``if`` with a side-effect-free test whose
branches hold only such statements (``if x.isnan().any().item(): log.warning(...)``);
and an assignment of a clock read (``t0 = time.perf_counter()``) whose value
feeds nothing but guarded code. In the root forward the calls Dynamo can reorder
after the graph are left alone (the pass registers them instead, so they still run).
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import logging
import types
import warnings

import torch

from graphfix.rewrite.blocks import source_rewrite as sr
from passes._purity import TIMERS, impurity
from passes._scalar_checks import child_blocks, scalar_calls

LOGGING_FUNCTIONS = tuple(getattr(logging, n) for n in ("debug", "info", "warning", "warn", "error", "exception",
                                                        "critical", "fatal", "log"))
GUARD = "_graphfix_is_compiling"
HELPERS = {GUARD: torch.compiler.is_compiling}
_IS_COMPILING = tuple(f for f in (torch.compiler.is_compiling, getattr(torch.compiler, "is_dynamo_compiling", None),
                                  getattr(torch._dynamo, "is_compiling", None), getattr(torch._utils, "is_compiling", None))
                      if f is not None)


@dataclasses.dataclass(frozen=True)
class LoggingCall:
    """A call that only logs: what it calls, and why Dynamo could not reorder it after the graph (if it cannot)."""

    node: ast.Call
    target: object
    """``print``, the ``logging`` function, ``warnings.warn``, or ``logging.Logger`` for any Logger method."""
    not_reorderable: str | None

    @property
    def what(self) -> str:
        return ast.unparse(self.node.func)


def logging_call(fn: types.FunctionType, node: ast.AST) -> LoggingCall | None:
    """``node`` as a logging call in ``fn``'s scope, or ``None``."""
    if not isinstance(node, ast.Call):
        return None
    target = sr.resolve(fn, node.func)
    if target is builtins.print:
        to_file = any(k.arg == "file" for k in node.keywords)
        return LoggingCall(node, target, "print(file=...) passes a file object Dynamo cannot reorder" if to_file else None)
    if any(target is f for f in LOGGING_FUNCTIONS):
        return LoggingCall(node, target, None)
    if target is warnings.warn:
        extra = node.args[1:] + [k.value for k in node.keywords if k.arg in ("category", "source")]
        return LoggingCall(node, target, "warnings.warn with a category/source argument cannot be reordered (Dynamo "
                           "reorders only tensor, constant and format-string arguments)" if extra else None)
    if isinstance(node.func, ast.Attribute) and isinstance(sr.resolve(fn, node.func.value),
                                                           (logging.Logger, logging.LoggerAdapter)):
        return LoggingCall(node, logging.Logger, "Dynamo cannot reorder Logger methods (it can only drop them, "
                           "torch._dynamo.config.ignore_logging_functions)")
    return None


def is_timer_call(fn: types.FunctionType, node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and any(sr.resolve(fn, node.func) is t for t in TIMERS)


def eager_only_nodes(fn: types.FunctionType, tree: ast.AST) -> set[int]:
    """``id``s of the nodes that only run when not compiling (under ``if not is_compiling():`` or its ``else``)."""
    found: set[int] = set()
    for node in ast.walk(tree):
        found.update(id(n) for stmt in eager_block(fn, node) for n in ast.walk(stmt))
    return found


def eager_block(fn: types.FunctionType, node: ast.AST) -> list[ast.stmt]:
    """The block of an ``if`` on ``is_compiling()`` that runs only when not compiling (empty for other nodes)."""
    if not isinstance(node, ast.If):
        return []
    if isinstance(node.test, ast.UnaryOp) and isinstance(node.test.op, ast.Not) \
            and _is_compiling_call(fn, node.test.operand):
        return node.body
    return node.orelse if _is_compiling_call(fn, node.test) else []


def _is_compiling_call(fn: types.FunctionType, node: ast.AST) -> bool:
    if not isinstance(node, ast.Call) or node.args or node.keywords:
        return False
    if isinstance(node.func, ast.Name) and node.func.id == GUARD:
        return True
    target = sr.resolve(fn, node.func)
    return any(target is f for f in _IS_COMPILING)


def guard_refusal(fn: types.FunctionType, call: LoggingCall, statement: ast.stmt | None,
                  receiver: str | None) -> str:
    """Why a logging call was not made eager-only (``statement`` is the ``Expr`` holding it, if any)."""
    if statement is None:
        return "its value is used (it is not a statement of its own)"
    args = [*call.node.args, *(k.value for k in call.node.keywords)]
    reason = next(filter(None, (impurity(fn, a, receiver) for a in args)), None)
    if reason:
        return f"its arguments have side effects that would be lost when compiled: {reason}"
    return "its function could not be rewritten (see that function's reason)"


class EagerOnly:
    """Guards the logging statements of one function's tree, and the clock reads that only feed them.

    ``keep`` are nodes of data-dependent constructs left for the report (nothing
    inside them is guarded unless the whole construct only logs); ``pending`` collects
    ``key -> description`` of each statement guarded, for the pass's notes.
    """

    def __init__(self, fn: types.FunctionType, tree: ast.FunctionDef, *, root: bool, receiver: str | None,
                 keep: set[int], pending: dict[str, str]) -> None:
        self.fn, self.tree, self.root, self.receiver = fn, tree, root, receiver
        self.keep, self.pending = keep, pending
        self.eager = eager_only_nodes(fn, tree)
        self.count = 0

    def run(self) -> int:
        self._block(self.tree.body, self.root)
        self._clocks()
        _merge_guards(self.tree)
        return self.count

    def _block(self, block: list[ast.stmt], root: bool) -> None:
        for index, stmt in enumerate(block):
            if id(stmt) in self.eager or eager_block(self.fn, stmt):
                continue  # already eager-only, or a guard itself
            if self._guardable(stmt, root):
                block[index] = self._guard(stmt, "no longer runs when compiled (eager only)")
            elif id(stmt) not in self.keep:
                inner_root = root and not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef))
                for inner in child_blocks(stmt):
                    self._block(inner, inner_root)

    def _guardable(self, stmt: ast.stmt, root: bool) -> bool:
        """A statement whose only effect is logging (in the root forward: logging Dynamo cannot reorder)."""
        if isinstance(stmt, ast.Expr):
            call = logging_call(self.fn, stmt.value)
            if call is None or (root and call.not_reorderable is None):
                return False
            args = [*call.node.args, *(k.value for k in call.node.keywords)]
            return not any(impurity(self.fn, a, self.receiver) for a in args)
        if isinstance(stmt, ast.If) and not impurity(self.fn, stmt.test, self.receiver):
            inner_root = root and not scalar_calls(stmt.test)  # a branch on a tensor value cannot be registered
            return all(self._guardable(s, inner_root) for s in stmt.body + stmt.orelse)
        return False

    def _guard(self, stmt: ast.stmt, effect: str) -> ast.If:
        self.count += 1
        self.pending[statement_key(self.fn, stmt)] = f"`{ast.unparse(stmt).splitlines()[0]}` {effect}"
        guard = ast.If(test=ast.UnaryOp(op=ast.Not(), operand=ast.Call(func=ast.Name(id=GUARD, ctx=ast.Load()),
                                                                      args=[], keywords=[])),
                       body=[stmt], orelse=[])
        ast.copy_location(guard, stmt)
        ast.fix_missing_locations(guard)
        return guard

    def _clocks(self) -> None:
        """Guard ``name = <clock read>`` when every read of ``name`` is in guarded code (or another such read)."""
        eager = eager_only_nodes(self.fn, self.tree)
        candidates: dict[int, tuple[ast.Assign, list[ast.stmt]]] = {}
        for block in sr.statement_lists(self.tree):
            for stmt in block:
                if id(stmt) not in eager and self._is_clock_read(stmt):
                    candidates[id(stmt)] = (stmt, block)
        loads: dict[str, list[ast.Name]] = {}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Store):
                loads.setdefault(node.id, []).append(node)
        removable = dict(candidates)
        while True:
            inside = eager | {id(n) for stmt, _ in removable.values() for n in ast.walk(stmt.value)}
            dropped = [key for key, (stmt, _) in removable.items()
                       if any(id(use) not in inside for use in loads.get(stmt.targets[0].id, []))]
            if not dropped:
                break
            for key in dropped:
                del removable[key]
        for stmt, block in removable.values():
            block[block.index(stmt)] = self._guard(stmt, "(a clock read that only fed eager-only logging) no longer "
                                                         "runs when compiled")

    def _is_clock_read(self, stmt: ast.stmt) -> bool:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            return False
        calls = [n for n in ast.walk(stmt.value) if isinstance(n, ast.Call)]
        return bool(calls) and all(is_timer_call(self.fn, c) for c in calls)


def statement_key(fn: types.FunctionType, node: ast.AST) -> str:
    """Where a statement is in the user's source; rewrites keep it, so it names the site across passes."""
    return f"{fn.__code__.co_filename}:{node.lineno}:{node.col_offset}"


def _merge_guards(tree: ast.AST) -> None:
    """One ``if not is_compiling():`` around consecutive guarded statements, not one each."""
    for block in list(sr.statement_lists(tree)):
        index = 1
        while index < len(block):
            if _is_own_guard(block[index - 1]) and _is_own_guard(block[index]):
                block[index - 1].body.extend(block.pop(index).body)
            else:
                index += 1


def _is_own_guard(stmt: ast.stmt) -> bool:
    return (isinstance(stmt, ast.If) and not stmt.orelse and isinstance(stmt.test, ast.UnaryOp)
            and isinstance(stmt.test.op, ast.Not) and isinstance(stmt.test.operand, ast.Call)
            and isinstance(stmt.test.operand.func, ast.Name) and stmt.test.operand.func.id == GUARD)
