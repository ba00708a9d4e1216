"""Where complex values flow in a model's code, and whether the paired stand-in covers every place they reach.

The ``real-rope`` pass replaces the calls that create complex tensors (``torch.view_as_complex``,
``torch.polar``, ``torch.complex``) by ones that return a ``PairedComplex``
(``graphfix.rewrite.blocks.paired_complex``). That is correct only if every place such a value
reaches is something the stand-in supports: a partial rewrite would hand a Python object
to code that expects a tensor, or read a converted table as if it were still complex.

So this module follows complex values, in the source, from where they are made through
local names, helper calls (any depth), submodule calls (``self.attn(...)``, ``for layer in
self.layers: layer(...)``), returns and module attributes, and checks each use against the
stand-in's surface. Values are abstract: ``c`` (a complex value the rewrite pairs) and
``u`` (from outside the analysed code: an argument of the root's methods, a property, an
unknown call: it may be complex). Code that complex values connect forms a group; a
group with one unsupported use (an op the stand-in lacks, a value from outside, a store
the pass cannot follow) is left entirely as it is and every such use is reported.

The result is a ``Plan``: the source sites to rewrite per function, the stored complex
tensors to convert to pairs, the attributes that will hold pairs, and the skipped sites.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import inspect
import itertools
import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from graphfix.diagnose.findings import display_path
from graphfix.rewrite import reachable
from graphfix.rewrite.blocks import paired_complex as pc
from graphfix.rewrite.blocks import source_rewrite as sr

C, U = "c", "u"
HELPER = "_graphfix_cx"
"""The name the rewritten code calls the block by (a closure cell holding ``paired_complex``)."""

_TORCH_MAKERS = {id(torch.view_as_complex): "view_as_complex", id(torch.polar): "polar", id(torch.complex): "complex"}
_TORCH_READERS = {id(torch.view_as_real): "view_as_real"}
_OWN_MAKERS = {id(pc.view_as_complex): "view_as_complex", id(pc.polar): "polar", id(pc.complex): "complex"}
_OWN_READERS = {id(pc.view_as_real): "view_as_real"}
_OWN_ARITH = {id(f): f.__name__ for f in (pc.mul, pc.add, pc.sub, pc.truediv, pc.neg)}
_BINOPS = {ast.Mult: "mul", ast.Add: "add", ast.Sub: "sub", ast.Div: "truediv"}
_COMPLEX_DTYPES = {torch.complex32, torch.complex64, torch.complex128}
_SPECTRAL = frozenset(id(getattr(torch.fft, n)) for n in dir(torch.fft) if not n.startswith("_")
                      and callable(getattr(torch.fft, n))) | {id(torch.stft), id(torch.istft)}

_STRUCTURAL = frozenset({"view", "reshape", "expand", "unsqueeze", "squeeze", "flatten", "transpose", "permute",
                         "contiguous", "clone", "detach", "conj"})
_SCALAR_METHODS = frozenset({"dim", "size", "numel", "is_complex"})
_REAL_ATTRS = frozenset({"shape", "ndim", "device", "dtype", "real", "imag"})
_INFO_ATTRS = frozenset({"shape", "ndim", "device", "dtype"})
_NEUTRAL_BUILTINS = frozenset(id(f) for f in (len, isinstance, hasattr, id, type))
_CONCRETE_BUILTINS = frozenset(id(f) for f in (enumerate, zip, list, tuple, reversed))
_CONCRETE_METHODS = frozenset({"values", "items", "keys", "children", "modules", "named_children"})


@dataclasses.dataclass(frozen=True)
class Val:
    """An abstract value: flags (``c``, ``u``), the objects it can be when known, a tuple's items."""

    flags: frozenset = frozenset()
    objs: tuple | None = None
    items: tuple | None = None

    @property
    def is_complex(self) -> bool:
        return C in self.all_flags

    @property
    def all_flags(self) -> frozenset:
        if self.items is None:
            return self.flags
        return self.flags.union(*(i.all_flags for i in self.items))


NONE = Val()
OUTSIDE = Val(frozenset({U}))
COMPLEX = Val(frozenset({C}))


def join(a: Val, b: Val) -> Val:
    if a == b:
        return a
    objs = None if a.objs is None or b.objs is None else _unique(a.objs + b.objs)
    if a.items is not None and b.items is not None and len(a.items) == len(b.items):
        return Val(a.flags | b.flags, objs, tuple(join(x, y) for x, y in zip(a.items, b.items)))
    return Val(a.all_flags | b.all_flags, objs)


def _unique(objs: Iterable) -> tuple:
    seen: dict[int, Any] = {}
    for o in objs:
        seen.setdefault(id(o), o)
    return tuple(seen.values())


def node_key(node: ast.AST) -> tuple:
    """A node's identity across re-parses of the same source: its type and span."""
    return (type(node).__name__, node.lineno, node.col_offset, node.end_lineno, node.end_col_offset)


@dataclasses.dataclass(frozen=True)
class _Method:
    """A user method bound to an object, as ``obj.name`` evaluates to."""

    obj: Any
    fn: types.FunctionType


@dataclasses.dataclass
class _Context:
    """One function analysed with one set of ``self`` objects (``()`` for a helper)."""

    fn: types.FunctionType
    tree: ast.FunctionDef
    selves: tuple
    follows_helpers: bool
    params: dict[str, Val] = dataclasses.field(default_factory=dict)
    returns: Val = NONE
    entry: bool = False


@dataclasses.dataclass
class Plan:
    """What to rewrite (``sites[id(fn)]``: node key -> edit), convert, mark, and what was skipped."""

    sites: dict[int, dict[tuple, tuple[str, str]]] = dataclasses.field(default_factory=dict)
    storage: list[tuple[str, nn.Module, str]] = dataclasses.field(default_factory=list)
    """``(module path, module, attribute)`` of complex tensors to store as pairs."""
    marks: list[tuple[nn.Module, str]] = dataclasses.field(default_factory=list)
    """Attributes that will hold pairs written by the rewritten code (a table built in forward)."""
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    complex_sites: int = 0
    """Complex constructs found (rewritten now, before, or left alone): zero means the model has none."""

    def transform(self, fn: types.FunctionType, tree: ast.FunctionDef) -> tuple[int, list[str], dict]:
        """The source transform for ``passes._common.rewrite_methods``: applies this plan's edits to ``fn``."""
        edits = self.sites.get(id(fn))
        if not edits:
            return 0, [], {}
        editor = _Editor(edits)
        editor.visit(tree)
        return editor.count, [], {HELPER: pc}


