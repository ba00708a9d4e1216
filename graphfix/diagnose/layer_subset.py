"""Diagnose a representative subset of a model's decoder layers when the others repeat them.

Dynamo's tracing is Python-bound and grows with the number of decoder layers it inlines,
almost independently of tensor sizes: for Llama-2-7B shapes the two diagnoses in
``optimize`` took 36 s of its 95 s, nearly all of it tracing the same layer 32 times. Layers
that share a class and a per-layer configuration run the same code over tensors of the same
shapes, so they break, recompile and fail in the same places: one of each kind shows what
all of them do.

``representative_layers(model)`` finds the stack of decoder layers (the shallowest
``ModuleList``/``Sequential`` of at least ``MIN_LAYERS`` modules), gives each layer a
*signature* (the classes, parameter shapes and dtypes, scalar attributes such as a sliding
window or a layer type, per-layer entries of the config, instance-level forwards and
hooks of every module in it; attributes that only count the layer's position are left out)
and, while the context is open, puts a list of the first layer of each signature (at least
two: the first and the last when all repeat) in the stack's place, with the layer counts the
model sizes its caches from (``config.num_hidden_layers``, ``params.n_layers``) and per-layer
config lists (``layer_types``) cut to match. On exit, also on an exception, the original list
object, the counts and the lists are put back exactly.

Nothing is cut when a layer's code branches on its position (``if self.layer_idx == 5``, or an
``enumerate`` index in a comparison in the owner's forward): there the position is per-layer
configuration that no attribute signature can see. Module paths in findings stay real:
``ModuleIndex.renumber`` maps the cut list's indices back to the kept layers' own.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import inspect
import re
import textwrap
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

MIN_LAYERS = 3
"""A stack of fewer layers is diagnosed whole (the subset keeps at least two)."""

_SCALARS = (int, float, str, bool, type(None))
_TEST_NODES = (ast.Compare, ast.BoolOp)


@dataclasses.dataclass
class LayerCut:
    """The subset in force: which list was cut, which layers were kept, and what to put back."""

    path: str
    owner: nn.Module
    name: str
    original: nn.Module
    kept: list[int]
    total: int
    positions: set[str] = dataclasses.field(default_factory=set)
    """``subpath.attr`` of each layer's position attributes (``self_attn.layer_idx``): renumbered while cut."""
    restores: list[tuple[Any, str, Any]] = dataclasses.field(default_factory=list)

    def note(self) -> str:
        layers = ", ".join(str(i) for i in self.kept)
        return (f"diagnosed {len(self.kept)} of {self.total} layers (the others repeat them): {self.path or '(root)'} "
                f"{layers}, one of each kind of layer (classes, shapes, per-layer configuration); break and graph "
                "counts are those of the layers diagnosed")

    def position_guard(self, recompiles: list[Any]) -> str | None:
        """The guard of a recompile on a position attribute (``self.layer_id == 0``), if the subset's run had one.

        Code that specialises on a layer's position (a frame per layer, after a break inside the layers) recompiles
        once per layer: with all of them it reaches Dynamo's recompile limit and runs in Python, which a subset of
        two cannot show. The diagnosis then runs every layer."""
        names = {key.rpartition(".")[2] for key in self.positions}
        for finding in recompiles:
            text = f"{finding.message} {finding.guard or ''}"
            hit = next((n for n in sorted(names) if re.search(rf"\b{re.escape(n)}\b", text)), None)
            if hit is not None:
                return f"{hit}: {finding.message}"
        return None


