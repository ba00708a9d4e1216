"""Growing module-attribute caches across a model: their owners, their shapes, and the rewrite of the owners.

An *owner* is a set of modules whose classes give them the same methods (the attention of
every layer). Its cache attributes are those some method grows with ``torch.cat([self.A, x],
dim)``. The owner is rewritten as a whole or not at all: every method that touches a cache
must pass ``MethodRewrite`` and no other code may reach the attributes (``other.cache_k``),
because after the rewrite ``self.A`` is a ``PreallocatedCache`` module, not a tensor.

Buffer shapes and dtype come from what the attribute holds when the pass runs (a zero-length
tensor from ``__init__``, or the content of earlier calls, which is kept), else from a probe:
one call of the original model on ``ctx.options["example_inputs"]`` (positional arguments;
``ctx.options["example_kwargs"]`` for keywords), after which every module's attributes are put
back (``ModelSnapshot``; the call's prints and logging do happen). The batch is ``max(ctx.max_batch_size, observed)``, the length ``ctx.max_seq_len``.
"""

from __future__ import annotations

import ast
import dataclasses
import types
from typing import Any

import torch
from torch import nn

from graphfix.diagnose.findings import display_path
from graphfix.rewrite.blocks import meta_llama as ml
from graphfix.rewrite.blocks import source_rewrite as sr
from graphfix.rewrite.blocks.kv_cache import PreallocatedCache
from graphfix.rewrite.pass_manager import PassContext, PassResult
from graphfix.rewrite.snapshot import ModelSnapshot
from passes._common import helper_site, parsed_methods, where
from passes._growing_cache import HELPERS, RANK, MethodRewrite, cat_append, self_attr

_JOINS = (torch.cat, torch.concat, torch.concatenate, torch.stack)
SEQ_DIMS = (1, 2)
"""``(batch, heads, seq, dim)`` and ``(batch, seq, heads, dim)``: the layouts attention reads."""


@dataclasses.dataclass
class Owner:
    """Modules sharing one set of methods, and what rewriting their growing caches takes."""

    methods: list[tuple[str, types.FunctionType]]
    instances: list[tuple[str, nn.Module]]
    caches: dict[str, int] = dataclasses.field(default_factory=dict)
    """Cache attribute -> sequence dim."""
    rewrites: dict[str, MethodRewrite] = dataclasses.field(default_factory=dict)
    reasons: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    examples: dict[tuple[int, str], torch.Tensor] = dataclasses.field(default_factory=dict)

    def where(self, method: str = "forward") -> str:
        return where([p for p, _ in self.instances], method)

    def refuse(self, why: str, method: str = "forward") -> None:
        self.reasons.append((self.where(method), why))


def find_owners(model: nn.Module) -> list[Owner]:
    """Every owner of a growing cache in ``model``, with its methods analysed (nothing is changed yet)."""
    groups: dict[tuple, Owner] = {}
    for path, module in model.named_modules():
        if ml.is_meta_attention(module) or isinstance(module, ml.MetaAttention):
            continue
        methods = list(sr.user_methods(module))
        key = tuple((name, id(fn)) for name, fn in methods)
        groups.setdefault(key, Owner(methods, []))
        groups[key].instances.append((path, module))
    owners = [o for o in groups.values() if _find_caches(o)]
    for owner in owners:
        _analyse(owner)
        _descriptors(owner)
    _foreign_accesses(model, owners)
    return owners


def _trees(owner: Owner) -> dict[str, ast.FunctionDef | None]:
    trees: dict[str, ast.FunctionDef | None] = {}
    for name, fn in owner.methods:
        try:
            trees[name] = sr.function_tree(fn)
        except sr.Unrewritable:
            trees[name] = None
    return trees


