"""Whether an expression can be evaluated more often, or not at all, without changing what a model does.

Two rewrites of the ``side-effects`` pass move code relative to a condition: a
branch turned into ``torch.where`` evaluates both sides, and a logging-only ``if``
made eager-only stops evaluating its test when compiled. Either is safe only when
the expression has no side effect: no in-place op, no draw from a random generator
(that shifts every later random number), no call into code that may update state
(a submodule writing its KV cache, a user helper). Only torch functions and tensor
methods that are neither in-place nor random, ``math`` functions, clock reads and
builtins that only compute are known not to; anything else is answered with the reason.
"""

from __future__ import annotations

import ast
import builtins
import time
import types

import torch

from graphfix.rewrite.blocks import source_rewrite as sr

_RANDOM = frozenset({
    "rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "multinomial", "bernoulli",
    "normal", "poisson", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "native_dropout", "rrelu", "gumbel_softmax",
})
_STATEFUL = frozenset({"backward", "register_hook", "retain_grad", "record_stream", "manual_seed", "seed",
                       "set_rng_state", "save", "set_default_dtype", "set_grad_enabled"})
_PURE_BUILTINS = tuple(getattr(builtins, n) for n in (
    "abs", "len", "min", "max", "sum", "any", "all", "round", "divmod", "pow", "isinstance", "hasattr", "getattr",
    "callable", "type", "id", "int", "float", "bool", "str", "repr", "format", "tuple", "list", "dict", "set",
    "sorted", "zip", "enumerate", "range", "chr", "ord", "hex"))
TIMERS = (time.time, time.perf_counter, time.monotonic, time.time_ns, time.perf_counter_ns, time.process_time,
          time.monotonic_ns, time.process_time_ns)
"""Clock reads: no effect of their own (a graph break under Dynamo, but nothing changes when one is skipped)."""
_PURE_MODULES = ("torch", "math")


def impurity(fn: types.FunctionType, expr: ast.AST, receiver: str | None) -> str | None:
    """Why evaluating ``expr`` (in ``fn``'s scope) may have a side effect, or ``None`` when it cannot.

    ``receiver`` is the name of a method's instance (``self``): a call on it or on
    its attributes (``self.norm(h)``) may run a submodule, so it is not known to be pure.
    """
    for node in ast.walk(expr):
        if isinstance(node, (ast.NamedExpr, ast.Yield, ast.YieldFrom, ast.Await)):
            return f"`{ast.unparse(node)}` has an effect of its own"
        if isinstance(node, ast.Call):
            reason = _call_impurity(fn, node, receiver)
            if reason:
                return reason
    return None


def _call_impurity(fn: types.FunctionType, call: ast.Call, receiver: str | None) -> str | None:
    text = f"`{ast.unparse(call.func)}(...)`"
    if any(k.arg == "out" for k in call.keywords):
        return f"{text} writes into `out=`"
    target = sr.resolve(fn, call.func)
    if target is not sr.MISSING:
        if any(target is f for f in _PURE_BUILTINS + TIMERS):
            return None
        module = getattr(target, "__module__", None) or ""
        name = getattr(target, "__name__", "")
        if module.partition(".")[0] not in _PURE_MODULES or module.startswith("torch.distributed"):
            return f"{text} may have side effects (only torch, math, clock and computing builtins are known not to)"
        return _op_impurity(text, name)
    if not isinstance(call.func, ast.Attribute):
        return f"{text} may have side effects (it is not a torch function)"
    if receiver is not None and root_name(call.func.value) == receiver:
        return f"{text} may run a submodule or method of `{receiver}`"
    if not hasattr(torch.Tensor, call.func.attr):
        return f"{text} is not a tensor method"
    return _op_impurity(text, call.func.attr)


def _op_impurity(text: str, name: str) -> str | None:
    if name.endswith("_") or name in _STATEFUL:
        return f"{text} changes state"
    if name in _RANDOM:
        return f"{text} draws random numbers"
    return None


def root_name(expr: ast.AST) -> str | None:
    """The name an attribute/subscript/call chain starts from (``self`` in ``self.layers[0].norm``)."""
    while isinstance(expr, (ast.Attribute, ast.Subscript, ast.Call)):
        expr = expr.func if isinstance(expr, ast.Call) else expr.value
    return expr.id if isinstance(expr, ast.Name) else None
