"""``async_op=True`` c10d collectives in the step's source -> the in-place functional helpers, completed at the call.

Dynamo cannot trace a c10d ``Work`` handle ("async_op=True" graph break). A call whose handle
is only waited on is rewritten to ``graphfix.rewrite.blocks.collectives``' in-place helper (the
same tensors are updated) and each wait becomes ``pass``. Two shapes are matched:

- one handle: ``w = dist.<c>(..., async_op=True)`` + ``w.wait()`` statements (or ``<call>.wait()``);
- a list of handles: ``ws = []`` + ``ws.append(dist.<c>(..., async_op=True))`` or
  ``ws = [dist.<c>(..., async_op=True) for ...]``, waited in ``for w in ws: w.wait()`` loops.

A handle or list used for anything else is left alone with the reason. The collective then
completes at its call instead of at the wait: correct programs cannot tell.
"""

from __future__ import annotations

import ast
import types

import torch.distributed as dist

from graphfix.rewrite.blocks import collectives as gc
from graphfix.rewrite.blocks import source_rewrite as sr

# c10d call -> (in-place helper, helper's parameter names in the order it takes them)
C10D_ASYNC = {
    dist.all_reduce: (gc.all_reduce_, ("tensor", "op", "group")),
    dist.all_gather_into_tensor: (gc.all_gather_into_tensor_, ("output_tensor", "input_tensor", "group")),
    dist.reduce_scatter_tensor: (gc.reduce_scatter_tensor_, ("output", "input", "op", "group")),
}
for _old, _new in (("all_gather_into_tensor", "all_gather_single"), ("reduce_scatter_tensor", "reduce_scatter_single")):
    if callable(getattr(dist, _new, None)):  # torch 2.13 renames them (the old names warn), same parameters
        C10D_ASYNC[getattr(dist, _new)] = C10D_ASYNC[getattr(dist, _old)]


def rewrite_async_collectives(fn: types.FunctionType, tree: ast.FunctionDef) -> tuple[int, list[str], dict]:
    """The source transform: lists of handles first, then single handles; every other async call is a reason."""
    helpers: dict[str, object] = {}
    reasons: list[str] = []
    count = _rewrite_handle_lists(fn, tree, helpers, reasons) + _rewrite_single_handles(fn, tree, helpers, reasons)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and is_async_c10d(fn, node):
            reasons.append(f"line {node.lineno}: async_op=True collective whose Work handle is not just waited on; "
                           "call it synchronously (Dynamo rewrites in-place all_reduce) or use "
                           "torch.distributed._functional_collectives")
    return count, reasons, helpers


def is_async_c10d(fn: types.FunctionType, node: ast.Call) -> bool:
    if sr.resolve(fn, node.func) not in C10D_ASYNC:
        return False
    return any(k.arg == "async_op" and not (isinstance(k.value, ast.Constant) and not k.value.value)
               for k in node.keywords)


def _waited(node: ast.AST) -> ast.expr | None:
    """The receiver of a bare ``<x>.wait()`` call, else ``None``."""
    if (isinstance(node, ast.Call) and not node.args and not node.keywords
            and isinstance(node.func, ast.Attribute) and node.func.attr == "wait"):
        return node.func.value
    return None


# ---------------------------------------------------------------------------
# One handle
# ---------------------------------------------------------------------------


def _rewrite_single_handles(fn: types.FunctionType, tree: ast.FunctionDef, helpers: dict[str, object],
                            reasons: list[str]) -> int:
    """``w = <async call>`` + ``w.wait()`` statements, and ``<async call>.wait()``."""
    count = 0
    for body in sr.statement_lists(tree):
        for i, stmt in enumerate(body):
            call, handle = _async_site(fn, stmt)
            if call is None:
                continue
            try:
                replacement = helper_call(fn, call, helpers)
                if handle is not None:
                    for wbody, j in _wait_statements(tree, handle, stmt):
                        wbody[j] = ast.copy_location(ast.Pass(), wbody[j])
            except sr.Unrewritable as exc:
                reasons.append(f"line {stmt.lineno}: {exc}")
                continue
            body[i] = ast.copy_location(ast.Expr(value=replacement), stmt)
            count += 1
    return count


def _async_site(fn: types.FunctionType, stmt: ast.stmt) -> tuple[ast.Call | None, str | None]:
    """The async collective call of ``w = <call>`` (with ``w``) or ``<call>.wait()`` (with ``None``)."""
    if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
            and isinstance(stmt.value, ast.Call) and is_async_c10d(fn, stmt.value)):
        return stmt.value, stmt.targets[0].id
    receiver = _waited(stmt.value) if isinstance(stmt, ast.Expr) else None
    if isinstance(receiver, ast.Call) and is_async_c10d(fn, receiver):
        return receiver, None
    return None, None


def _wait_statements(tree: ast.FunctionDef, handle: str, assign: ast.stmt) -> list[tuple[list, int]]:
    """The ``handle.wait()`` statements; ``Unrewritable`` if ``handle`` is used or bound anywhere else."""
    waits = [(body, j) for body in sr.statement_lists(tree) for j, s in enumerate(body)
             if isinstance(s, ast.Expr) and isinstance(_waited(s.value), ast.Name) and _waited(s.value).id == handle]
    wait_names = {id(body[j].value.func.value) for body, j in waits}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == handle and id(node) not in wait_names and node is not assign.targets[0]:
            raise sr.Unrewritable(f"the Work handle `{handle}` is used other than `{handle}.wait()`")
    if not waits:
        raise sr.Unrewritable(f"the Work handle `{handle}` is never waited on")
    return waits


# ---------------------------------------------------------------------------
# A list of handles
# ---------------------------------------------------------------------------


