"""The Meta front door: ``forward(tokens, start_pos)`` kept, served by graphfix's engine.

After the five Meta passes (``graphfix.rewrite.planner.META_PASSES``) Meta's ``Transformer``
has ``model.graphfix_step(tokens, input_pos)``, a core with tensor positions and a static
cache (docs/passes.md), and ``forward`` calls whatever core is installed here.

The core installed is the engine's ``LlamaDecoder`` (``engine.from_meta(share=True)``: fused
q/k/v and gate/up weights that Meta's projections keep as views, so memory stays flat, the
decode kernels and PDL on a GPU, its own static cache), the same decoder ``graphfix generate``
and the benchmark run. It is compiled as *prefill* (the prompt length marked dynamic) and
*decode* (one token, static shapes, CUDA graphs on a GPU with Inductor), decode once per
attended cache length (``KV_BUCKETS``): a step at position 40 of a 4,096-slot cache reads 64
slots, not 4,096. Each callable is a function with a code object of its own, so each has its
own Dynamo cache and its graphs can be counted.

Where the engine does not build the model (model-parallel shards, a sliding window), the
rewritten core itself is compiled the same way, and the notes say why.

Under ``optimize(model, tp=N)`` the decoder is this rank's shard of the model instead
(``tp_front.sharded_decoder``: copies of the rank's slices, the all-reduce chosen); everything
else here is the same, so Meta's ``forward(tokens, start_pos)`` runs tensor parallel on every rank.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._dynamo.decorators import skip as skip_frame

from graphfix.rewrite.blocks import meta_llama
from graphfix.rewrite.blocks.phase_router import GraphRuns
from graphfix.rewrite.codeobj import own_code

KV_BUCKETS = (64, 256, 1024, 4096, 16384)
"""Attended cache lengths of the engine's decode graphs: a step attends to the smallest that holds its position."""


@dataclasses.dataclass
class MetaCompiled:
    """The two compiled copies of Meta's core and what verification reads from them."""

    prefill: Callable[..., torch.Tensor]
    decode: Callable[..., torch.Tensor]
    """The full-cache decode callable (the rewritten core's only one; the engine's for positions past every bucket)."""
    cuda_graphs: bool
    code: dict[str, types.CodeType]
    counter: GraphRuns
    calls: dict[str, int] = dataclasses.field(default_factory=lambda: {"prefill": 0, "decode": 0})
    decoder: nn.Module | None = None
    """The engine's decoder serving the calls, or ``None`` (the rewritten core compiled)."""
    buckets: tuple[int, ...] = ()
    make_decode: Callable[[int], Callable[..., torch.Tensor]] | None = None
    bucket_decode: dict[int, Callable[..., torch.Tensor]] = dataclasses.field(default_factory=dict)

    def graphs(self) -> dict[str, int]:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return {phase: len(_debug_get_cache_entry_list(code)) for phase, code in self.code.items()}

    def decode_for(self, start_pos: int | None) -> Callable[..., torch.Tensor]:
        """The decode callable for a step at ``start_pos``: the smallest bucket holding it, compiled on first use."""
        if start_pos is None or self.make_decode is None:
            return self.decode
        bucket = next((b for b in self.buckets if start_pos < b), None)
        if bucket is None:
            return self.decode
        if bucket not in self.bucket_decode:
            fn, code = self.make_decode(bucket)
            self.bucket_decode[bucket] = fn
            self.code[f"decode@{bucket}"] = code
        return self.bucket_decode[bucket]

    def graph_runs(self) -> int:
        """Counted graph runs; compiled calls of the CUDA-graph decode, whose runs the counter cannot see."""
        return self.counter.total + (self.calls["decode"] if self.cuda_graphs else 0)


