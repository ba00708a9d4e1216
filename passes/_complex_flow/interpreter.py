"""One function's body over abstract values: statements in order, branches joined, loops run twice.

Each expression evaluates to a ``Val``; a use of a complex value the stand-in does not
support is an issue; a complex construct the rewrite changes is an edit (``Analysis.site``).
Calls are in ``calls``.
"""

from __future__ import annotations

import ast
import copy
import inspect
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from graphfix.rewrite import grad_modes
from graphfix.rewrite.blocks import paired_complex as pc
from graphfix.rewrite.blocks import source_rewrite as sr
from passes._complex_flow import objects, surface
from passes._complex_flow.calls import CallRules
from passes._complex_flow.values import COMPLEX, NONE, C, J, Val, join, join_all, outside, outside_part

if TYPE_CHECKING:
    from passes._complex_flow.analysis import Analysis, Context

Env = dict[str, Val]


class Interpreter(CallRules):
    def __init__(self, analysis: Analysis, ctx: Context) -> None:
        self.a = analysis
        self.ctx = ctx
        self.fn = ctx.fn
        self.me = ("fn", id(ctx.fn))
        self.spread_unknown = False

    def run(self) -> None:
        env: Env = {}
        if self.ctx.selves:
            env[next(iter(inspect.signature(self.fn).parameters))] = Val(objs=self.ctx.selves)
        env.update(self.ctx.params)
        self.block(self.ctx.tree.body, env)
        if id(self.fn) in self.a.sites:
            self.check_recompilable()
        if self.ctx.entry and self.ctx.result.is_complex:
            self.a.issue(self.fn, self.ctx.tree, "returns a complex value to a caller outside the model")

    def check_recompilable(self) -> None:
        """What ``source_rewrite.compile_function`` would refuse, found before anything is converted."""
        tree = copy.deepcopy(self.ctx.tree)
        try:
            grad_modes.decorators_as_blocks(self.fn, tree)  # grad-mode decorators become with blocks
        except sr.Unrewritable as exc:
            self.a.issue(self.fn, self.ctx.tree, f"cannot be recompiled: {exc}")
        names = [n.attr if isinstance(n, ast.Attribute) else n.id for n in ast.walk(tree)
                 if isinstance(n, (ast.Attribute, ast.Name))]
        if any(name.startswith("__") and not name.endswith("__") for name in names):
            self.a.issue(self.fn, self.ctx.tree, "uses a class-private name (`self.__x`): graphfix cannot recompile it")

    # -- statements ---------------------------------------------------------------------------------------------
    def block(self, stmts: list[ast.stmt], env: Env) -> Env:
        for stmt in stmts:
            env = self.stmt(stmt, env)
        return env

    def stmt(self, node: ast.stmt, env: Env) -> Env:
        if isinstance(node, ast.Assign):
            value = self.expr(node.value, env)
            for target in node.targets:
                self.assign(target, value, env, node)
        elif isinstance(node, ast.AnnAssign):
            if node.value is not None:
                self.assign(node.target, self.expr(node.value, env), env, node)
        elif isinstance(node, ast.AugAssign):
            self.augmented(node, env)
        elif isinstance(node, ast.Return):
            self.a.returned(self.ctx, self.expr(node.value, env) if node.value is not None else NONE)
        elif isinstance(node, ast.If):
            self.truth(node.test, env)
            env = _join_envs(self.block(node.body, dict(env)), self.block(node.orelse, dict(env)))
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
            env = self.loop(node, env)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                value = self.expr(item.context_expr, env)
                self.no_complex(value, item.context_expr, "is used as a context manager")
                if item.optional_vars is not None:
                    self.assign(item.optional_vars, outside_part(value), env, node)
            env = self.block(node.body, env)
        elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            after = self.block(node.body, dict(env))
            for handler in node.handlers:
                after = _join_envs(after, self.block(handler.body, _join_envs(env, after)))
            env = self.block(node.finalbody, self.block(node.orelse, after))
        elif isinstance(node, ast.Match):
            self.expr(node.subject, env)
            env = _join_all_envs([self.block(case.body, dict(env)) for case in node.cases] or [env])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self.closure(node, env)
            env[node.name] = NONE
        elif isinstance(node, ast.Assert):
            self.truth(node.test, env)
        elif isinstance(node, (ast.Expr, ast.Raise, ast.Delete)):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.expr):
                    self.expr(child, env)
        return env

    def loop(self, node: ast.For | ast.AsyncFor | ast.While, env: Env) -> Env:
        element = self.iterate(node.iter, env) if not isinstance(node, ast.While) else None
        before = dict(env)
        for _ in range(2):  # twice: what the body assigns reaches its start
            if element is not None:
                self.assign(node.target, element, env, node)
            else:
                self.truth(node.test, env)
            env = _join_envs(before, self.block(node.body, dict(env)))
        return self.block(node.orelse, env)

    def augmented(self, node: ast.AugAssign, env: Env) -> None:
        value = self.expr(node.value, env)
        if isinstance(node.target, ast.Name):
            current = env.get(node.target.id, NONE)
        elif isinstance(node.target, ast.Attribute):
            base = self.expr(node.target.value, env)
            current = self.read_attribute(node.target, base, wrap=False) if base.objs is not None else NONE
        else:
            current = self.expr(node.target.value, env)
        if value.is_complex or current.is_complex:
            self.a.issue(self.fn, node, "in-place arithmetic on a complex value (`x *= ...`): the paired form would "
                         "not write through to what `x` aliases; write `x = x * ...`")
        if isinstance(node.target, ast.Name):
            env[node.target.id] = join(current, outside_part(value))

    def assign(self, target: ast.expr, value: Val, env: Env, stmt: ast.AST) -> None:
        if isinstance(target, ast.Name):
            env[target.id] = value
        elif isinstance(target, (ast.Tuple, ast.List)):
            self.unpack(target, value, env, stmt)
        elif isinstance(target, ast.Attribute):
            self.store_attribute(target, value, env, stmt)
        elif isinstance(target, ast.Subscript):
            self.expr(target.value, env)
            self.index(target.slice, env)
            self.no_complex(value, stmt, "is written into a tensor or container (`x[...] = ...`)")
        elif isinstance(target, ast.Starred):
            self.assign(target.value, value, env, stmt)

    def unpack(self, target: ast.Tuple | ast.List, value: Val, env: Env, stmt: ast.AST) -> None:
        starred = any(isinstance(e, ast.Starred) for e in target.elts)
        if value.items is not None and len(value.items) == len(target.elts) and not starred:
            for elt, item in zip(target.elts, value.items):
                self.assign(elt, item, env, stmt)
            return
        if value.is_complex:
            self.a.issue(self.fn, stmt, "unpacks a complex value (iterates over it)")
        count = len(target.elts)
        for i, elt in enumerate(target.elts):
            part = outside_part(value)
            if value.objs is not None and not starred:  # a known tuple: (i, layer) from enumerate(self.layers)
                picked = [o[i] for o in value.objs if isinstance(o, (tuple, list)) and len(o) == count]
                part = Val(part.flags, tuple(picked), origin=part.origin) if picked else part
            self.assign(elt, part, env, stmt)

    def store_attribute(self, target: ast.Attribute, value: Val, env: Env, stmt: ast.AST) -> None:
        """``obj.name = value``: a complex value makes ``obj.name`` hold pairs; every write to it is wrapped."""
        base = self.expr(target.value, env)
        name = target.attr
        if base.objs is None:
            self.a.unresolved_access(self.fn, target, name)
            self.no_complex(value, stmt, f"is stored in `.{name}` of a value graphfix cannot trace")
            return
        self.a.access(self.fn, target)
        holds_pairs = False
        for owner in base.objs:
            if value.is_complex and not isinstance(owner, nn.Module):
                self.a.issue(self.fn, stmt, f"stores a complex value in `.{name}` of a {type(owner).__name__}, "
                             "not a module")
            elif value.is_complex and name in owner._parameters:
                self.a.issue(self.fn, stmt, f"stores a complex value in the parameter `.{name}`")
            elif value.is_complex:
                self.a.attr_join(owner, name, frozenset({C}))
            if C in self.a.attr_val(owner, name):
                holds_pairs = True
                self.a.connect(self.me, ("attr", id(owner), name))
        if not holds_pairs:
            return
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1):
            self.a.issue(self.fn, stmt, f"writes `.{name}` (a complex table) in a form graphfix does not rewrite "
                         "(only `obj.x = value`)")
        elif not (isinstance(stmt.value, ast.Call) and sr.resolve(self.fn, stmt.value.func) is pc.storable):
            self.a.site(self.fn, stmt, "store", "storable")

    def closure(self, node: ast.AST, env: Env) -> None:
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        if any(env.get(name, NONE).is_complex for name in used):
            self.a.issue(self.fn, node, "a nested function or lambda uses a complex value")

    def truth(self, test: ast.expr, env: Env) -> None:
        self.no_complex(self.expr(test, env), test, "is used as a truth value")

    def iterate(self, node: ast.expr, env: Env) -> Val:
        """What one element of ``node`` may be."""
        value = self.expr(node, env)
        if value.is_complex:
            self.a.issue(self.fn, node, "iterates over a complex value")
            return NONE
        return self.element_of(value, node, "iterates over")

    def element_of(self, container: Val, node: ast.AST, what: str) -> Val:
        """One element of ``container``: the objects it holds when they are known (modules of a ModuleList)."""
        part = outside_part(container)
        found = objects.elements(container.objs) if container.objs is not None else None
        if found is None:
            return part
        if any(objects.holds_complex(e) for e in found):
            self.a.issue(self.fn, node, f"{what} complex tensors")
        known = tuple(e for e in found if not isinstance(e, torch.Tensor))
        return Val(part.flags, known or None, origin=part.origin)

    # -- expressions --------------------------------------------------------------------------------------------
    def expr(self, node: ast.expr, env: Env) -> Val:
        method = getattr(self, "e_" + type(node).__name__, None)
        if method is not None:
            return method(node, env)
        parts = [self.expr(child, env) for child in ast.iter_child_nodes(node) if isinstance(child, ast.expr)]
        for part in parts:
            self.no_complex(part, node, f"is used in a `{type(node).__name__}` expression")
        return outside_part(*parts)

    def e_Constant(self, node: ast.Constant, env: Env) -> Val:
        return Val(frozenset({J})) if isinstance(node.value, complex) else Val(objs=(node.value,))

    def e_Name(self, node: ast.Name, env: Env) -> Val:
        if node.id in env:
            return env[node.id]
        return self.outside_object(sr.resolve(self.fn, node), node)

    def outside_object(self, obj: Any, node: ast.AST) -> Val:
        """A global, closure or module attribute: complex tensors there are not the model's to convert."""
        if obj is sr.MISSING:
            return NONE
        if isinstance(obj, torch.dtype) and obj in surface.COMPLEX_DTYPES:
            self.a.maker(self.fn, node)
            self.a.issue(self.fn, node, f"uses the complex dtype {obj}: graphfix pairs only values made by "
                         "view_as_complex, polar and complex")
        elif isinstance(obj, torch.Tensor) and obj.is_complex():
            self.a.maker(self.fn, node)
            self.a.issue(self.fn, node, "reads a complex tensor from a global or closure variable")
        return NONE if isinstance(obj, torch.Tensor) else Val(objs=(obj,))

    def e_Attribute(self, node: ast.Attribute, env: Env, wrap: bool = True) -> Val:
        resolved = sr.resolve(self.fn, node)
        if resolved is not sr.MISSING:
            return self.outside_object(resolved, node)
        base = self.expr(node.value, env)
        if base.is_complex:
            if node.attr not in surface.REAL_ATTRIBUTES:
                self.a.issue(self.fn, node, f"`.{node.attr}` of a complex value: not in graphfix's paired form")
            return NONE
        if base.objs is None:
            self.a.unresolved_access(self.fn, node, node.attr)
            return NONE if node.attr in surface.INFO_ATTRIBUTES else outside_part(base)
        return self.read_attribute(node, base, wrap)

    def read_attribute(self, node: ast.Attribute, base: Val, wrap: bool) -> Val:
        """``obj.name`` where the objects ``obj`` can be are known; a complex table there is read through
        ``stored`` (``wrap``: add that edit)."""
        name = node.attr
        self.a.access(self.fn, node)
        results: list[Val] = []
        holding = 0
        for owner in base.objs:
            kind, value = objects.lookup(owner, name)
            if kind == "method":
                results.append(Val(objs=(value,)))
            elif kind == "static":
                if objects.uses_complex(value):
                    self.a.issue(self.fn, node, f"calls {value.__qualname__}, a static or class method with complex "
                                 "ops: graphfix rewrites methods and module-level helpers, not these")
                results.append(outside(f"the static method {value.__qualname__}"))
            elif kind == "unknown":
                results.append(outside(f"`.{name}` of {type(owner).__name__}, a property or descriptor"))
            elif self.holds_complex_table(node, owner, name, value):
                holding += 1
                self.a.connect(self.me, ("attr", id(owner), name))
                results.append(COMPLEX)
            else:
                results.append(NONE if isinstance(value, torch.Tensor) else Val(objs=(value,)))
        if holding and holding != len(base.objs):
            self.a.issue(self.fn, node, f"`.{name}` holds a complex table on some of the objects that run this code "
                         "and not on others")
        if holding and wrap:
            self.a.site(self.fn, node, "read", "stored")
        return join_all(results)

    def holds_complex_table(self, node: ast.AST, owner: Any, name: str, value: Any) -> bool:
        """Whether ``owner.name`` holds complex values (now, as pairs, or written by the code later)."""
        if isinstance(value, torch.Tensor) and value.is_complex():
            self.a.maker(self.fn, node)
            if isinstance(value, nn.Parameter):
                self.a.issue(self.fn, node, f"reads the complex parameter `.{name}`: learned complex weights are "
                             "not converted")
                return False
            if not isinstance(owner, nn.Module):
                self.a.issue(self.fn, node, f"reads the complex tensor `.{name}` of a {type(owner).__name__}, not "
                             "a module")
                return False
            self.a.attr_join(owner, name, frozenset({C}))
        elif name in pc.paired_names(owner):
            self.a.attr_join(owner, name, frozenset({C}))
        elif objects.holds_complex(value):
            self.a.maker(self.fn, node)
            self.a.issue(self.fn, node, f"reads `.{name}`, a container of complex tensors")
            return False
        if C not in self.a.attr_val(owner, name):
            return False
        if isinstance(value, torch.Tensor) and not value.is_complex() and name not in pc.paired_names(owner):
            self.a.issue(self.fn, node, f"`.{name}` holds a real tensor now and a complex value later")
        return True

    def e_Subscript(self, node: ast.Subscript, env: Env) -> Val:
        base = self.expr(node.value, env)
        self.index(node.slice, env)
        if base.is_complex:
            return COMPLEX
        return self.element_of(base, node, "indexes a container of")

    def index(self, node: ast.expr, env: Env) -> None:
        self.no_complex(self.expr(node, env), node, "is used as an index")

    def e_Slice(self, node: ast.Slice, env: Env) -> Val:
        for part in (node.lower, node.upper, node.step):
            if part is not None:
                self.no_complex(self.expr(part, env), node, "is used in a slice")
        return NONE

    def e_Tuple(self, node: ast.Tuple, env: Env) -> Val:
        items = []
        for elt in node.elts:
            value = self.expr(elt.value if isinstance(elt, ast.Starred) else elt, env)
            if isinstance(elt, ast.Starred):
                self.no_complex(value, elt, "is unpacked with `*`")
            items.append(value)
        return Val(items=tuple(items))

    def e_List(self, node: ast.List | ast.Set, env: Env) -> Val:
        values = [self.expr(elt, env) for elt in node.elts]
        for value, elt in zip(values, node.elts):
            self.no_complex(value, elt, "is put in a list or set")
        return outside_part(*values)

    e_Set = e_List

    def e_Dict(self, node: ast.Dict, env: Env) -> Val:
        for part in [*node.keys, *node.values]:
            if part is not None:
                self.no_complex(self.expr(part, env), part, "is put in a dict")
        return NONE

    def e_BinOp(self, node: ast.BinOp, env: Env) -> Val:
        left, right = self.expr(node.left, env), self.expr(node.right, env)
        flags = left.all_flags | right.all_flags
        if not (left.is_complex or right.is_complex):
            if J in flags:
                self.a.maker(self.fn, node)
                if flags - {J}:
                    self.a.issue(self.fn, node, "a Python complex constant times a tensor (e.g. `1j * theta`) makes a "
                                 "complex tensor graphfix does not pair: build it with torch.polar")
                    return NONE
                return Val(frozenset({J}))
            return outside_part(left, right)
        op = surface.BINOPS.get(type(node.op))
        if op is None or (op == "truediv" and right.is_complex):
            self.a.issue(self.fn, node, f"`{surface.op_text(node.op)}` on a complex value: not in graphfix's "
                         "paired form")
            return COMPLEX
        other, other_node = (right, node.right) if left.is_complex else (left, node.left)
        if other.is_outside and not other.is_complex:
            self.a.issue(self.fn, node, f"combines a complex value with `{ast.unparse(other_node)}`, which comes from "
                         f"outside the model ({other.all_origin or 'unknown'}) and may itself be complex: keep the "
                         "table on a module or build it inside the model")
        self.a.site(self.fn, node, "binop", op)
        return COMPLEX

    def e_UnaryOp(self, node: ast.UnaryOp, env: Env) -> Val:
        value = self.expr(node.operand, env)
        if not value.is_complex:
            return Val(frozenset({J})) if J in value.all_flags else outside_part(value)
        if isinstance(node.op, ast.USub):
            self.a.site(self.fn, node, "neg", "neg")
            return COMPLEX
        self.a.issue(self.fn, node, f"`{surface.op_text(node.op)}` on a complex value: not in graphfix's paired form")
        return NONE

    def e_BoolOp(self, node: ast.BoolOp, env: Env) -> Val:
        values = [self.expr(value, env) for value in node.values]
        for value, part in zip(values, node.values):
            self.no_complex(value, part, "is used as a truth value")
        return join_all(values)

    def e_Compare(self, node: ast.Compare, env: Env) -> Val:
        parts = [node.left, *node.comparators]
        values = [self.expr(part, env) for part in parts]
        if not all(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
            for value, part in zip(values, parts):
                self.no_complex(value, part, "is compared")
        return NONE

    def e_IfExp(self, node: ast.IfExp, env: Env) -> Val:
        self.truth(node.test, env)
        return join(self.expr(node.body, env), self.expr(node.orelse, env))

    def e_NamedExpr(self, node: ast.NamedExpr, env: Env) -> Val:
        value = self.expr(node.value, env)
        self.assign(node.target, value, env, node)
        return value

    def e_Starred(self, node: ast.Starred, env: Env) -> Val:
        return self.expr(node.value, env)

    def e_JoinedStr(self, node: ast.JoinedStr, env: Env) -> Val:
        for value in node.values:
            if isinstance(value, ast.FormattedValue):
                self.no_complex(self.expr(value.value, env), value, "is formatted into a string")
        return NONE

    def e_Lambda(self, node: ast.Lambda, env: Env) -> Val:
        self.closure(node, env)
        return NONE

    def comprehension(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp, env: Env,
                      elts: list[ast.expr]) -> Val:
        inner = dict(env)
        for gen in node.generators:
            self.assign(gen.target, self.iterate(gen.iter, inner), inner, node)
            for cond in gen.ifs:
                self.truth(cond, inner)
        values = [self.expr(elt, inner) for elt in elts]
        for value, elt in zip(values, elts):
            self.no_complex(value, elt, "is collected by a comprehension")
        return outside_part(*values)

    def e_ListComp(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp, env: Env) -> Val:
        return self.comprehension(node, env, [node.elt])

    e_SetComp = e_GeneratorExp = e_ListComp

    def e_DictComp(self, node: ast.DictComp, env: Env) -> Val:
        return self.comprehension(node, env, [node.key, node.value])

    # -- reports ------------------------------------------------------------------------------------------------
    def no_complex(self, value: Val, node: ast.AST, what: str) -> None:
        if value.is_complex:
            self.a.issue(self.fn, node, f"a complex value {what}: not in graphfix's paired form")


def _join_envs(a: Env, b: Env) -> Env:
    out = dict(a)
    for name, value in b.items():
        out[name] = join(out[name], value) if name in out else value
    return out


def _join_all_envs(envs: list[Env]) -> Env:
    out = envs[0]
    for env in envs[1:]:
        out = _join_envs(out, env)
    return out