def find_layer_stack(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(path, list)`` of the decoder layers: the shallowest ``ModuleList``/``Sequential`` of at least
    ``MIN_LAYERS`` modules, most of one class (a head ``Sequential(norm, linear)`` is not a stack; an MoE's experts
    sit deeper, inside a layer), the longest at that depth."""
    best: tuple[int, int, str, nn.Module] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < MIN_LAYERS:
            continue
        classes = [type(child) for child in module]
        if 2 * max(classes.count(c) for c in set(classes)) <= len(classes):  # more than half of one class
            continue
        depth = path.count(".") + (1 if path else 0)
        key = (depth, -len(module))
        if best is None or key < best[:2]:
            best = (depth, -len(module), path, module)
    return None if best is None else (best[2], best[3])


def plan(model: nn.Module) -> tuple[str, nn.Module, list[int], set[str]] | None:
    """``(path, layer list, kept indices, position attributes)`` when some layers repeat others, else ``None``."""
    found = find_layer_stack(model)
    if found is None:
        return None
    path, stack = found
    layers = list(stack)
    if any(getattr(h, "_heterogeneity_spec", None) for h in _count_holders(model, model) if _config_like(h)):
        return None  # transformers' per-layer config overrides: keyed by layer index, not cut here
    per_layer = _per_layer_config(model, len(layers))
    flat = [_attributes(layer) for layer in layers]
    index_attrs = _position_attributes(flat)
    if _branches_on_position(model, path, layers, {name.rsplit(".", 1)[-1] for name in index_attrs}):
        return None
    kept: list[int] = []
    seen: set[Any] = set()
    for i, layer in enumerate(layers):
        signature = _signature(layer, flat[i], index_attrs, tuple(v[i] for v in per_layer.values()))
        if signature not in seen:
            seen.add(signature)
            kept.append(i)
    if len(kept) == 1:
        kept.append(len(layers) - 1)
    if len(kept) >= len(layers):
        return None
    return path, stack, kept, index_attrs


@contextlib.contextmanager
def representative_layers(model: nn.Module) -> Iterator[LayerCut | None]:
    """While open, the model runs only a representative subset of its layers (``None``: nothing to cut)."""
    planned = plan(model)
    if planned is None:
        yield None
        return
    path, stack, kept, positions = planned
    owner_path, _, name = path.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    cut = LayerCut(path=path, owner=owner, name=name, original=stack, kept=kept, total=len(stack), positions=positions)
    if not _apply(model, cut):
        yield None
        return
    try:
        yield cut
    finally:
        _restore(cut)


def _apply(model: nn.Module, cut: LayerCut) -> bool:
    """Swap the subset in; ``False`` (everything put back) when a count cannot be set."""
    subset = [cut.original[i] for i in cut.kept]
    replacement = nn.Sequential(*subset) if isinstance(cut.original, nn.Sequential) else nn.ModuleList(subset)
    replacement.train(cut.original.training)
    try:
        for obj, attr, value in [*_counts(model, cut), *_positions(cut)]:
            old = getattr(obj, attr)
            setattr(obj, attr, value)
            cut.restores.append((obj, attr, old))
    except (AttributeError, TypeError, ValueError, dataclasses.FrozenInstanceError):
        _restore(cut)
        return False
    cut.owner._modules[cut.name] = replacement
    return True


def _restore(cut: LayerCut) -> None:
    cut.owner._modules[cut.name] = cut.original
    while cut.restores:
        obj, attr, old = cut.restores.pop()
        setattr(obj, attr, old)


def _counts(model: nn.Module, cut: LayerCut) -> list[tuple[Any, str, Any]]:
    """What to set while cut: layer counts equal to the stack's length (an int attribute named ``*layer*`` of the
    owner, the root or their config objects) and per-layer config lists (one entry a layer), sliced."""
    changes: list[tuple[Any, str, Any]] = []
    seen: set[int] = set()
    for obj in _count_holders(model, cut.owner):
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        config_like = not isinstance(obj, nn.Module)
        for attr, value in list(vars(obj).items()):
            if attr.startswith("_"):
                continue
            if isinstance(value, int) and not isinstance(value, bool) and value == cut.total \
                    and "layer" in attr.lower():
                changes.append((obj, attr, len(cut.kept)))
            elif config_like and isinstance(value, (list, tuple)) and len(value) == cut.total:
                changes.append((obj, attr, type(value)(value[i] for i in cut.kept)))
    return changes


def _positions(cut: LayerCut) -> list[tuple[Any, str, Any]]:
    """Position attributes as a model built with the subset's layers would have them: layer ``kept[j]``'s
    ``layer_idx`` becomes ``j`` (plus the constant offset the attribute had), since caches are indexed by it."""
    changes: list[tuple[Any, str, Any]] = []
    for key in sorted(cut.positions):
        sub, _, attr = key.rpartition(".")
        first = getattr(cut.original[0].get_submodule(sub) if sub else cut.original[0], attr)
        for j, i in enumerate(cut.kept):
            layer = cut.original[i]
            changes.append((layer.get_submodule(sub) if sub else layer, attr, first + j))
    return changes


def _count_holders(model: nn.Module, owner: nn.Module) -> list[Any]:
    """The owner, the root, and the config-like objects they hold (``config``, ``params``, a text config in it)."""
    holders: list[Any] = [owner, model]
    for module in (owner, model):
        for value in vars(module).values():
            if _config_like(value):
                holders.append(value)
                holders.extend(v for v in vars(value).values() if _config_like(v))
    return holders


def _config_like(value: Any) -> bool:
    return (hasattr(value, "__dict__") and not isinstance(value, (nn.Module, torch.Tensor, type))
            and not callable(value) and not inspect.ismodule(value))


def _per_layer_config(model: nn.Module, total: int) -> dict[str, list[Any]]:
    """Config lists with one entry per layer (``layer_types``, per-layer windows): part of each layer's signature."""
    out: dict[str, list[Any]] = {}
    for holder in _count_holders(model, model):
        if isinstance(holder, nn.Module):
            continue
        for attr, value in vars(holder).items():
            if isinstance(value, (list, tuple)) and len(value) == total and all(isinstance(v, _SCALARS) for v in value):
                out[f"{type(holder).__name__}.{attr}"] = list(value)
    return out


