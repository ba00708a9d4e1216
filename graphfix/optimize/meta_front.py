"""The Meta front door: ``forward(tokens, start_pos)`` kept, its tensor-only core compiled per phase.

After the five Meta passes (``graphfix.rewrite.planner.META_PASSES``) Meta's ``Transformer``
has ``model.graphfix_step(tokens, input_pos)``, a core with tensor positions and a static
cache (docs/passes.md). Here that core is compiled twice, each copy with a code object of
its own: *decode* (one token, static shapes, CUDA graphs on a GPU with Inductor) and
*prefill* (the prompt length marked dynamic). ``forward`` stays Meta's calling convention.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable

import torch
from torch import nn
from torch._dynamo.decorators import skip as skip_frame

from graphfix.rewrite.blocks import meta_llama
from graphfix.rewrite.blocks.phase_router import GraphRuns
from graphfix.rewrite.codeobj import own_code


@dataclasses.dataclass
class MetaCompiled:
    """The two compiled copies of Meta's core and what verification reads from them."""

    prefill: Callable[..., torch.Tensor]
    decode: Callable[..., torch.Tensor]
    cuda_graphs: bool
    code: dict[str, types.CodeType]
    counter: GraphRuns
    calls: dict[str, int] = dataclasses.field(default_factory=lambda: {"prefill": 0, "decode": 0})

    def graphs(self) -> dict[str, int]:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return {phase: len(_debug_get_cache_entry_list(code)) for phase, code in self.code.items()}

    def graph_runs(self) -> int:
        """Counted graph runs; compiled calls of the CUDA-graph decode, whose runs the counter cannot see."""
        return self.counter.total + (self.calls["decode"] if self.cuda_graphs else 0)


def install(model: nn.Module, backend: str, cuda_graphs: bool) -> MetaCompiled:
    """Compile the core of a rewritten Meta ``Transformer`` per phase and make ``forward`` call it."""
    step = model.graphfix_step.__func__
    prefill, decode = own_code(step), own_code(step)
    counter = GraphRuns()
    if cuda_graphs:  # Inductor's CUDA graphs need its own mode; their runs are counted as calls
        decode_fn = torch.compile(types.MethodType(decode, model), backend=backend, fullgraph=True, dynamic=False,
                                  mode="reduce-overhead")
    else:
        decode_fn = torch.compile(types.MethodType(decode, model), backend=counter.backend(backend, "decode"),
                                  fullgraph=True, dynamic=False)
    compiled = MetaCompiled(
        prefill=torch.compile(types.MethodType(prefill, model), backend=counter.backend(backend, "prefill"),
                              fullgraph=True),
        decode=decode_fn,
        cuda_graphs=cuda_graphs,
        code={"prefill": prefill.__code__, "decode": decode.__code__},
        counter=counter,
    )
    meta_llama.set_compiled_core(model, functools.partial(_meta_core, compiled))
    return compiled


def uninstall(model: nn.Module) -> None:
    meta_llama.set_compiled_core(model, None)


@skip_frame
def _meta_core(compiled: MetaCompiled, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """The compiled core ``forward`` calls: decode (one token) or prefill (several, length dynamic)."""
    from graphfix.optimize.hf_runtime import dense  # here, so that importing this module does not import transformers

    tokens = dense(tokens)  # Meta's loop passes slices of a wider buffer: other strides would recompile
    if torch.is_inference_mode_enabled() and not tokens.is_inference():
        tokens = tokens.clone()  # Llama3.generate makes inference tensors, other callers normal ones: one kind
    if tokens.shape[1] == 1:
        compiled.calls["decode"] += 1
        if compiled.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
            return compiled.decode(tokens, input_pos).clone()
        return compiled.decode(tokens, input_pos)
    compiled.calls["prefill"] += 1
    torch._dynamo.maybe_mark_dynamic(tokens, 1)
    torch._dynamo.maybe_mark_dynamic(input_pos, 0)
    return compiled.prefill(tokens, input_pos)
