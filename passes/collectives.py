"""Pass ``functional-collectives``: fairscale layers and async c10d calls -> functional collectives."""

from __future__ import annotations

import ast
import types

import torch.distributed as dist
from torch import nn

from graphfix.diagnose.findings import Category
from graphfix.rewrite.blocks import collectives as gc
from graphfix.rewrite.blocks import source_rewrite as sr
from graphfix.rewrite.pass_manager import Pass, PassContext, PassResult
from passes._common import no_match, replace_submodule, rewrite_methods, site

# c10d call -> (in-place helper, helper's parameter names in the order it takes them)
_C10D = {
    dist.all_reduce: (gc.all_reduce_, ("tensor", "op", "group")),
    dist.all_gather_into_tensor: (gc.all_gather_into_tensor_, ("output_tensor", "input_tensor", "group")),
    dist.reduce_scatter_tensor: (gc.reduce_scatter_tensor_, ("output", "input", "op", "group")),
}


def _fairscale_swaps() -> dict[type, tuple[type, str]]:
    """fairscale class -> (graphfix class, how its shard is checked)."""
    try:
        from fairscale.nn.model_parallel import layers as fs
    except ImportError:
        return {}
    return {
        fs.ColumnParallelLinear: (gc.ColumnParallelLinear, "column"),
        fs.RowParallelLinear: (gc.RowParallelLinear, "row"),
        fs.VocabParallelEmbedding: (gc.VocabParallelEmbedding, "vocab"),
        fs.ParallelEmbedding: (gc.ParallelEmbedding, "embedding"),
    }


def _shard_mismatch(m: nn.Module, kind: str, ws: int) -> str | None:
    """Why ``m``'s weight is not the shard fairscale would hold at world size ``ws`` (None if it is)."""
    shape = tuple(m.weight.shape)
    if kind == "column":
        want = (m.out_features // ws, m.in_features)
    elif kind == "row":
        want = (m.out_features, m.in_features // ws)
    elif kind == "vocab":
        want = (m.vocab_end_index - m.vocab_start_index, m.embedding_dim)
    else:
        want = (m.num_embeddings, m.embedding_dim // ws)
    return None if shape == want else f"weight shape {shape} is not the shard {want} at model-parallel size {ws}"


class FunctionalCollectivesPass(Pass):
    name = "functional-collectives"
    summary = ("fairscale ColumnParallelLinear/RowParallelLinear/(Vocab)ParallelEmbedding and async_op=True c10d "
               "calls in forward -> functional collectives that trace without graph breaks")
    fixes = frozenset({Category.COLLECTIVE, Category.AUTOGRAD_FUNCTION_CTX})
    order = 10

    def apply(self, model: nn.Module, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        self._swap_fairscale(model, result)
        rewrite_methods(model, result, _rewrite_async_collectives)
        return no_match(result, "fairscale model-parallel layer or async_op=True c10d collective")

    def _swap_fairscale(self, model: nn.Module, result: PassResult) -> None:
        swaps = _fairscale_swaps()
        found = [(n, m) for n, m in model.named_modules() if type(m) in swaps]
        if not found:
            return
        mp = gc.ModelParallelGroup.from_fairscale()
        for name, m in found:
            new_cls, kind = swaps[type(m)]
            reason = _shard_mismatch(m, kind, mp.world_size)
            if reason:
                result.skipped.append((site(name), reason))
                continue
            replace_submodule(model, name, new_cls.from_fairscale(m, mp))
            result.rewritten += 1
        others = {type(m).__name__ for _, m in model.named_modules()
                  if type(m).__module__.startswith("fairscale.nn.model_parallel") and type(m) not in swaps}
        for cls_name in sorted(others):
            result.skipped.append((cls_name, "fairscale layer without a graphfix equivalent"))
        if result.rewritten:
            result.notes.append(
                f"model-parallel size {mp.world_size}: "
                + ("no collective is emitted" if mp.world_size == 1 else "all_reduce/all_gather_tensor in the graph")
            )


def _rewrite_async_collectives(fn: types.FunctionType, tree: ast.FunctionDef) -> tuple[int, list[str], dict]:
    """Replace ``w = dist.<c>(..., async_op=True)`` + ``w.wait()`` (or ``dist.<c>(..., async_op=True).wait()``).

    The call becomes the in-place functional helper (the same tensors are updated);
    each ``w.wait()`` statement becomes ``pass``. Sites where the Work handle is
    used for anything else are left alone with the reason.
    """
    helpers: dict[str, object] = {}
    reasons: list[str] = []
    count = 0
    handled: set[int] = set()
    for body in sr.statement_lists(tree):
        for i, stmt in enumerate(body):
            call, handle = _async_site(fn, stmt)
            if call is None:
                continue
            handled.add(id(call))
            loc = f"line {stmt.lineno}"
            try:
                replacement = _helper_call(fn, call, helpers)
                if handle is not None:
                    waits = _wait_statements(tree, handle, stmt)
                    for wbody, j in waits:
                        wbody[j] = ast.copy_location(ast.Pass(), wbody[j])
            except sr.Unrewritable as exc:
                reasons.append(f"{loc}: {exc}")
                continue
            body[i] = ast.copy_location(ast.Expr(value=replacement), stmt)
            count += 1
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and id(node) not in handled and _is_async_c10d(fn, node):
            reasons.append(f"line {node.lineno}: async_op=True collective whose Work handle is not just waited on; "
                           "call it synchronously (Dynamo rewrites in-place all_reduce) or use "
                           "torch.distributed._functional_collectives")
    return count, reasons, helpers


def _is_async_c10d(fn: types.FunctionType, node: ast.Call) -> bool:
    if sr.resolve(fn, node.func) not in _C10D:
        return False
    return any(k.arg == "async_op" and not (isinstance(k.value, ast.Constant) and not k.value.value)
               for k in node.keywords)


def _waited(node: ast.AST) -> ast.expr | None:
    """The receiver of a bare ``<x>.wait()`` call, else ``None``."""
    if (isinstance(node, ast.Call) and not node.args and not node.keywords
            and isinstance(node.func, ast.Attribute) and node.func.attr == "wait"):
        return node.func.value
    return None


def _async_site(fn: types.FunctionType, stmt: ast.stmt) -> tuple[ast.Call | None, str | None]:
    """The async collective call of ``w = <call>`` (with ``w``) or ``<call>.wait()`` (with ``None``)."""
    if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
            and isinstance(stmt.value, ast.Call) and _is_async_c10d(fn, stmt.value)):
        return stmt.value, stmt.targets[0].id
    receiver = _waited(stmt.value) if isinstance(stmt, ast.Expr) else None
    if isinstance(receiver, ast.Call) and _is_async_c10d(fn, receiver):
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


def _helper_call(fn: types.FunctionType, call: ast.Call, helpers: dict[str, object]) -> ast.Call:
    target = sr.resolve(fn, call.func)
    helper, order = _C10D[target]
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
