"""Passes ``sdpa-context`` (deprecated sdp_kernel -> sdpa_kernel) and ``sdpa-attention`` (manual -> SDPA)."""

from __future__ import annotations

import ast
import types

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from graphfix.diagnose.findings import Category
from graphfix.rewrite.blocks import meta_llama as ml
from graphfix.rewrite.blocks import source_rewrite as sr
from graphfix.rewrite.pass_manager import Pass, PassContext, PassResult
from passes._common import as_meta_attention, no_match, parsed_methods, rewrite_methods, where

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
    summary = ("manual matmul-softmax-matmul attention (Meta Attention) -> F.scaled_dot_product_attention with "
               "native GQA")
    fixes = frozenset()  # a speed rewrite: the manual form compiles, but unfused
    order = 40

    def apply(self, model: nn.Module, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        for name, module in list(model.named_modules()):
            module = as_meta_attention(model, name, module)
            if isinstance(module, ml.MetaAttention) and module.attention == "manual":
                module.attention = "sdpa"
                result.rewritten += 1
        _report_other_manual_attention(model, result)
        return no_match(result, "manual attention graphfix can rewrite")


def _report_other_manual_attention(model: nn.Module, result: PassResult) -> None:
    """Report forwards outside graphfix's matchers that do softmax between two matmuls/einsums."""
    products = {torch.matmul, torch.einsum, torch.bmm}
    softmaxes = {torch.softmax, torch.nn.functional.softmax}
    for fn, name, instances, tree in parsed_methods(model):
        module = instances[0][1]
        if name != "forward" or isinstance(module, ml.MetaAttention) or ml.is_meta_attention(module):
            continue
        calls = [sr.resolve(fn, n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)]
        matmuls = sum(c in products for c in calls) + sum(isinstance(n, ast.BinOp) and isinstance(n.op, ast.MatMult)
                                                       for n in ast.walk(tree))
        if matmuls >= 2 and any(c in softmaxes for c in calls):
            result.skipped.append((where([p for p, _ in instances]),
                                   (f"{type(module).__qualname__}.forward computes softmax between matmuls; "
                                   "graphfix only rewrites Meta's Attention: call "
                                   "graphfix.rewrite.blocks.attention.sdpa(q, k, v, mask) there (native GQA)")))