def install(model: nn.Module, backend: str, cuda_graphs: bool, *, engine: bool = True,
            notes: list[str] | None = None, tp: Any = None) -> MetaCompiled:
    """Make ``forward`` call a compiled core: the engine's decoder (default), else Meta's rewritten core.

    ``tp`` (a ``TPGroup``): the engine's decoder is this rank's shard; without an engine there is no
    tensor-parallel core, so ``install`` raises ``UnsupportedModelError`` rather than serve the whole model.
    """
    decoder, why = engine_decoder(model, tp) if engine else (None, "engine=False")
    if decoder is None and tp is not None:
        from graphfix.errors import UnsupportedModelError

        raise UnsupportedModelError(f"tensor parallelism needs Meta's forward on the engine: {why}")
    if decoder is None and engine and notes is not None:
        notes.append(f"Meta forward runs its rewritten core compiled, not the engine: {why}")
    counter = GraphRuns()

    def make(phase: str, kv_len: int | None = None) -> tuple[Callable[..., torch.Tensor], types.CodeType]:
        fn = own_code(_engine_step(kv_len) if decoder is not None else model.graphfix_step.__func__)
        bound = types.MethodType(fn, decoder if decoder is not None else model)
        if phase == "prefill":
            return torch.compile(bound, backend=counter.backend(backend, "prefill"), fullgraph=True), fn.__code__
        if cuda_graphs:  # Inductor's CUDA graphs need its own mode; their runs are counted as calls
            return torch.compile(bound, backend=backend, fullgraph=True, dynamic=False,
                                 mode="reduce-overhead"), fn.__code__
        return torch.compile(bound, backend=counter.backend(backend, "decode"), fullgraph=True,
                             dynamic=False), fn.__code__

    prefill, prefill_code = make("prefill")
    decode, decode_code = make("decode")
    buckets = tuple(b for b in KV_BUCKETS if decoder is not None and b < decoder.max_seq_len)
    compiled = MetaCompiled(prefill=prefill, decode=decode, cuda_graphs=cuda_graphs,
                            code={"prefill": prefill_code, "decode": decode_code}, counter=counter,
                            decoder=decoder, buckets=buckets,
                            make_decode=(lambda kv_len: make("decode", kv_len)) if buckets else None)
    if decoder is not None and notes is not None:
        kernels = " with the decode kernels and PDL" if decoder.decode_kernels else ""
        weights = "this rank's shard of the weights (copies)" if tp is not None else "fused weights shared with the model"
        notes.append(f"Meta forward runs on graphfix's engine{kernels} ({weights}; a "
                     f"static cache of {decoder.max_seq_len} positions; decode graphs per attended length "
                     f"{', '.join(map(str, buckets)) or '-'} and the full cache)")
    core = functools.partial(_meta_core, compiled)
    core.takes_start_pos = True
    meta_llama.set_compiled_core(model, core)
    return compiled


def engine_decoder(model: nn.Module, tp: Any = None) -> tuple[nn.Module | None, str | None]:
    """The engine's decoder over ``model``'s weights (shared; with ``tp``, this rank's shard), or ``(None, why not)``."""
    from graphfix.engine import from_meta
    from graphfix.engine.kernels import use_cublas
    from graphfix.errors import GraphfixError

    if getattr(model, "graphfix_sliding_window", None):
        return None, "a sliding window (the engine reads windows from HF configs only)"
    cache = model.layers[0].attention.kv_cache
    sizes = {"max_batch_size": cache.k_cache.shape[0], "max_seq_len": model.graphfix_cache_len}
    try:
        if tp is not None:  # optimize(tp=N): graphfix.optimize.tp_front
            from graphfix.optimize import tp_front

            decoder = tp_front.sharded_decoder(model, tp, **sizes)
        else:
            decoder = from_meta(model, share=True, **sizes)
    except (GraphfixError, AttributeError, TypeError, ValueError) as exc:
        return None, f"the engine does not build it ({str(exc).splitlines()[0]})"
    if decoder.output.weight.device.type == "cuda":  # the benchmark's fastest variant (`pdl`)
        use_cublas(decoder)
        decoder.use_decode_kernels(True, pdl=True)
    return decoder, None


def _engine_step(kv_len: int | None) -> Callable[..., torch.Tensor]:
    """The engine's step in Meta's core signature (one ``(T,)`` position vector; float32 logits, as Meta's)."""

    def engine_step(self: nn.Module, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        positions = input_pos.unsqueeze(0).repeat(tokens.shape[0], 1)
        return self.step(tokens, positions, kv_len=kv_len).float()

    return engine_step


def uninstall(model: nn.Module) -> None:
    meta_llama.set_compiled_core(model, None)


@skip_frame
def _meta_core(compiled: MetaCompiled, tokens: torch.Tensor, input_pos: torch.Tensor,
               start_pos: int | None = None) -> torch.Tensor:
    """The compiled core ``forward`` calls: decode (one token) or prefill (several, length dynamic)."""
    from graphfix.optimize.hf_runtime import dense  # here, so that importing this module does not import transformers

    tokens = dense(tokens)  # Meta's loop passes slices of a wider buffer: other strides would recompile
    if torch.is_inference_mode_enabled() and not tokens.is_inference():
        tokens = tokens.clone()  # Llama3.generate makes inference tensors, other callers normal ones: one kind
    if tokens.shape[1] == 1:
        compiled.calls["decode"] += 1
        decode = compiled.decode_for(start_pos)
        if compiled.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
            return decode(tokens, input_pos).clone()
        return decode(tokens, input_pos)
    compiled.calls["prefill"] += 1
    torch._dynamo.maybe_mark_dynamic(tokens, 1)
    torch._dynamo.maybe_mark_dynamic(input_pos, 0)
    return compiled.prefill(tokens, input_pos)
