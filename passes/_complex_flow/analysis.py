"""The whole-model analysis: which functions run with which ``self``, a fixpoint over them, and the groups.

Every user method of the root module is an entry (its arguments come from outside); so is
every other method nothing visibly calls. Calls found while interpreting a function add
contexts (the callee with the modules it runs on) and bind their arguments; the functions
are interpreted again until no parameter, return value or attribute changes (the values
only grow, so this ends). Complex values that cross a call, a return or a module attribute
put both sides in one group; a group with an issue is left alone as a whole.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import types
from typing import Any

import torch
from torch import nn

from graphfix.diagnose.findings import display_path
from graphfix.rewrite import grad_modes, reachable
from graphfix.rewrite.blocks import paired_complex as pc
from graphfix.rewrite.blocks import source_rewrite as sr
from passes._complex_flow import objects
from passes._complex_flow.interpreter import Interpreter
from passes._complex_flow.plan import Edits, Plan
from passes._complex_flow.relevance import Relevance
from passes._complex_flow.values import NONE, C, Val, join, node_key, outside

_MAX_ROUNDS = 50


@dataclasses.dataclass
class Context:
    """One function interpreted with one set of ``self`` objects (``()`` for a helper)."""

    fn: types.FunctionType
    tree: ast.FunctionDef
    selves: tuple
    follows_helpers: bool
    """Whether its calls to module-level helpers reach their rewritten copies (not in setup methods)."""
    params: dict[str, Val] = dataclasses.field(default_factory=dict)
    returns: Val | None = None
    """What its ``return`` statements gave so far (``None``: none ran yet)."""
    entry: bool = False

    @property
    def result(self) -> Val:
        return NONE if self.returns is None else self.returns


class _Groups:
    """Union-find over ``("fn", id)`` and ``("attr", id(owner), name)``."""

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
    """Follow complex values through ``model``'s code and plan the rewrite; nothing is changed here."""
    return Analysis(model).run()