def _attributes(layer: nn.Module) -> dict[str, Any]:
    """Every module's scalar attributes in ``layer``, by ``subpath.name``."""
    flat: dict[str, Any] = {}
    for sub, module in layer.named_modules():
        for attr, value in vars(module).items():
            if not attr.startswith("_") and isinstance(value, _SCALARS):
                flat[f"{sub}.{attr}"] = value
    return flat


def _position_attributes(flat: list[dict[str, Any]]) -> set[str]:
    """Attributes that only count the layer's position (``layer_idx``: 0, 1, 2, ...; or shifted by a constant)."""
    out = set()
    for key, first in flat[0].items():
        if not isinstance(first, int) or isinstance(first, bool):
            continue
        values = [f.get(key) for f in flat]
        if all(isinstance(v, int) and not isinstance(v, bool) and v - first == i for i, v in enumerate(values)):
            out.add(key)
    return out


def _signature(layer: nn.Module, flat: dict[str, Any], skip: set[str], config_entries: tuple[Any, ...]) -> tuple:
    """What makes two layers run the same code on same-shaped tensors (see the module docstring)."""
    parts: list[Any] = [config_entries, tuple(sorted((k, repr(v)) for k, v in flat.items() if k not in skip))]
    for sub, module in layer.named_modules():
        parts.append((sub, type(module)))
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            parts.append((sub, name, _tensor_key(t)))
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and attr not in ("_parameters", "_buffers"):
                parts.append((sub, attr, _tensor_key(value)))
            elif callable(value) and not isinstance(value, (nn.Module, type)):
                parts.append((sub, attr, _code_key(value)))
            elif _config_like(value):  # a per-layer config object (a heterogeneous HF config) differs here
                parts.append((sub, attr, _scalars_of(value)))
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            parts.append((sub, tuple(_code_key(h) for h in hooks.values())))
    return tuple(parts)


def _scalars_of(obj: Any) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in vars(obj).items() if isinstance(v, _SCALARS)))


def _tensor_key(t: torch.Tensor | None) -> tuple:
    if t is None:
        return ("none",)
    return (tuple(t.shape), t.dtype, t.device.type, t.requires_grad, type(t).__name__)


def _code_key(fn: Any) -> Any:
    fn = getattr(fn, "__func__", fn)
    code = getattr(inspect.unwrap(fn), "__code__", None) if callable(fn) else None
    return code if code is not None else type(fn).__name__


def _branches_on_position(model: nn.Module, path: str, layers: list[nn.Module], index_names: set[str]) -> bool:
    """Whether code compares a layer's position: an index attribute of a layer's modules in a condition, or an
    ``enumerate`` index over the stack in a condition of the owner's or the root's methods."""
    classes = {cls for layer in layers for m in layer.modules() for cls in type(m).__mro__
               if cls not in (nn.Module, object) and issubclass(cls, nn.Module)}
    if index_names and any(_compares(cls, frozenset(index_names), attribute=True) for cls in classes):
        return True
    owner_path, _, _ = path.rpartition(".")
    owners = {type(model.get_submodule(owner_path) if owner_path else model), type(model)}
    return any(_compares(owner, frozenset(), attribute=False) for owner in owners)


@functools.lru_cache(maxsize=256)
def _compares(cls: type, names: frozenset[str], *, attribute: bool) -> bool:
    """``attribute``: ``.<name>`` in a condition of a method of ``cls``; else an ``enumerate`` loop index used in a
    condition of ``cls.forward`` (where a stack's loop runs; other methods, such as generation's, loop over other
    things)."""
    functions = list(vars(cls).values()) if attribute else [getattr(cls, "forward", None)]
    for value in functions:
        fn = inspect.unwrap(value) if inspect.isfunction(value) else None
        if fn is None:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        except (OSError, TypeError, SyntaxError, IndentationError):
            continue
        wanted = set(names) if attribute else _enumerate_indices(tree)
        if wanted and _in_condition(tree, wanted, attribute):
            return True
    return False


def _enumerate_indices(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.iter, ast.Call) \
                and getattr(node.iter.func, "id", None) == "enumerate" \
                and isinstance(node.target, ast.Tuple) and isinstance(node.target.elts[0], ast.Name):
            out.add(node.target.elts[0].id)
    return out


def _in_condition(tree: ast.AST, names: set[str], attribute: bool) -> bool:
    tests: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.IfExp, ast.While, ast.Assert)):
            tests.append(node.test)
        elif isinstance(node, _TEST_NODES):
            tests.append(node)
    for test in tests:
        for sub in ast.walk(test):
            if attribute and isinstance(sub, ast.Attribute) and sub.attr in names:
                return True
            if not attribute and isinstance(sub, ast.Name) and sub.id in names:
                return True
    return False


__all__ = ["MIN_LAYERS", "LayerCut", "find_layer_stack", "plan", "representative_layers"]
