"""Pass ``functional-collectives``: collectives Dynamo cannot trace -> ones it traces.

Three constructs, wherever the step runs them (module methods and the helpers they call):
fairscale's model-parallel layers (swapped by exact class for graphfix's), custom
``torch.autograd.Function``s that run a collective around a ctx call Dynamo cannot trace
(``passes._autograd_functions``), and ``async_op=True`` c10d calls whose Work handles are only
waited on, one at a time or in a list (``passes._async_collectives``).
"""

from __future__ import annotations

import ast
import types

from torch import nn

from graphfix.diagnose.findings import Category
from graphfix.rewrite.blocks import collectives as gc
from graphfix.rewrite.pass_manager import Pass, PassContext, PassResult
from passes._async_collectives import rewrite_async_collectives
from passes._autograd_functions import FunctionApplySites
from passes._common import no_match, replace_submodule, rewrite_methods, site


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
    summary = ("fairscale ColumnParallelLinear/RowParallelLinear/(Vocab)ParallelEmbedding, autograd.Functions whose "
               "collective Dynamo cannot trace (ctx.mark_dirty), and async_op=True c10d calls in the step -> "
               "collectives that trace without graph breaks")
    fixes = frozenset({Category.COLLECTIVE, Category.AUTOGRAD_FUNCTION_CTX})
    order = 10

    def apply(self, model: nn.Module, ctx: PassContext) -> PassResult:
        result = PassResult(self.name)
        self._swap_fairscale(model, result)
        functions = FunctionApplySites()

        def transform(fn: types.FunctionType, tree: ast.FunctionDef) -> tuple[int, list[str], dict]:
            applies, apply_reasons, helpers = functions(fn, tree)
            asyncs, async_reasons, more = rewrite_async_collectives(fn, tree)
            return applies + asyncs, apply_reasons + async_reasons, {**helpers, **more}

        rewrite_methods(model, result, transform)
        _report_functions(functions, result)
        return no_match(result, "fairscale model-parallel layer, autograd.Function collective or async_op=True c10d "
                                "collective")

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


def _report_functions(functions: FunctionApplySites, result: PassResult) -> None:
    if functions.rewritten:
        sites = ", ".join(f"{name} ({n})" for name, n in sorted(functions.rewritten.items()))
        result.notes.append(f"autograd.Function call sites run their forward only, for inference (no backward; a call "
                            f"with grad enabled on a tensor that requires grad raises RuntimeError): {sites}")
    for name in functions.traced():
        result.notes.append(f"autograd.Function {name} runs a collective that Dynamo traces as it is: left alone")
    result.skipped.extend(functions.left_alone())