class _Editor(ast.NodeTransformer):
    """Applies planned edits, children first, matching nodes by ``node_key``."""

    def __init__(self, edits: dict[tuple, tuple[str, str]]) -> None:
        self.edits = edits
        self.count = 0

    def generic_visit(self, node: ast.AST) -> ast.AST:
        node = super().generic_visit(node)
        edit = self.edits.get(node_key(node)) if hasattr(node, "end_col_offset") else None
        if edit is None:
            return node
        kind, name = edit
        self.count += 1
        if kind == "call":
            node.func = ast.copy_location(_helper_attr(name), node.func)
            return node
        if kind == "binop":
            return ast.copy_location(_helper_call(name, [node.left, node.right]), node)
        if kind == "neg":
            return ast.copy_location(_helper_call("neg", [node.operand]), node)
        if kind == "read":
            return ast.copy_location(_helper_call("stored", [node]), node)
        if kind == "store":
            node.value = ast.copy_location(_helper_call("storable", [node.value]), node.value)
            return node
        raise AssertionError(kind)  # pragma: no cover - kinds are this module's own


def _helper_attr(name: str) -> ast.Attribute:
    return ast.Attribute(value=ast.Name(id=HELPER, ctx=ast.Load()), attr=name, ctx=ast.Load())


def _helper_call(name: str, args: list[ast.expr]) -> ast.Call:
    return ast.Call(func=_helper_attr(name), args=args, keywords=[])


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Any, Any] = {}

    def find(self, x: Any) -> Any:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: Any, b: Any) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self.parent[ra] = rb
        return True


def analyse(model: nn.Module) -> Plan:
    """Follow complex values through ``model``'s code and plan the rewrite (nothing is changed here)."""
    return _Analysis(model).run()


class _Analysis:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.paths = {id(m): p for p, m in model.named_modules()}
        self.contexts: dict[tuple, _Context] = {}
        self.changed = False
        self.groups = _UnionFind()
        self.fns: dict[int, types.FunctionType] = {}
        self.sites: dict[int, dict[tuple, tuple[str, str]]] = {}
        self.issues: dict[tuple, tuple[types.FunctionType, int, str]] = {}
        self.attr_flags: dict[tuple[int, str], frozenset] = {}
        self.owners: dict[int, Any] = {}
        self.reads: set[tuple[str, tuple]] = set()
        """(file, node key) of every attribute access resolved to its owner (a rewritten copy keeps both)."""
        self.unresolved: dict[str, dict[tuple, tuple[types.FunctionType, ast.AST]]] = {}
        """attribute name -> accesses on a value whose objects are unknown."""
        self.makers: set[tuple[int, tuple]] = set()

    # -- driver -------------------------------------------------------------------------------------------------
    def run(self) -> Plan:
        methods = [(fn, name, [m for _, m in inst]) for fn, name, inst in reachable.methods_by_function(self.model)]
        methods = [m for m in methods if reachable.runs_in_step(m[1]) or not m[1].startswith("__")]
        for fn, _, instances in methods:
            if any(m is self.model for m in instances):
                self._entry(fn, tuple(instances))
        self._fixpoint()
        while True:  # methods nothing calls (that the analysis can see) are called from outside
            reached = {c.fn for c in self.contexts.values()}
            new = [(fn, inst) for fn, _, inst in methods if fn not in reached]
            if not new:
                break
            for fn, instances in new:
                self._entry(fn, tuple(instances))
            self._fixpoint()
        self._check_other_accesses()
        return self._plan()

    def _entry(self, fn: types.FunctionType, selves: tuple) -> None:
        ctx = self._context(fn, selves)
        if ctx is None:
            return
        ctx.entry = True
        params = list(inspect.signature(fn).parameters)[1:]
        self._bind_params(ctx, {p: OUTSIDE for p in params})

    def _context(self, fn: types.FunctionType, selves: tuple) -> _Context | None:
        """The context of ``fn`` run by ``selves``; a setup method (``init_weights``) does not follow helpers, as
        ``passes._common.rewrite_methods`` does not redirect its helper calls."""
        follows_helpers = not selves or reachable.runs_in_step(fn.__name__)
        key = (id(fn), frozenset(id(s) for s in selves))
        ctx = self.contexts.get(key)
        if ctx is None:
            try:
                tree = sr.function_tree(fn)
            except sr.Unrewritable:
                return None
            ctx = _Context(fn, tree, selves, follows_helpers)
            self.contexts[key] = ctx
            self.fns[id(fn)] = fn
            self.changed = True
        return ctx

    def _bind_params(self, ctx: _Context, values: dict[str, Val]) -> None:
        for name, value in values.items():
            old = ctx.params.get(name, NONE)
            new = join(old, value) if name in ctx.params else value
            if new != old or name not in ctx.params:
                ctx.params[name] = new
                self.changed = True

    def _fixpoint(self) -> None:
        for _ in range(50):
            self.changed = False
            for ctx in list(self.contexts.values()):
                _Interpreter(self, ctx).run()
            if not self.changed:
                return
        raise RuntimeError("complex-flow analysis did not converge")  # pragma: no cover - monotone lattice

    # -- what the interpreter records ---------------------------------------------------------------------------
    def site(self, fn: types.FunctionType, node: ast.AST, kind: str, name: str) -> None:
        edits = self.sites.setdefault(id(fn), {})
        if node_key(node) not in edits:
            edits[node_key(node)] = (kind, name)
            self.changed = True
        self.groups.find(("fn", id(fn)))

    def issue(self, fn: types.FunctionType, node: ast.AST, reason: str) -> None:
        key = (id(fn), getattr(node, "lineno", 0), reason)
        if key not in self.issues:
            self.issues[key] = (fn, getattr(node, "lineno", fn.__code__.co_firstlineno), reason)
            self.changed = True
        self.groups.find(("fn", id(fn)))

    def connect(self, a: Any, b: Any) -> None:
        if self.groups.union(a, b):
            self.changed = True

    def attr_val(self, owner: Any, name: str) -> frozenset:
        return self.attr_flags.get((id(owner), name), frozenset())

    def attr_join(self, owner: Any, name: str, flags: frozenset) -> None:
        key = (id(owner), name)
        old = self.attr_flags.get(key, frozenset())
        if not flags <= old:
            self.attr_flags[key] = old | flags
            self.owners[id(owner)] = owner
            self.changed = True

    def returned(self, ctx: _Context, value: Val) -> None:
        new = join(ctx.returns, value) if ctx.returns != NONE else value
        if new != ctx.returns:
            ctx.returns = new
            self.changed = True

    # -- after the fixpoint -------------------------------------------------------------------------------------
    def _check_other_accesses(self) -> None:
        """A converted attribute must be read only where the rewrite wraps it: report every other access."""
        paired = {name for (_, name), flags in self.attr_flags.items() if C in flags}
        for name in sorted(paired):
            for fn, node in self.unresolved.get(name, {}).values():
                self.issue(fn, node, f"accesses `.{name}` on a value graphfix cannot trace to its module, while "
                           f"`.{name}` holds a complex table graphfix would convert")
                for (oid, attr), flags in self.attr_flags.items():
                    if attr == name and C in flags:
                        self.connect(("fn", id(fn)), ("attr", oid, attr))
        for (oid, name), flags in list(self.attr_flags.items()):
            if C not in flags:
                continue
            for fn, node in _class_code_accesses(type(self.owners[oid]), name):
                if (fn.__code__.co_filename, node_key(node)) not in self.reads and fn.__name__ != "__init__":
                    self.issue(fn, node, f"reads `.{name}` in code graphfix does not rewrite (a property, static "
                               "or class method), while it holds a complex table graphfix would convert")
                    self.connect(("fn", id(fn)), ("attr", oid, name))

    def _plan(self) -> Plan:
        plan = Plan(complex_sites=len(self.makers))
        blocked: dict[Any, list[tuple[types.FunctionType, int, str]]] = {}
        for fn, line, reason in self.issues.values():
            blocked.setdefault(self.groups.find(("fn", id(fn))), []).append((fn, line, reason))
        members: dict[Any, list[str]] = {}
        for fid, fn in self.fns.items():
            if fid in self.sites or any(i[0] is fn for i in self.issues.values()):
                members.setdefault(self.groups.find(("fn", fid)), []).append(fn.__qualname__)
        for root, found in blocked.items():
            others = sorted(set(members.get(root, [])))
            tail = f"; left unchanged with the complex code connected to it ({', '.join(others)})" if others else ""
            for fn, line, reason in sorted(found, key=lambda f: (f[0].__code__.co_filename, f[1])):
                plan.skipped.append((f"{display_path(fn.__code__.co_filename)}:{line} {fn.__qualname__}",
                                     reason + tail))
        for fid, edits in self.sites.items():
            if self.groups.find(("fn", fid)) not in blocked:
                plan.sites[fid] = edits
        for (oid, name), flags in self.attr_flags.items():
            if C not in flags or self.groups.find(("attr", oid, name)) in blocked:
                continue
            owner = self.owners[oid]
            value = getattr(owner, name, None)
            if isinstance(value, torch.Tensor) and value.is_complex():
                plan.storage.append((self.paths.get(oid, "?"), owner, name))
            elif name not in pc.paired_names(owner):
                plan.marks.append((owner, name))
        return plan