class Analysis:
    """The state the interpreters share: contexts, edits, issues, module attributes that hold complex values."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.paths = {id(m): p for p, m in model.named_modules()}
        self.contexts: dict[tuple, Context] = {}
        self.changed = False
        self.groups = _Groups()
        self.fns: dict[int, types.FunctionType] = {}
        self.sites: dict[int, Edits] = {}
        self.issues: dict[tuple, tuple[types.FunctionType, int, str]] = {}
        self.attr_flags: dict[tuple[int, str], frozenset] = {}
        self.owners: dict[int, Any] = {}
        self.reads: set[tuple[str, tuple]] = set()
        """(file, node key) of each attribute access traced to its module (a rewritten copy keeps both)."""
        self.unresolved: dict[str, dict[tuple, tuple[types.FunctionType, ast.AST]]] = {}
        """attribute name -> accesses on a value whose objects are unknown."""
        self.makers: set[tuple[int, tuple]] = set()
        self.relevance = Relevance(model)

    # -- driver -------------------------------------------------------------------------------------------------
    def run(self) -> Plan:
        if not self.relevance.any:
            return Plan()
        methods = [(grad_modes.without_grad_mode_decorators(fn), tuple(m for _, m in inst))
                   for fn, name, inst in reachable.methods_by_function(self.model)
                   if (reachable.runs_in_step(name) or not name.startswith("__"))
                   and any(self.relevance.module(m) for _, m in inst)]
        tried: set[int] = set()
        entries = [(fn, inst) for fn, inst in methods if any(m is self.model for m in inst)]
        while entries:  # first the root's methods, then the methods nothing visibly calls: called from outside
            for fn, instances in entries:
                tried.add(id(fn))
                self._entry(fn, instances)
            self._fixpoint()
            reached = tried | {id(c.fn) for c in self.contexts.values()}
            entries = [(fn, inst) for fn, inst in methods if id(fn) not in reached]
        self._check_other_accesses()
        return self._plan()

    def _entry(self, fn: types.FunctionType, selves: tuple) -> None:
        ctx = self.context(fn, selves)
        if ctx is None:
            return
        ctx.entry = True
        params = list(inspect.signature(fn).parameters)[1:]
        self.bind_params(ctx, {p: outside(f"argument `{p}` of {fn.__qualname__}") for p in params})

    def _fixpoint(self) -> None:
        for _ in range(_MAX_ROUNDS):
            self.changed = False
            for ctx in list(self.contexts.values()):
                try:
                    Interpreter(self, ctx).run()
                except Exception as exc:  # noqa: BLE001 - code graphfix cannot analyse is reported, never rewritten
                    self.issue(ctx.fn, ctx.tree, f"graphfix could not analyse it ({type(exc).__name__}: {exc})")
            if not self.changed:
                return
        raise RuntimeError("complex-flow analysis did not converge")  # pragma: no cover - values only grow

    # -- what interpreters record -------------------------------------------------------------------------------
    def follows(self, fn: types.FunctionType, selves: tuple) -> bool:
        """Whether a call into ``fn`` (run by ``selves``) can matter when no complex value is passed to it."""
        return any(self.relevance.module(s) for s in selves) if selves else self.relevance.function(fn)

    def context(self, fn: types.FunctionType, selves: tuple) -> Context | None:
        """The context of ``fn`` run by ``selves``, made on first use; ``None`` without source. Grad-mode decorators
        are seen through, as ``ReachableRewriter`` does. A setup method (``init_weights``) does not follow helpers:
        ``rewrite_methods`` does not redirect its helper calls."""
        fn = grad_modes.without_grad_mode_decorators(fn)  # what the rewriter shows the transform
        key = (id(fn), frozenset(id(s) for s in selves))
        ctx = self.contexts.get(key)
        if ctx is None:
            try:
                tree = sr.function_tree(fn)
            except sr.Unrewritable:
                return None
            ctx = Context(fn, tree, selves, follows_helpers=not selves or reachable.runs_in_step(fn.__name__))
            self.contexts[key] = ctx
            self.fns[id(fn)] = fn
            self.changed = True
        return ctx

    def bind_params(self, ctx: Context, values: dict[str, Val]) -> None:
        for name, value in values.items():
            new = join(ctx.params[name], value) if name in ctx.params else value
            if ctx.params.get(name) != new:
                ctx.params[name] = new
                self.changed = True

    def returned(self, ctx: Context, value: Val) -> None:
        new = value if ctx.returns is None else join(ctx.returns, value)
        if new != ctx.returns:
            ctx.returns = new
            self.changed = True

    def site(self, fn: types.FunctionType, node: ast.AST, kind: str, name: str) -> None:
        edits = self.sites.setdefault(id(fn), {})
        if node_key(node) not in edits:
            edits[node_key(node)] = (kind, name)
            self.changed = True

    def issue(self, fn: types.FunctionType, node: ast.AST, reason: str) -> None:
        line = getattr(node, "lineno", fn.__code__.co_firstlineno)
        key = (id(fn), line, reason)
        if key not in self.issues:
            self.issues[key] = (fn, line, reason)
            self.fns[id(fn)] = fn
            self.changed = True

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

    def access(self, fn: types.FunctionType, node: ast.AST) -> None:
        """An attribute access traced to its module."""
        self.reads.add((fn.__code__.co_filename, node_key(node)))

    def unresolved_access(self, fn: types.FunctionType, node: ast.AST, name: str) -> None:
        self.unresolved.setdefault(name, {})[(id(fn), node_key(node))] = (fn, node)

    def maker(self, fn: types.FunctionType, node: ast.AST) -> None:
        self.makers.add((id(fn), node_key(node)))

    # -- after the fixpoint -------------------------------------------------------------------------------------
    def _check_other_accesses(self) -> None:
        """A converted attribute must be read only where the rewrite wraps it: report every other access."""
        complex_attrs = [(oid, name) for (oid, name), flags in self.attr_flags.items() if C in flags]
        for oid, name in complex_attrs:
            for fn, node in self.unresolved.get(name, {}).values():
                self.issue(fn, node, f"accesses `.{name}` on a value graphfix cannot trace to its module, while "
                           f"`.{name}` of {self._where(oid)} holds a complex table graphfix would convert")
                self.connect(("fn", id(fn)), ("attr", oid, name))
            for fn, node in objects.class_code_accesses(type(self.owners[oid]), name):
                if (fn.__code__.co_filename, node_key(node)) not in self.reads and fn.__name__ != "__init__":
                    self.issue(fn, node, f"reads `.{name}` in code graphfix does not rewrite (a property, static or "
                               "class method), while it holds a complex table graphfix would convert")
                    self.connect(("fn", id(fn)), ("attr", oid, name))

    def _where(self, oid: int) -> str:
        path = self.paths.get(oid)
        return "the root module" if path == "" else f"`{path}`" if path else type(self.owners[oid]).__name__

    def _plan(self) -> Plan:
        plan = Plan(complex_sites=len(self.makers))
        blocked: dict[Any, list[tuple[types.FunctionType, int, str]]] = {}
        for fn, line, reason in self.issues.values():
            blocked.setdefault(self.groups.find(("fn", id(fn))), []).append((fn, line, reason))
        members: dict[Any, set[str]] = {}
        for fid, fn in self.fns.items():
            if fid in self.sites or any(i[0] is fn for i in self.issues.values()):
                members.setdefault(self.groups.find(("fn", fid)), set()).add(fn.__qualname__)
        for root, found in blocked.items():
            connected = ", ".join(sorted(members.get(root, ())))
            tail = f"; left unchanged with the complex code connected to it ({connected})" if connected else ""
            for fn, line, reason in sorted(found, key=lambda f: (f[0].__code__.co_filename, f[1], f[2])):
                plan.skipped.append((f"{display_path(fn.__code__.co_filename)}:{line} {fn.__qualname__}",
                                     reason + tail))
        plan.sites = {fid: edits for fid, edits in self.sites.items()
                      if self.groups.find(("fn", fid)) not in blocked}
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