def _rewrite_handle_lists(fn: types.FunctionType, tree: ast.FunctionDef, helpers: dict[str, object],
                          reasons: list[str]) -> int:
    count = 0
    for name in _handle_lists(fn, tree):
        try:
            sites = _list_sites(fn, tree, name)
            replacements = [(holder, helper_call(fn, call, helpers)) for holder, call in sites.calls]
        except sr.Unrewritable as exc:
            reasons.append(f"line {exc.args[1] if len(exc.args) > 1 else tree.lineno}: {exc.args[0]}")
            continue
        for holder, replacement in replacements:
            if isinstance(holder, ast.ListComp):
                holder.elt = ast.copy_location(replacement, holder.elt)
            else:
                holder.value = ast.copy_location(replacement, holder.value)  # the append statement, now the call
        for body, j in sites.loops:
            body[j] = ast.copy_location(ast.Pass(), body[j])
        count += len(sites.calls)
    return count


def _handle_lists(fn: types.FunctionType, tree: ast.FunctionDef) -> list[str]:
    """Names that get an async collective's handle appended, or are built from them by a comprehension."""
    names: list[str] = []
    for node in ast.walk(tree):
        call = _appended(node)
        if call is not None and is_async_c10d(fn, call[1]):
            names.append(call[0])
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.ListComp) and isinstance(node.value.elt, ast.Call)
                and is_async_c10d(fn, node.value.elt)):
            names.append(node.targets[0].id)
    return list(dict.fromkeys(names))


def _appended(node: ast.AST) -> tuple[str, ast.Call] | None:
    """``(name, call)`` of a ``name.append(call)`` statement."""
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
        return None
    call = node.value
    if (isinstance(call.func, ast.Attribute) and call.func.attr == "append" and isinstance(call.func.value, ast.Name)
            and len(call.args) == 1 and not call.keywords and isinstance(call.args[0], ast.Call)):
        return call.func.value.id, call.args[0]
    return None


class _ListSites:
    def __init__(self) -> None:
        self.calls: list[tuple[ast.AST, ast.Call]] = []
        """``(holder, async call)``: the ``append`` statement or the comprehension the call is in."""
        self.loops: list[tuple[list, int]] = []
        """The ``for w in name: w.wait()`` loops, as ``(statement list, index)``."""


def _list_sites(fn: types.FunctionType, tree: ast.FunctionDef, name: str) -> _ListSites:
    """Where the handle list ``name`` is built and waited; ``Unrewritable(reason, line)`` for any other use."""
    sites = _ListSites()
    allowed: set[int] = set()
    for node in ast.walk(tree):
        appended = _appended(node)
        if appended is not None and appended[0] == name and is_async_c10d(fn, appended[1]):
            sites.calls.append((node, appended[1]))
            allowed.add(id(node.value.func.value))
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id == name:
            value = node.value
            if isinstance(value, ast.List) and not value.elts:
                allowed.add(id(node.targets[0]))
            elif isinstance(value, ast.ListComp) and isinstance(value.elt, ast.Call) and is_async_c10d(fn, value.elt):
                sites.calls.append((value, value.elt))
                allowed.add(id(node.targets[0]))
    for body in sr.statement_lists(tree):
        for j, stmt in enumerate(body):
            if _waits_each(stmt, name):
                sites.loops.append((body, j))
                allowed.add(id(stmt.iter))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == name and id(node) not in allowed:
            raise sr.Unrewritable(f"the list `{name}` of Work handles is used other than `{name}.append(...)` and "
                                  f"`for w in {name}: w.wait()`", node.lineno)
    if not sites.loops:
        raise sr.Unrewritable(f"the Work handles in `{name}` are never waited on in a `for` loop", tree.lineno)
    return sites


def _waits_each(stmt: ast.stmt, name: str) -> bool:
    """``for w in name: w.wait()`` (the loop body is that one call)."""
    if not (isinstance(stmt, ast.For) and isinstance(stmt.iter, ast.Name) and stmt.iter.id == name
            and isinstance(stmt.target, ast.Name) and len(stmt.body) == 1 and not stmt.orelse
            and isinstance(stmt.body[0], ast.Expr)):
        return False
    receiver = _waited(stmt.body[0].value)
    return isinstance(receiver, ast.Name) and receiver.id == stmt.target.id


# ---------------------------------------------------------------------------
# The replacement call
# ---------------------------------------------------------------------------


def helper_call(fn: types.FunctionType, call: ast.Call, helpers: dict[str, object]) -> ast.Call:
    """The in-place functional helper call that does what ``call`` (an async c10d collective) does."""
    target = sr.resolve(fn, call.func)
    helper, order = C10D_ASYNC[target]
    args = sr.bind_call(call, target)
    async_op = args.get("async_op")
    if not (isinstance(async_op, ast.Constant) and async_op.value is True):
        raise sr.Unrewritable("async_op is not the constant True")
    if "op" in args:
        op = sr.resolve(fn, args["op"])
        if op not in gc.REDUCE_OPS:
            raise sr.Unrewritable(f"reduce op `{ast.unparse(args['op'])}` is not a ReduceOp constant graphfix maps")
        args["op"] = ast.Constant(gc.REDUCE_OPS[op])
    for unsupported in set(args) - set(order) - {"async_op"}:
        raise sr.Unrewritable(f"argument `{unsupported}` has no functional equivalent")
    helper_name = f"_graphfix_{helper.__name__}"
    helpers[helper_name] = helper
    return ast.Call(
        func=ast.Name(id=helper_name, ctx=ast.Load()),
        args=[args.get(p, ast.Constant(None)) if p != "op" else args.get("op", ast.Constant("sum")) for p in order],
        keywords=[],
    )