def _class_code_accesses(cls: type, name: str) -> Iterable[tuple[types.FunctionType, ast.AST]]:
    """``(function, node)`` of every ``.name`` in the user code of ``cls`` (methods, properties, static methods)."""
    for klass in cls.__mro__:
        if klass is object or klass.__module__.startswith(("torch.", "graphfix.")) or klass is nn.Module:
            continue
        for attr in vars(klass).values():
            fns = [attr]
            if isinstance(attr, property):
                fns = [attr.fget, attr.fset]
            elif isinstance(attr, (staticmethod, classmethod)):
                fns = [attr.__func__]
            for fn in fns:
                if not isinstance(fn, types.FunctionType):
                    continue
                try:
                    tree = sr.function_tree(fn)
                except sr.Unrewritable:
                    continue
                for node in ast.walk(tree):
                    if isinstance(node, ast.Attribute) and node.attr == name:
                        yield fn, node


class _Interpreter:
    """Runs one context's body over abstract values, flow-sensitively (branches join, loops run twice)."""

    def __init__(self, analysis: _Analysis, ctx: _Context) -> None:
        self.a = analysis
        self.ctx = ctx
        self.fn = ctx.fn
        self.me = ("fn", id(ctx.fn))

    # -- statements ---------------------------------------------------------------------------------------------
    def run(self) -> None:
        env: dict[str, Val] = {}
        args = list(inspect.signature(self.fn).parameters)
        if self.ctx.selves:
            env[args[0]] = Val(objs=self.ctx.selves)
        env.update(self.ctx.params)
        if self.ctx.tree.decorator_list or any(sr._is_private(n) for n in ast.walk(self.ctx.tree)):
            self.blocked_reason = True
        else:
            self.blocked_reason = False
        self.block(self.ctx.tree.body, env)
        if self.blocked_reason and id(self.fn) in self.a.sites:
            self.a.issue(self.fn, self.ctx.tree, "is decorated or uses a class-private name: graphfix cannot "
                         "recompile it")
        if self.ctx.entry and self.ctx.returns.is_complex:
            self.a.issue(self.fn, self.ctx.tree, "returns a complex value to a caller outside the model")

    def block(self, stmts: list[ast.stmt], env: dict[str, Val]) -> dict[str, Val]:
        for stmt in stmts:
            env = self.stmt(stmt, env)
        return env

    def stmt(self, node: ast.stmt, env: dict[str, Val]) -> dict[str, Val]:
        if isinstance(node, ast.Assign):
            value = self.expr(node.value, env)
            for target in node.targets:
                self.assign(target, value, env, node)
        elif isinstance(node, ast.AnnAssign):
            if node.value is not None:
                self.assign(node.target, self.expr(node.value, env), env, node)
        elif isinstance(node, ast.AugAssign):
            value = self.expr(node.value, env)
            current = self.expr(_as_load(node.target), env)
            if value.is_complex or current.is_complex:
                self.a.issue(self.fn, node, "in-place arithmetic on a complex value (`x *= ...`): the paired form "
                             "would not write through to what `x` aliases; write `x = x * ...`")
            if isinstance(node.target, ast.Name):
                env[node.target.id] = Val(value.all_flags | current.all_flags)
        elif isinstance(node, ast.Return):
            self.a.returned(self.ctx, self.expr(node.value, env) if node.value is not None else NONE)
        elif isinstance(node, ast.If):
            self.truth(node.test, env)
            env = self.join_envs(self.block(node.body, dict(env)), self.block(node.orelse, dict(env)))
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            items = self.iterate(node.iter, env)
            before = dict(env)
            for _ in range(2):
                self.assign(node.target, items, env, node)
                env = self.join_envs(before, self.block(node.body, dict(env)))
            env = self.block(node.orelse, env)
        elif isinstance(node, ast.While):
            before = dict(env)
            for _ in range(2):
                self.truth(node.test, env)
                env = self.join_envs(before, self.block(node.body, dict(env)))
            env = self.block(node.orelse, env)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                value = self.expr(item.context_expr, env)
                self.no_complex(value, item.context_expr, "is used as a context manager")
                if item.optional_vars is not None:
                    self.assign(item.optional_vars, Val(value.flags & {U}), env, node)
            env = self.block(node.body, env)
        elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            after = self.block(node.body, dict(env))
            for handler in node.handlers:
                after = self.join_envs(after, self.block(handler.body, self.join_envs(env, after)))
            env = self.block(node.finalbody, self.block(node.orelse, after))
        elif isinstance(node, ast.Expr):
            self.expr(node.value, env)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self.closure(node, env)
            env[node.name] = NONE
        elif isinstance(node, ast.Assert):
            self.truth(node.test, env)
        elif isinstance(node, ast.Delete):
            for target in node.targets:
                if isinstance(target, ast.Attribute):
                    self.expr(target.value, env)
        elif isinstance(node, ast.Raise):
            for part in (node.exc, node.cause):
                if part is not None:
                    self.expr(part, env)
        elif isinstance(node, ast.Match):
            self.expr(node.subject, env)
            out = None
            for case in node.cases:
                branch = self.block(case.body, dict(env))
                out = branch if out is None else self.join_envs(out, branch)
            env = out if out is not None else env
        return env

    def join_envs(self, a: dict[str, Val], b: dict[str, Val]) -> dict[str, Val]:
        out = dict(a)
        for name, value in b.items():
            out[name] = join(out[name], value) if name in out else value
        return out

    def assign(self, target: ast.expr, value: Val, env: dict[str, Val], stmt: ast.AST) -> None:
        if isinstance(target, ast.Name):
            env[target.id] = value
        elif isinstance(target, (ast.Tuple, ast.List)):
            if value.items is not None and len(value.items) == len(target.elts) and not any(
                    isinstance(e, ast.Starred) for e in target.elts):
                for elt, item in zip(target.elts, value.items):
                    self.assign(elt, item, env, stmt)
                return
            if value.is_complex:
                self.a.issue(self.fn, stmt, "unpacks a complex value (iterates over it)")
            n = len(target.elts)
            for i, elt in enumerate(target.elts):
                sub = Val(value.all_flags & {U})
                if value.objs is not None and not isinstance(elt, ast.Starred):
                    picked = [o[i] for o in value.objs if isinstance(o, (tuple, list)) and len(o) == n]
                    sub = Val(sub.flags, tuple(picked)) if picked else sub
                self.assign(elt.value if isinstance(elt, ast.Starred) else elt, sub, env, stmt)
        elif isinstance(target, ast.Attribute):
            self.store_attribute(target, value, env, stmt)
        elif isinstance(target, ast.Subscript):
            self.expr(target.value, env)
            self.index(target.slice, env)
            self.no_complex(value, stmt, "is written into a tensor or container (`x[...] = ...`)")
        elif isinstance(target, ast.Starred):
            self.assign(target.value, value, env, stmt)

    def store_attribute(self, target: ast.Attribute, value: Val, env: dict[str, Val], stmt: ast.AST) -> None:
        base = self.expr(target.value, env)
        if base.objs is None:
            self.a.unresolved.setdefault(target.attr, {})[(id(self.fn), node_key(target))] = (self.fn, target)
            self.no_complex(value, stmt, f"is stored in `.{target.attr}` of a value graphfix cannot trace")
            return
        self.a.reads.add((self.fn.__code__.co_filename, node_key(target)))
        owners = [o for o in base.objs if o is not None]
        paired = False
        for owner in owners:
            if value.is_complex:
                if not isinstance(owner, nn.Module):
                    self.a.issue(self.fn, stmt, f"stores a complex value in `.{target.attr}` of a "
                                 f"{type(owner).__name__}, not a module")
                    continue
                if isinstance(owner._parameters.get(target.attr), nn.Parameter):
                    self.a.issue(self.fn, stmt, f"stores a complex value in the parameter `.{target.attr}`")
                    continue
                self.a.attr_join(owner, target.attr, frozenset({C}))
            if C in self.a.attr_val(owner, target.attr):
                paired = True
                self.a.connect(self.me, ("attr", id(owner), target.attr))
        if paired and isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and not self.is_call_to(
                stmt.value, pc.storable):
            self.a.site(self.fn, stmt, "store", "storable")
        elif paired and not isinstance(stmt, ast.Assign):
            self.a.issue(self.fn, stmt, f"writes `.{target.attr}` (a complex table) in a form graphfix does not "
                         "rewrite (only `self.x = value`)")
        elif paired and isinstance(stmt, ast.Assign) and len(stmt.targets) != 1:
            self.a.issue(self.fn, stmt, f"writes `.{target.attr}` (a complex table) in a chained assignment")

    def closure(self, node: ast.AST, env: dict[str, Val]) -> None:
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        if any(env.get(name, NONE).is_complex for name in used):
            self.a.issue(self.fn, node, "a nested function or lambda uses a complex value")

    def truth(self, test: ast.expr, env: dict[str, Val]) -> None:
        value = self.expr(test, env)
        self.no_complex(value, test, "is used as a truth value")

    # -- expressions --------------------------------------------------------------------------------------------
    def expr(self, node: ast.expr, env: dict[str, Val]) -> Val:
        method = getattr(self, "e_" + type(node).__name__, None)
        if method is None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.expr):
                    self.no_complex(self.expr(child, env), node, f"is used in a `{type(node).__name__}` expression")
            return NONE
        return method(node, env)

    def e_Constant(self, node: ast.Constant, env: dict[str, Val]) -> Val:
        return Val(frozenset({"j"})) if isinstance(node.value, complex) else Val(objs=(node.value,))

    def e_Name(self, node: ast.Name, env: dict[str, Val]) -> Val:
        if node.id in env:
            return env[node.id]
        obj = sr.resolve(self.fn, node)
        return self.outside_object(obj, node)

    def outside_object(self, obj: Any, node: ast.AST) -> Val:
        """A global, closure or module attribute: complex tensors there are not the model's to convert."""
        if obj is sr.MISSING:
            return NONE
        if isinstance(obj, torch.dtype) and obj in _COMPLEX_DTYPES:
            self.a.issue(self.fn, node, f"uses the complex dtype {obj}: graphfix pairs only values made by "
                         "view_as_complex, polar and complex")
            self.a.makers.add((id(self.fn), node_key(node)))
            return NONE
        if isinstance(obj, torch.Tensor):
            if obj.is_complex():
                self.a.issue(self.fn, node, "reads a complex tensor from a global or closure variable")
                self.a.makers.add((id(self.fn), node_key(node)))
            return NONE
        return Val(objs=(obj,))

    def e_Attribute(self, node: ast.Attribute, env: dict[str, Val], wrap: bool = True) -> Val:
        resolved = sr.resolve(self.fn, node)
        if resolved is not sr.MISSING:
            return self.outside_object(resolved, node)
        base = self.expr(node.value, env)
        if base.is_complex:
            if node.attr in _REAL_ATTRS:
                return NONE
            self.a.issue(self.fn, node, f"`.{node.attr}` of a complex value: not in graphfix's paired form")
            return NONE
        if base.objs is None:
            self.a.unresolved.setdefault(node.attr, {})[(id(self.fn), node_key(node))] = (self.fn, node)
            return OUTSIDE if U in base.all_flags and node.attr not in _INFO_ATTRS else NONE
        return self.read_attribute(node, base, wrap)

    def read_attribute(self, node: ast.Attribute, base: Val, wrap: bool) -> Val:
        name = node.attr
        self.a.reads.add((self.fn.__code__.co_filename, node_key(node)))
        results: list[Val] = []
        paired = []
        for owner in base.objs:
            kind, value = _lookup(owner, name)
            if kind == "method":
                results.append(Val(objs=(value,)))
                continue
            if kind == "unknown":
                results.append(OUTSIDE)
                continue
            if kind == "static":
                if _uses_complex(value):
                    self.a.issue(self.fn, node, f"calls {value.__qualname__}, a static or class method with complex "
                                 "ops: graphfix rewrites methods and module-level helpers, not these")
                results.append(OUTSIDE)
                continue
            if isinstance(value, nn.Parameter) and value.is_complex():
                self.a.issue(self.fn, node, f"reads the complex parameter `.{name}`: learned complex weights are "
                             "not converted")
                self.a.makers.add((id(self.fn), node_key(node)))
                results.append(NONE)
                continue
            if isinstance(value, torch.Tensor) and value.is_complex() and isinstance(owner, nn.Module):
                self.a.attr_join(owner, name, frozenset({C}))
                self.a.makers.add((id(self.fn), node_key(node)))
            elif isinstance(value, torch.Tensor) and value.is_complex():
                self.a.issue(self.fn, node, f"reads the complex tensor `.{name}` of a {type(owner).__name__}, "
                             "not a module")
            elif name in pc.paired_names(owner):
                self.a.attr_join(owner, name, frozenset({C}))
            elif _holds_complex(value):
                self.a.issue(self.fn, node, f"reads `.{name}`, a container of complex tensors")
            if isinstance(owner, nn.Module) and C in self.a.attr_val(owner, name):
                if isinstance(value, torch.Tensor) and not value.is_complex() and name not in pc.paired_names(owner):
                    self.a.issue(self.fn, node, f"`.{name}` holds a real tensor now and a complex value later")
                paired.append(owner)
                self.a.connect(self.me, ("attr", id(owner), name))
                results.append(COMPLEX)
                continue
            results.append(Val(objs=(value,)) if not isinstance(value, torch.Tensor) else NONE)
        if paired and len(paired) != len(base.objs):
            self.a.issue(self.fn, node, f"`.{name}` holds a complex table on some of the modules that run this code "
                         "and not on others")
        if paired and wrap:
            self.a.site(self.fn, node, "read", "stored")
        out = results[0] if results else NONE
        for r in results[1:]:
            out = join(out, r)
        return out

    def e_Subscript(self, node: ast.Subscript, env: dict[str, Val]) -> Val:
        base = self.expr(node.value, env)
        self.index(node.slice, env)
        if base.is_complex:
            return COMPLEX
        if base.objs is not None:
            elements = _elements(base.objs)
            if elements is not None:
                if any(_holds_complex(e) for e in elements):
                    self.a.issue(self.fn, node, "indexes a container of complex tensors")
                return Val(base.all_flags & {U}, tuple(e for e in elements if not isinstance(e, torch.Tensor))
                           or None)
        return Val(base.all_flags & {U})

    def index(self, node: ast.expr, env: dict[str, Val]) -> None:
        value = self.expr(node, env)
        self.no_complex(value, node, "is used as an index")

    def e_Slice(self, node: ast.Slice, env: dict[str, Val]) -> Val:
        for part in (node.lower, node.upper, node.step):
            if part is not None:
                self.no_complex(self.expr(part, env), node, "is used in a slice")
        return NONE

    def e_Tuple(self, node: ast.Tuple, env: dict[str, Val]) -> Val:
        items = []
        for elt in node.elts:
            value = self.expr(elt.value if isinstance(elt, ast.Starred) else elt, env)
            if isinstance(elt, ast.Starred):
                self.no_complex(value, elt, "is unpacked with `*`")
            items.append(value)
        return Val(items=tuple(items))

    def e_List(self, node: ast.List, env: dict[str, Val]) -> Val:
        flags = frozenset()
        for elt in node.elts:
            value = self.expr(elt, env)
            self.no_complex(value, elt, "is put in a list")
            flags |= value.all_flags & {U}
        return Val(flags)

    e_Set = e_List

    def e_Dict(self, node: ast.Dict, env: dict[str, Val]) -> Val:
        for part in [*node.keys, *node.values]:
            if part is not None:
                self.no_complex(self.expr(part, env), part, "is put in a dict")
        return NONE

    def e_BinOp(self, node: ast.BinOp, env: dict[str, Val]) -> Val:
        left, right = self.expr(node.left, env), self.expr(node.right, env)
        op = _BINOPS.get(type(node.op))
        if not (left.is_complex or right.is_complex):
            if "j" in left.all_flags | right.all_flags:
                self.a.makers.add((id(self.fn), node_key(node)))
                if left.all_flags | right.all_flags - {"j"}:
                    self.a.issue(self.fn, node, "a Python complex constant times a tensor (e.g. `1j * theta`) "
                                 "makes a complex tensor graphfix does not pair: use torch.polar")
                return Val(frozenset({"j"}) if not (left.all_flags | right.all_flags) - {"j"} else NONE)
            return Val((left.all_flags | right.all_flags) & {U})
        if op is None or (op == "truediv" and right.is_complex):
            self.a.issue(self.fn, node, f"`{_op_text(node.op)}` on a complex value: not in graphfix's paired form")
            return COMPLEX
        for side in (left, right):
            if U in side.all_flags and not side.is_complex:
                self.a.issue(self.fn, node, f"combines a complex value with `{ast.unparse(_other(node, left))}`, "
                             "which comes from outside the model (an argument, a property or an unknown call) and "
                             "may itself be complex: pass it as a module attribute or build it inside the model")
        self.a.site(self.fn, node, "binop", op)
        return COMPLEX

    def e_UnaryOp(self, node: ast.UnaryOp, env: dict[str, Val]) -> Val:
        value = self.expr(node.operand, env)
        if not value.is_complex:
            return Val(value.all_flags & {U, "j"})
        if isinstance(node.op, ast.USub):
            self.a.site(self.fn, node, "neg", "neg")
            return COMPLEX
        self.a.issue(self.fn, node, f"`{_op_text(node.op)}` on a complex value: not in graphfix's paired form")
        return NONE

    def e_BoolOp(self, node: ast.BoolOp, env: dict[str, Val]) -> Val:
        out = NONE
        for value in node.values:
            v = self.expr(value, env)
            self.no_complex(v, value, "is used as a truth value")
            out = join(out, v)
        return out

    def e_Compare(self, node: ast.Compare, env: dict[str, Val]) -> Val:
        values = [self.expr(node.left, env)] + [self.expr(c, env) for c in node.comparators]
        identity = all(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops)
        if not identity:
            for v, part in zip(values, [node.left, *node.comparators]):
                self.no_complex(v, part, "is compared")
        return NONE

    def e_IfExp(self, node: ast.IfExp, env: dict[str, Val]) -> Val:
        self.truth(node.test, env)
        return join(self.expr(node.body, env), self.expr(node.orelse, env))

    def e_NamedExpr(self, node: ast.NamedExpr, env: dict[str, Val]) -> Val:
        value = self.expr(node.value, env)
        self.assign(node.target, value, env, node)
        return value

    def e_Starred(self, node: ast.Starred, env: dict[str, Val]) -> Val:
        return self.expr(node.value, env)

    def e_JoinedStr(self, node: ast.JoinedStr, env: dict[str, Val]) -> Val:
        for value in node.values:
            if isinstance(value, ast.FormattedValue):
                self.no_complex(self.expr(value.value, env), value, "is formatted into a string")
        return NONE

    def e_Lambda(self, node: ast.Lambda, env: dict[str, Val]) -> Val:
        self.closure(node, env)
        return NONE

    def comprehension(self, node: ast.AST, env: dict[str, Val], elts: list[ast.expr]) -> Val:
        inner = dict(env)
        for gen in node.generators:
            items = self.iterate(gen.iter, inner)
            self.assign(gen.target, items, inner, node)
            for cond in gen.ifs:
                self.truth(cond, inner)
        flags = frozenset()
        for elt in elts:
            value = self.expr(elt, inner)
            self.no_complex(value, elt, "is collected by a comprehension")
            flags |= value.all_flags & {U}
        return Val(flags)

    def e_ListComp(self, node: ast.ListComp, env: dict[str, Val]) -> Val:
        return self.comprehension(node, env, [node.elt])

    e_SetComp = e_GeneratorExp = e_ListComp

    def e_DictComp(self, node: ast.DictComp, env: dict[str, Val]) -> Val:
        return self.comprehension(node, env, [node.key, node.value])

    def iterate(self, node: ast.expr, env: dict[str, Val]) -> Val:
        """The value of one element of what ``node`` iterates over."""
        value = self.expr(node, env)
        if value.is_complex:
            self.a.issue(self.fn, node, "iterates over a complex value")
            return NONE
        elements = _elements(value.objs) if value.objs is not None else None
        if elements is None:
            return Val(value.all_flags & {U})
        if any(_holds_complex(e) for e in elements):
            self.a.issue(self.fn, node, "iterates over complex tensors")
        return Val(value.all_flags & {U}, tuple(elements))

    # -- calls --------------------------------------------------------------------------------------------------
    def is_call_to(self, node: ast.AST, target: Any) -> bool:
        return isinstance(node, ast.Call) and sr.resolve(self.fn, node.func) is target

    def e_Call(self, node: ast.Call, env: dict[str, Val]) -> Val:
        target = sr.resolve(self.fn, node.func)
        if target is pc.stored:
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Attribute):
                self.e_Attribute(arg, env, wrap=False)
            return COMPLEX
        args = [self.expr(a, env) for a in node.args]
        kwargs = {k.arg: self.expr(k.value, env) for k in node.keywords}
        everything = args + list(kwargs.values())
        tid = id(target)
        if tid in _TORCH_MAKERS or tid in _TORCH_READERS or tid in _OWN_MAKERS or tid in _OWN_READERS:
            return self.complex_call(node, target, args, kwargs)
        if tid in _OWN_ARITH or target is pc.storable:
            return COMPLEX if target is not pc.storable and any(v.is_complex for v in everything) else NONE
        if tid in _SPECTRAL:
            self.a.makers.add((id(self.fn), node_key(node)))
            self.a.issue(self.fn, node, f"calls {_name(target)}: FFTs make complex values graphfix does not pair")
            return NONE
        if tid in _CONCRETE_BUILTINS:
            return self.call_objects(node, (target,), args, kwargs)
        if target is not sr.MISSING and reachable.user_function(target):
            return self.call_function(node, target, (), args, kwargs)
        if target is not sr.MISSING:
            return self.library_call(node, target, everything)
        if isinstance(node.func, ast.Attribute):
            base = self.expr(node.func.value, env)
            if base.is_complex:
                return self.complex_method(node, node.func.attr, args, kwargs)
            if base.objs is not None:
                return self.object_call(node, base, node.func.attr, args, kwargs)
            self.a.unresolved.setdefault(node.func.attr, {})[(id(self.fn), node_key(node.func))] = (self.fn, node.func)
            if node.func.attr in ("cfloat", "cdouble", "chalf"):
                self.a.makers.add((id(self.fn), node_key(node)))
                self.a.issue(self.fn, node, f"`.{node.func.attr}()` makes a complex tensor graphfix does not pair")
            return self.library_call(node, node.func.attr, [base, *everything])
        callee = self.expr(node.func, env)
        if callee.objs is not None:
            return self.call_objects(node, callee.objs, args, kwargs)
        return self.library_call(node, ast.unparse(node.func), everything, result=OUTSIDE)

    def complex_call(self, node: ast.Call, target: Any, args: list[Val], kwargs: dict[str, Val]) -> Val:
        """view_as_complex / polar / complex / view_as_real, torch's (rewritten here) or the stand-ins (earlier)."""
        tid = id(target)
        name = _TORCH_MAKERS.get(tid) or _TORCH_READERS.get(tid) or _OWN_MAKERS.get(tid) or _OWN_READERS[tid]
        everything = args + list(kwargs.values())
        self.a.makers.add((id(self.fn), node_key(node)))
        try:
            inspect.signature(getattr(pc, name)).bind(*args, **kwargs)
        except TypeError:
            self.a.issue(self.fn, node, f"calls {name} with arguments graphfix's stand-in does not take "
                         f"(`out=`, `*args`): {ast.unparse(node)}")
        if name == "view_as_real":
            value = everything[0] if everything else NONE
            if not value.is_complex:
                where = "from outside the model (an argument, a property or an unknown call)" if U in \
                    value.all_flags else "from code graphfix does not follow"
                self.a.issue(self.fn, node, f"`{ast.unparse(node)}` reads a complex value {where}")
            result = NONE
        else:
            for value in everything:
                self.no_complex(value, node, f"is passed to {name}")
            result = COMPLEX
        if tid in _TORCH_MAKERS or tid in _TORCH_READERS:
            self.a.site(self.fn, node, "call", name)
        return result

    def complex_method(self, node: ast.Call, name: str, args: list[Val], kwargs: dict[str, Val]) -> Val:
        everything = args + list(kwargs.values())
        if name in _SCALAR_METHODS:
            return NONE
        if name == "type_as":
            return COMPLEX if any(v.is_complex for v in everything) else NONE
        if name == "to":
            real_dtype = any(v.objs and all(isinstance(o, torch.dtype) and not o.is_complex for o in v.objs)
                             for v in everything)
            return NONE if real_dtype else COMPLEX
        if name in _STRUCTURAL:
            for value in everything:
                self.no_complex(value, node, f"is an argument of `.{name}()`")
            return COMPLEX
        self.a.issue(self.fn, node, f"`.{name}()` of a complex value: not in graphfix's paired form")
        return NONE

    def object_call(self, node: ast.Call, base: Val, name: str, args: list[Val], kwargs: dict[str, Val]) -> Val:
        """``obj.name(...)`` where the objects ``obj`` can be are known (modules, containers, helpers)."""
        callee = self.read_attribute(node.func, base, wrap=True)
        if callee.objs is not None and all(isinstance(o, (_Method, nn.Module)) for o in callee.objs):
            return self.call_objects(node, callee.objs, args, kwargs)
        if name in _CONCRETE_METHODS and all(isinstance(o, (nn.Module, dict)) for o in base.objs):
            return Val(objs=tuple(tuple(getattr(o, name)()) for o in base.objs))
        if callee.is_complex:
            self.a.issue(self.fn, node, f"calls `.{name}`, a complex value")
            return NONE
        return self.library_call(node, name, [*args, *kwargs.values()], result=OUTSIDE if U in callee.all_flags
                                 else None)

    def call_objects(self, node: ast.Call, objs: tuple, args: list[Val], kwargs: dict[str, Val]) -> Val:
        out: Val | None = None
        by_fn: dict[int, tuple[types.FunctionType, list]] = {}
        for obj in objs:
            if isinstance(obj, _Method):
                by_fn.setdefault(id(obj.fn), (obj.fn, []))[1].append(obj.obj)
            elif isinstance(obj, nn.Module):
                kind, forward = _lookup(obj, "forward")
                if kind == "method" and reachable.user_function(forward.fn):
                    by_fn.setdefault(id(forward.fn), (forward.fn, []))[1].append(obj)
                else:
                    value = self.library_call(node, f"{type(obj).__name__} module", [*args, *kwargs.values()])
                    out = value if out is None else join(out, value)
            elif isinstance(obj, types.FunctionType) and reachable.user_function(obj):
                value = self.call_function(node, obj, (), args, kwargs)
                out = value if out is None else join(out, value)
            elif id(obj) in _CONCRETE_BUILTINS and all(a.objs is not None for a in args):
                combos = itertools.islice(itertools.product(*(a.objs for a in args)), 64)
                value = Val(objs=tuple(tuple(obj(*c)) for c in combos))
                out = value if out is None else join(out, value)
            else:
                value = self.library_call(node, obj, [*args, *kwargs.values()])
                out = value if out is None else join(out, value)
        for fn, selves in by_fn.values():
            value = self.call_function(node, fn, tuple(selves), args, kwargs)
            out = value if out is None else join(out, value)
        return out if out is not None else NONE

    def call_function(self, node: ast.Call, fn: types.FunctionType, selves: tuple, args: list[Val],
                      kwargs: dict[str, Val]) -> Val:
        """A call into user code: bind the arguments to the callee's parameters and take its return value."""
        everything = args + list(kwargs.values())
        carries = any(v.is_complex for v in everything)
        if not selves and not self.ctx.follows_helpers:
            # graphfix rewrites the helpers a setup method (init_weights, ...) calls only through their other callers
            self.no_complex_args(node, everything, f"{fn.__qualname__} (called from a setup method, not rewritten)")
            return OUTSIDE
        ctx = self.a._context(fn, selves)
        if ctx is None:
            self.no_complex_args(node, everything, f"{fn.__qualname__} (its source is not available)")
            return OUTSIDE
        params = inspect.signature(fn).parameters
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            self.no_complex_args(node, everything, f"{fn.__qualname__} through *args/**kwargs")
            bound = {p: OUTSIDE for p in list(params)[1 if selves else 0:]}
        else:
            try:
                call_args = [Val(objs=selves)] + args if selves else args
                binding = inspect.signature(fn).bind(*call_args, **kwargs)
            except TypeError:
                self.no_complex_args(node, everything, f"{fn.__qualname__} with arguments that do not match it")
                return OUTSIDE
            bound = {}
            for name, value in binding.arguments.items():
                if selves and name == next(iter(params)):
                    continue
                kind = params[name].kind
                if kind is inspect.Parameter.VAR_POSITIONAL:
                    value = Val(items=tuple(value))
                elif kind is inspect.Parameter.VAR_KEYWORD:
                    value = Val(frozenset().union(*(v.all_flags for v in value.values())) if value else frozenset())
                bound[name] = value
        self.a._bind_params(ctx, bound)
        result = ctx.returns
        if carries or result.is_complex:
            self.a.connect(self.me, ("fn", id(fn)))
        return result

    def library_call(self, node: ast.Call, target: Any, values: list[Val], result: Val | None = None) -> Val:
        """A call into torch, the standard library or unknown code: complex values must not go there."""
        name = target if isinstance(target, str) else _name(target)
        if id(target) in _NEUTRAL_BUILTINS:
            return NONE
        self.no_complex_args(node, values, name)
        if result is not None:
            return result
        if isinstance(target, str) or _is_torch(target) or isinstance(target, (type, nn.Module)) \
                or getattr(builtins, getattr(target, "__name__", ""), None) is target:
            return Val(frozenset().union(*(v.all_flags for v in values)) & {U}) if values else NONE
        return OUTSIDE

    def no_complex_args(self, node: ast.Call, values: list[Val], callee: str) -> None:
        for value in values:
            if value.is_complex:
                self.a.issue(self.fn, node, f"passes a complex value to {callee}: not in graphfix's paired form")
                return

    def no_complex(self, value: Val, node: ast.AST, what: str) -> None:
        if value.is_complex:
            self.a.issue(self.fn, node, f"a complex value {what}: not in graphfix's paired form")