def _find_caches(owner: Owner) -> bool:
    """Record the attributes some method (not ``__init__``) grows by ``torch.cat``, with their sequence dim."""
    dims: dict[str, set[int | None]] = {}
    for (name, fn), tree in zip(owner.methods, _trees(owner).values()):
        if tree is None or name == "__init__":
            continue
        self_name = _self_name(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                attr = self_attr(node.targets[0], self_name)
                values = [node.value.body, node.value.orelse] if isinstance(node.value, ast.IfExp) else [node.value]
                for value in values:
                    cat = cat_append(fn, value, self_name)
                    if attr is not None and cat is not None and cat[0] == attr:
                        dims.setdefault(attr, set()).add(None if cat[2] is None else cat[2] % RANK)
    for attr, found in sorted(dims.items()):
        if len(found) != 1 or None in found or next(iter(found)) not in SEQ_DIMS:
            shown = ", ".join(str(d) for d in sorted(found, key=str))
            owner.refuse(f"self.{attr} grows by torch.cat along dim {shown}: graphfix rewrites a cache that grows "
                         "along dim 1 or 2 of a rank-4 tensor")
        owner.caches[attr] = next(iter(found)) or 0
    return bool(dims)


def _self_name(tree: ast.FunctionDef) -> str:
    params = tree.args.posonlyargs + tree.args.args
    return params[0].arg if params else "self"


def _analyse(owner: Owner) -> None:
    for (name, fn), tree in zip(owner.methods, _trees(owner).values()):
        if name == "__init__":
            continue  # runs once, before any step: what it leaves is read from the instance
        if tree is None:
            owner.refuse(f"the source of {fn.__qualname__} is not available: graphfix cannot tell whether it "
                         "touches the cache", name)
            continue
        rewrite = MethodRewrite(fn, tree, owner.caches)
        if not rewrite.touches_cache:
            continue
        rewrite.run()
        owner.rewrites[name] = rewrite
        owner.reasons.extend((owner.where(name), r) for r in rewrite.reasons)


def _descriptors(owner: Owner) -> None:
    """Refuse an owner whose properties, static or class methods touch a cache (``user_methods`` lists plain
    functions only, so these would keep reading a tensor that is gone)."""
    module = owner.instances[0][1]
    for cls in type(module).__mro__:
        if cls.__module__.startswith(("torch.", "graphfix.")) or cls is object:
            continue
        for attr_name, value in vars(cls).items():
            functions = [value.fget, value.fset] if isinstance(value, property) else \
                [value.__func__] if isinstance(value, (staticmethod, classmethod)) else []
            for fn in filter(None, functions):
                try:
                    tree = sr.function_tree(fn)
                except sr.Unrewritable:
                    continue
                if any(isinstance(n, ast.Attribute) and n.attr in owner.caches for n in ast.walk(tree)):
                    owner.refuse(f"{cls.__qualname__}.{attr_name} (a property, static or class method) touches "
                                 "the cache; graphfix rewrites plain methods only", attr_name)


def _foreign_accesses(model: nn.Module, owners: list[Owner]) -> None:
    """Refuse an owner whose cache attributes other code reaches (``layer.attn.cache_k``): it would see a module."""
    names = {attr: o for o in owners for attr in o.caches}
    for fn, name, instances, tree in parsed_methods(model):
        self_name = _self_name(tree) if name else None  # a method's self.X is its own module's attribute
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or node.attr not in names:
                continue
            if isinstance(node.value, ast.Name) and node.value.id == self_name:
                continue
            site = where([p for p, _ in instances], name) if name else helper_site(fn)
            line = f"{display_path(fn.__code__.co_filename)}:{node.lineno}"
            names[node.attr].reasons.append((site, (
                f"{line}: `{ast.unparse(node)}` reaches the cache of another module: graphfix rewrites a growing "
                "cache only when its owner's own methods are the only code that touches it")))


# ---------------------------------------------------------------------------
# Shapes: what the attribute holds now, or what a probe call writes
# ---------------------------------------------------------------------------


def _held(module: nn.Module, attr: str) -> Any:
    """What ``module.<attr>`` holds, or a string saying why it cannot be replaced."""
    if attr in module._parameters or attr in module._modules:
        return f"self.{attr} is a parameter or a submodule"
    if attr in module._buffers and attr not in module._non_persistent_buffers_set:
        return (f"self.{attr} is a persistent buffer (it is in the state dict); register it with "
                "persistent=False")
    return getattr(module, attr, None)


def learn_shapes(owners: list[Owner], model: nn.Module, ctx: PassContext) -> None:
    """Fill ``owner.examples`` from each attribute's value, probing the model once for attributes that hold ``None``."""
    missing: list[tuple[Owner, nn.Module, str]] = []
    for owner in owners:
        if owner.reasons:
            continue
        for path, module in owner.instances:
            for attr in owner.caches:
                held = _held(module, attr)
                if isinstance(held, str):
                    owner.refuse(held)
                elif isinstance(held, torch.Tensor):
                    owner.examples[(id(module), attr)] = held
                elif held is None:
                    missing.append((owner, module, attr))
                else:
                    owner.refuse(f"self.{attr} holds a {type(held).__name__}, not a tensor")
    missing = [(o, m, a) for o, m, a in missing if not o.reasons]
    if not missing:
        return
    probed, failure = _probe(model, [(m, a) for _, m, a in missing], ctx)
    unknown: dict[int, set[str]] = {}
    for owner, module, attr in missing:
        value = probed.get((id(module), attr))
        if isinstance(value, torch.Tensor):
            owner.examples[(id(module), attr)] = value
        elif attr not in unknown.setdefault(id(owner), set()):
            unknown[id(owner)].add(attr)
            owner.refuse(f"self.{attr} is None, so its shape and dtype are unknown: {failure}")


def _probe(model: nn.Module, wanted: list[tuple[nn.Module, str]],
           ctx: PassContext) -> tuple[dict[tuple[int, str], Any], str]:
    """One call of the model on the example inputs; what each wanted attribute then holds. Attributes are put back."""
    args = ctx.options.get("example_inputs")
    if args is None:
        return {}, ("run one call before the pass (the cache's content is kept) or give "
                    "ctx.options['example_inputs'] (the arguments of one call)")
    args = (args,) if isinstance(args, torch.Tensor) else tuple(args)
    snapshot = ModelSnapshot.take(model)
    try:
        with torch.no_grad():
            model(*args, **ctx.options.get("example_kwargs", {}))
        return {(id(m), a): getattr(m, a, None) for m, a in wanted}, "the example call did not write it"
    except Exception as exc:  # noqa: BLE001 - the user's code: any failure is a reason to skip, not to crash the pass
        return {}, f"the example call failed ({type(exc).__name__}: {exc})"
    finally:
        snapshot.restore()


# ---------------------------------------------------------------------------
# The rewrite
# ---------------------------------------------------------------------------


def rewrite_owner(owner: Owner, ctx: PassContext, result: PassResult) -> None:
    """Swap each cache attribute for a ``PreallocatedCache`` and install the rewritten methods, or report why not."""
    slots = _slots(owner, ctx)
    if owner.reasons:
        return
    functions = {}
    for name, rewrite in owner.rewrites.items():
        try:
            functions[name] = sr.compile_function(rewrite.fn, rewrite.tree, {**HELPERS, **rewrite.helpers})
        except sr.Unrewritable as exc:
            owner.refuse(str(exc), name)
    if owner.reasons:
        return
    for path, module in owner.instances:
        for attr in owner.caches:
            _install_slot(module, attr, slots[(id(module), attr)])
        for name, fn in functions.items():
            sr.install_method(module, name, fn, result.name)
    sites = sum(r.sites for r in owner.rewrites.values())
    result.rewritten += sites
    first = slots[(id(owner.instances[0][1]), next(iter(owner.caches)))]
    attrs = ", ".join(f"self.{a}" for a in owner.caches)
    result.notes.append(
        f"{owner.where()}: growing {attrs} -> PreallocatedCache {tuple(first.buffer.shape)} {first.buffer.dtype} "
        f"(sequence dim {first.seq_dim}, {len(owner.instances)} instance(s)); {sites} site(s) in "
        + ", ".join(owner.rewrites))


def _slots(owner: Owner, ctx: PassContext) -> dict[tuple[int, str], PreallocatedCache]:
    slots: dict[tuple[int, str], PreallocatedCache] = {}
    for path, module in owner.instances:
        for attr, seq_dim in owner.caches.items():
            example = owner.examples.get((id(module), attr))
            if example is None:
                return slots
            if example.dim() != RANK:
                owner.refuse(f"self.{attr} is rank {example.dim()}, not 4")
                return slots
            if example.shape[seq_dim] > ctx.max_seq_len:
                owner.refuse(f"self.{attr} already holds {example.shape[seq_dim]} positions, more than "
                             f"max_seq_len={ctx.max_seq_len}")
                return slots
            held = _held(module, attr)
            content = held if isinstance(held, torch.Tensor) else None
            slots[(id(module), attr)] = PreallocatedCache.like(
                example, seq_dim, ctx.max_batch_size, ctx.max_seq_len, ctx.dtype, ctx.device, content)
    return slots


def _install_slot(module: nn.Module, attr: str, slot: PreallocatedCache) -> None:
    """``module.<attr>`` becomes ``slot`` (a submodule, so ``.to()``, ``named_modules`` and ``state_dict`` see it)."""
    module.__dict__.pop(attr, None)
    module._buffers.pop(attr, None)
    module._non_persistent_buffers_set.discard(attr)
    module._modules[attr] = slot
    if any(attr in vars(cls) for cls in type(module).__mro__):
        object.__setattr__(module, attr, slot)  # a class attribute (``cache_k = None``) would shadow the submodule


def already_static(model: nn.Module) -> int:
    """How many ``PreallocatedCache`` modules a previous run left."""
    return sum(isinstance(m, PreallocatedCache) for m in model.modules())


def report_list_caches(model: nn.Module, skipped: list[tuple[str, str]]) -> None:
    """Report caches kept as a Python list on the module (``self.keys.append(k)``, then ``torch.cat(self.keys)``).

    They grow like a tensor cache but through a list (Dynamo guards on its length: a recompile
    per step); graphfix does not rewrite them.
    """
    for fn, name, instances, tree in parsed_methods(model):
        if not name or name == "__init__":
            continue
        self_name = _self_name(tree)
        appended = {self_attr(n.func.value, self_name) for n in ast.walk(tree) if isinstance(n, ast.Call)
                    and isinstance(n.func, ast.Attribute) and n.func.attr == "append"} - {None}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and node.args and any(sr.is_call_to(fn, node, c) for c in _JOINS)):
                continue
            attr = self_attr(node.args[0], self_name)
            if attr is not None and isinstance(getattr(instances[0][1], attr, None), list):
                how = "appended to and joined" if attr in appended else "joined"
                skipped.append((where([p for p, _ in instances], name), (
                    f"{display_path(fn.__code__.co_filename)}:{node.lineno}: self.{attr} is a list cache ({how} by "
                    f"`{ast.unparse(node)[:50]}`): its length changes every step; graphfix rewrites tensor caches "
                    f"(self.{attr} = torch.cat([self.{attr}, x], dim)) or hold a "
                    "graphfix.rewrite.blocks.kv_cache.StaticKVCache")))
