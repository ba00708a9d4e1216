"""Passes ``sdpa-context`` (deprecated sdp_kernel -> sdpa_kernel) and ``sdpa-attention`` (manual -> SDPA).

``sdpa-attention`` rewrites manual attention wherever it is written (module methods and the helper functions
they call, at any depth): ``softmax(scale * q kᵀ + mask) v`` spelled with ``@``, ``torch.matmul``,
``torch.bmm`` or ``torch.einsum``, with the masks, scales, casts and dropout that
``graphfix.rewrite.attention_match`` recognises, becomes one ``F.scaled_dot_product_attention`` call.
Meta's own ``Attention`` class takes the module path (``MetaAttention`` with native GQA), as before.

Contract for the passes that run after it (``static-kv-cache`` finds attention sites by it): a rewritten
attention site is a call whose function ``graphfix.rewrite.blocks.source_rewrite.resolve`` resolves to exactly
``torch.nn.functional.scaled_dot_product_attention``. It is bound as the closure name ``_graphfix_sdpa`` (user
globals are never touched). Its first three positional arguments are q, k, v in ``(batch, heads, seq, head_dim)``
layout (``(batch, seq, head_dim)`` for ``torch.bmm`` attention); transposes that another layout needs are applied
around the call, on its inputs and its output. The mask, if any, is the keyword ``attn_mask=``; ``scale=`` is
always explicit (SDPA's default differs from a missing scale); ``dropout_p=`` carries the original's dropout with
its training condition. Repeated GQA k/v heads (``repeat_kv``, ``repeat_interleave``) are kept as they were.
"""

from __future__ import annotations

import ast
import copy
import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from graphfix.diagnose.findings import Category, display_path
from graphfix.rewrite import attention_match as am
from graphfix.rewrite import dataflow
from graphfix.rewrite.attention_forms import Forms, permuted
from graphfix.rewrite.blocks import meta_llama as ml
from graphfix.rewrite.blocks import source_rewrite as sr
from graphfix.rewrite.pass_manager import Pass, PassContext, PassResult
from graphfix.rewrite.scope_facts import Scope
from passes._common import as_meta_attention, methods_by_function, no_match, rewrite_methods

SDPA = "_graphfix_sdpa"
"""The closure name a rewritten site calls ``F.scaled_dot_product_attention`` by (see the contract above)."""

_FLAGS = {  # torch.backends.cuda.sdp_kernel flag -> backend
    "enable_flash": "FLASH_ATTENTION",
    "enable_math": "MATH",
    "enable_mem_efficient": "EFFICIENT_ATTENTION",
    "enable_cudnn": "CUDNN_ATTENTION",
}