def _as_load(target: ast.expr) -> ast.expr:
    """The expression reading what ``target`` writes (for ``x += ...``)."""
    return ast.copy_location(type(target)(**{**{f: getattr(target, f) for f in target._fields}, "ctx": ast.Load()}),
                             target)


def _lookup(owner: Any, name: str) -> tuple[str, Any]:
    """What ``owner.name`` is, without running user code: ``("value", v)``, ``("method", _Method)`` or unknown."""
    if isinstance(owner, (types.ModuleType, type)):
        return "value", getattr(owner, name, None)
    instance = getattr(owner, "__dict__", {})
    if isinstance(owner, nn.Module):
        for table in ("_parameters", "_buffers", "_modules"):
            if name in owner.__dict__.get(table, {}):
                return "value", owner.__dict__[table][name]
    if name in instance:
        value = instance[name]
        if isinstance(value, types.MethodType) and isinstance(value.__func__, types.FunctionType):
            return "method", _Method(owner, value.__func__)
        return "value", value
    try:
        attr = inspect.getattr_static(type(owner), name)
    except AttributeError:
        return "unknown", None
    if isinstance(attr, types.FunctionType):
        if reachable.user_function(attr):
            return "method", _Method(owner, attr)
        return "value", types.MethodType(attr, owner)
    if isinstance(attr, (staticmethod, classmethod)) and reachable.user_function(attr.__func__):
        return "static", attr.__func__
    if hasattr(type(attr), "__get__"):  # properties and other descriptors run code: their value is unknown
        return "unknown", None
    return "value", attr


def _uses_complex(fn: types.FunctionType) -> bool:
    """Whether ``fn``'s own source calls torch's complex makers or readers."""
    try:
        tree = sr.function_tree(fn)
    except sr.Unrewritable:
        return False
    wanted = set(_TORCH_MAKERS) | set(_TORCH_READERS)
    return any(isinstance(n, ast.Call) and id(sr.resolve(fn, n.func)) in wanted for n in ast.walk(tree))


def _elements(objs: tuple) -> list | None:
    """The elements of the containers ``objs`` can be (module lists, lists, tuples, dict values); else None."""
    out = []
    for obj in objs:
        if isinstance(obj, (nn.ModuleList, nn.Sequential)):
            out.extend(obj)
        elif isinstance(obj, (nn.ModuleDict, nn.ParameterDict)):
            out.extend(obj.keys())
        elif isinstance(obj, (list, tuple)):
            out.extend(obj)
        elif isinstance(obj, dict):
            out.extend(obj.keys())
        else:
            return None
    return out


def _holds_complex(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_complex()
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, torch.Tensor) and v.is_complex() for v in value)
    if isinstance(value, dict):
        return any(isinstance(v, torch.Tensor) and v.is_complex() for v in value.values())
    return False


def _is_torch(obj: Any) -> bool:
    module = getattr(obj, "__module__", None) or getattr(type(obj), "__module__", "")
    return module.partition(".")[0] == "torch"


def _name(obj: Any) -> str:
    module = getattr(obj, "__module__", None)
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__name__
    if module in (None, "builtins", "torch._C._VariableFunctions"):
        module = "torch" if _is_torch(obj) and module != "builtins" else module
    return f"{module}.{name}" if module and module != "builtins" else name


def _op_text(op: ast.AST) -> str:
    return {ast.MatMult: "@", ast.Pow: "**", ast.Mod: "%", ast.FloorDiv: "//", ast.Div: "/", ast.Invert: "~",
            ast.Not: "not", ast.UAdd: "+", ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.LShift: "<<",
            ast.RShift: ">>"}.get(type(op), type(op).__name__)


def _other(node: ast.BinOp, left: Val) -> ast.expr:
    """The operand of ``node`` that is not the complex one."""
    return node.right if left.is_complex else node.left