class SdpaContextPass(Pass):
    name = "sdpa-context"
    summary = ("deprecated torch.backends.cuda.sdp_kernel(...) context manager -> torch.nn.attention.sdpa_kernel"
               "([backends]) with the same backend choice")
    fixes = frozenset({Category.SDPA_CONTEXT_MANAGER})
    order = 15

    def apply(self, model: nn.Module, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        rewrite_methods(model, result, _rewrite_sdp_kernel)
        return no_match(result, "torch.backends.cuda.sdp_kernel context manager")


def _rewrite_sdp_kernel(fn: types.FunctionType, tree: ast.FunctionDef) -> tuple[int, list[str], dict]:
    old = torch.backends.cuda.sdp_kernel
    helpers = {"_graphfix_sdpa_kernel": sdpa_kernel, "_graphfix_SDPBackend": SDPBackend}
    count, reasons, replaced = 0, [], set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.With):
            continue
        for item in node.items:
            call = item.context_expr
            if not sr.is_call_to(fn, call, old):
                continue
            replaced.add(id(call.func))
            try:
                item.context_expr = ast.copy_location(_sdpa_kernel_call(call, item), call)
                count += 1
            except sr.Unrewritable as exc:
                reasons.append(f"line {call.lineno}: {exc}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.Name, ast.Attribute)) and id(node) not in replaced and sr.resolve(fn, node) is old:
            reasons.append(f"line {node.lineno}: sdp_kernel used other than as `with sdp_kernel(...):`; "
                           "use torch.nn.attention.sdpa_kernel([SDPBackend...]) instead")
            replaced.add(id(node))
            for sub in ast.walk(node):
                replaced.add(id(sub))
    return count, reasons, helpers


def _sdpa_kernel_call(call: ast.Call, item: ast.withitem) -> ast.Call:
    if item.optional_vars is not None:
        raise sr.Unrewritable("`with sdp_kernel(...) as x` binds the context value")
    flags = sr.bind_call(call, torch.backends.cuda.sdp_kernel)
    enabled = []
    for flag, backend in _FLAGS.items():
        value = flags.get(flag, ast.Constant(True))
        if not (isinstance(value, ast.Constant) and isinstance(value.value, bool)):
            raise sr.Unrewritable(f"`{flag}` is not a constant True/False")
        if value.value:
            enabled.append(backend)
    if not enabled:
        raise sr.Unrewritable("every backend is disabled")
    backends = [ast.Attribute(value=ast.Name(id="_graphfix_SDPBackend", ctx=ast.Load()), attr=b, ctx=ast.Load())
                for b in enabled]
    return ast.Call(func=ast.Name(id="_graphfix_sdpa_kernel", ctx=ast.Load()),
                    args=[ast.List(elts=backends, ctx=ast.Load())], keywords=[])


class SdpaAttentionPass(Pass):
    name = "sdpa-attention"
    summary = ("manual matmul/einsum softmax attention, in any module method or helper function -> "
               "F.scaled_dot_product_attention (Meta's Attention: with native GQA)")
    fixes = frozenset()  # a speed rewrite: the manual form compiles, but unfused
    order = 40

    def apply(self, model: nn.Module, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        for name, module in list(model.named_modules()):
            module = as_meta_attention(model, name, module)
            if isinstance(module, ml.MetaAttention) and module.attention == "manual":
                module.attention = "sdpa"
                result.rewritten += 1
        rewrite = ManualAttentionRewrite(model)
        rewrite_methods(model, result, rewrite)
        if rewrite.upcasts:
            result.notes.append(
                f"{rewrite.upcasts} site(s) computed the softmax in float32 and cast back; SDPA computes in the input "
                "dtype: float32 agrees to about 1e-6, while in bf16/fp16 SDPA does not round the probabilities to the "
                "low dtype before multiplying with v, so outputs differ at that dtype's rounding (a few 1e-3 of the "
                "output scale in bf16), no farther from a float64 reference than the original")
        return no_match(result, "manual attention graphfix can rewrite")


class ManualAttentionRewrite:
    """The ``rewrite_methods`` transform of ``sdpa-attention``: every matched site -> one SDPA call.

    Knows the module instances of each method, so ``self.<attr>`` facts (a float scale, an ``nn.Dropout``)
    are read from the objects rather than guessed.
    """

    def __init__(self, model: nn.Module) -> None:
        self.instances = {id(fn): [m for _, m in found] for fn, _, found in methods_by_function(model)}
        self.upcasts = 0

    def __call__(self, fn: types.FunctionType, tree: ast.FunctionDef) -> tuple[int, list[str], dict]:
        if not any(_may_be_product(fn, node) for node in ast.walk(tree)):
            return 0, [], {}  # attention needs a product of tensors: most functions have none
        forms = Forms(Scope(fn, tree, self.instances.get(id(fn))))
        path = display_path(fn.__code__.co_filename)
        sites, reasons, reported = _find_sites(am.Matcher(forms), tree, path)
        reasons += _unconsumed_softmaxes(forms, tree, path, reported)
        for site in sites:
            _replace_with_sdpa(site)
        self.upcasts += sum(site.upcast for site in sites)
        return len(sites), reasons, {SDPA: F.scaled_dot_product_attention, am.WHERE: torch.where}


def _may_be_product(fn: types.FunctionType, node: ast.AST) -> bool:
    """A cheap first look: ``@``, or a call of something named ``matmul``, ``bmm`` or ``einsum`` (or imported
    under another name)."""
    if isinstance(node, ast.BinOp):
        return isinstance(node.op, ast.MatMult)
    if not isinstance(node, ast.Call):
        return False
    if isinstance(node.func, ast.Attribute):
        return node.func.attr in ("matmul", "bmm", "einsum")
    return isinstance(node.func, ast.Name) and sr.resolve(fn, node.func) in (torch.matmul, torch.bmm, torch.einsum)


def _find_sites(matcher: am.Matcher, tree: ast.FunctionDef, path: str) -> tuple[list[am.Site], list[str], set[int]]:
    """Matched sites (no two touching one statement), the reasons for attention that did not match, and the ids
    of every softmax that belongs to one or the other."""
    sites, reasons, reported = [], [], set()
    removed: set[int] = set()
    outputs: set[int] = set()
    for body in dataflow.blocks(tree):
        for index, stmt in enumerate(body):
            for node in dataflow.expression_nodes(stmt):
                try:
                    site = matcher.match(body, index, node)
                except am.NoMatch as exc:
                    reasons.append(f"{path}:{exc.line or stmt.lineno}: manual attention not rewritten: {exc.what}")
                    reported.add(id(exc.softmax))
                    continue
                if site is None:
                    continue
                reported.add(id(site.softmax))
                mine = {id(r.stmt) for r in site.removed}
                if mine & (removed | outputs) or id(stmt) in removed:
                    reasons.append(f"{path}:{stmt.lineno}: manual attention not rewritten: it shares statements "
                                   "with another attention site")
                    continue
                removed |= mine
                outputs.add(id(stmt))
                sites.append(site)
    return sites, reasons, reported


def _unconsumed_softmaxes(forms: Forms, tree: ast.FunctionDef, path: str, reported: set[int]) -> list[str]:
    """Softmaxes of q·k scores that no product with v in the same function consumes (not rewritable here)."""
    reasons = []
    for body in dataflow.blocks(tree):
        for index, stmt in enumerate(body):
            for node in dataflow.expression_nodes(stmt):
                if id(node) in reported:
                    continue
                try:
                    found = forms.softmax(node)
                except sr.Unrewritable:
                    found = None
                if found is not None and forms.from_product(body, found[0], index):
                    reasons.append(f"{path}:{node.lineno}: manual attention not rewritten: a softmax of a tensor "
                                   "product (attention scores?) is not multiplied with v by a matmul/einsum in the "
                                   "same straight-line block of this function; if it is attention, call "
                                   "F.scaled_dot_product_attention there")
    return reasons


def _replace_with_sdpa(site: am.Site) -> None:
    """Put the SDPA call where the output product was and delete the chain's statements."""
    keywords = []
    if site.attn_mask is not None:
        keywords.append(ast.keyword(arg="attn_mask", value=site.attn_mask))
    if site.dropout_p is not None:
        keywords.append(ast.keyword(arg="dropout_p", value=site.dropout_p))
    keywords.append(ast.keyword(arg="scale", value=site.scale))
    call = ast.Call(func=ast.Name(id=SDPA, ctx=ast.Load()), args=[site.query, site.key, site.value],
                    keywords=keywords)
    call = copy.deepcopy(call)  # operands may still sit in a kept `if` test
    output = permuted(call, site.output_perm) if site.output_perm else call
    if _viewed(site):  # fused kernels may return a non-contiguous output where the product's was contiguous
        output = ast.Call(func=ast.Attribute(value=output, attr="contiguous", ctx=ast.Load()), args=[], keywords=[])
    ast.copy_location(output, site.product)
    index = _position(site.body, site.stmt)  # an earlier site of the block may have removed statements
    site.body[index] = _Substitute(site.product, output).visit(site.stmt)
    for removal in site.removed:
        removal.block[:] = [s for s in removal.block if s is not removal.stmt]
        if removal.outer is not None and not removal.block:
            site.body[:] = [s for s in site.body if s is not removal.outer]


def _viewed(site: am.Site) -> bool:
    """Whether the output goes to ``.view``: directly, or through the name it is assigned to (same block)."""
    stmt = site.stmt
    for node in ast.walk(stmt):
        if isinstance(node, ast.Attribute) and node.attr == "view" and node.value is site.product:
            return True
    if not (isinstance(stmt, ast.Assign) and stmt.value is site.product and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name)):
        return False
    name = stmt.targets[0].id
    for later in site.body[_position(site.body, stmt) + 1:]:
        if any(isinstance(n, ast.Attribute) and n.attr == "view" and isinstance(n.value, ast.Name)
               and n.value.id == name for n in ast.walk(later)):
            return True
        if dataflow.binds(later, name):
            return False
    return False


def _position(body: list[ast.stmt], stmt: ast.stmt) -> int:
    return next(i for i, s in enumerate(body) if s is stmt)


class _Substitute(ast.NodeTransformer):
    def __init__(self, old: ast.AST, new: ast.AST) -> None:
        self.old, self.new = old, new

    def visit(self, node: ast.AST) -> ast.AST:
        if node is self.old:
            return self.new
        return super().visit(node)
