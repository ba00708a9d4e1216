"""Tensor-parallel layers and in-place collectives on functional collectives.

fairscale's layers route their communication through ``torch.autograd.Function``s
whose ``forward`` calls ``ctx.mark_dirty`` (a graph break in every call, even at
world size 1). The layers here have the same parameters and shard semantics but
call ``torch.distributed._functional_collectives``, which Dynamo traces into the
graph. At model-parallel world size 1 they emit no collective at all.

These are inference layers: functional ``all_reduce`` has no autograd formula, so
gradients do not flow through the reductions as fairscale's backward would.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class ModelParallelGroup:
    """The process group a layer communicates in, with its size and this process's rank."""

    group: Any
    world_size: int
    rank: int

    @classmethod
    def from_fairscale(cls) -> ModelParallelGroup:
        """fairscale's current model-parallel group (``initialize_model_parallel`` must have run)."""
        from fairscale.nn.model_parallel import initialize as fs_init

        return cls(
            fs_init.get_model_parallel_group(),
            fs_init.get_model_parallel_world_size(),
            fs_init.get_model_parallel_rank(),
        )


class _ParallelBase(nn.Module):
    def __init__(self, mp: ModelParallelGroup) -> None:
        super().__init__()
        self.group = mp.group
        self.world_size = mp.world_size
        self.rank = mp.rank

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        return funcol.all_reduce(x, "sum", self.group)

    def _all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        return funcol.all_gather_tensor(x.contiguous(), x.dim() - 1, self.group)


class _ParallelLinear(_ParallelBase):
    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, mp: ModelParallelGroup,
                 in_features: int, out_features: int) -> None:
        super().__init__(mp)
        self.weight = weight
        self.bias = bias
        self.in_features = in_features
        self.out_features = out_features

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, ws={self.world_size}"


class ColumnParallelLinear(_ParallelLinear):
    """``Y = X A^T + b`` with ``A`` split along the output dim; ``gather_output`` concatenates the shards."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, gather_output: bool, mp: ModelParallelGroup,
                 in_features: int, out_features: int) -> None:
        super().__init__(weight, bias, mp, in_features, out_features)
        self.gather_output = gather_output

    @classmethod
    def from_fairscale(cls, m: nn.Module, mp: ModelParallelGroup) -> ColumnParallelLinear:
        """Move ``m``'s parameters (not copies) into the new layer."""
        return cls(m.weight, m.bias, m.gather_output, mp, m.in_features, m.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return self._all_gather_last(out) if self.gather_output else out


class RowParallelLinear(_ParallelLinear):
    """``Y = X A^T + b`` with ``A`` split along the input dim; partial products are summed across ranks."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, input_is_parallel: bool,
                 mp: ModelParallelGroup, in_features: int, out_features: int) -> None:
        super().__init__(weight, bias, mp, in_features, out_features)
        self.input_is_parallel = input_is_parallel

    @classmethod
    def from_fairscale(cls, m: nn.Module, mp: ModelParallelGroup) -> RowParallelLinear:
        return cls(m.weight, m.bias, m.input_is_parallel, mp, m.in_features, m.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel and self.world_size > 1:
            x = x.chunk(self.world_size, dim=-1)[self.rank].contiguous()
        out = self._all_reduce(F.linear(x, self.weight))
        return out + self.bias if self.bias is not None else out


class VocabParallelEmbedding(_ParallelBase):
    """Embedding split along the vocabulary: each rank looks up its id range, zeros the rest, then sums."""

    def __init__(self, weight: nn.Parameter, vocab_start: int, vocab_end: int, mp: ModelParallelGroup,
                 embedding_kwargs: dict[str, Any]) -> None:
        super().__init__(mp)
        self.weight = weight
        self.vocab_start = vocab_start
        self.vocab_end = vocab_end
        self.embedding_kwargs = dict(embedding_kwargs)

    @classmethod
    def from_fairscale(cls, m: nn.Module, mp: ModelParallelGroup) -> VocabParallelEmbedding:
        return cls(m.weight, m.vocab_start_index, m.vocab_end_index, mp, _embedding_kwargs(m))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # fairscale zeros ids outside this rank's range (at world size 1: ids < 0 or >= vocab, e.g. pad -1).
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = torch.where(outside, 0, ids - self.vocab_start)
        out = F.embedding(local, self.weight, **self.embedding_kwargs)
        return self._all_reduce(out.masked_fill(outside.unsqueeze(-1), 0.0))


class ParallelEmbedding(_ParallelBase):
    """Embedding split along the embedding dim; the shards are concatenated."""

    def __init__(self, weight: nn.Parameter, mp: ModelParallelGroup, embedding_kwargs: dict[str, Any]) -> None:
        super().__init__(mp)
        self.weight = weight
        self.embedding_kwargs = dict(embedding_kwargs)

    @classmethod
    def from_fairscale(cls, m: nn.Module, mp: ModelParallelGroup) -> ParallelEmbedding:
        return cls(m.weight, mp, _embedding_kwargs(m))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._all_gather_last(F.embedding(ids, self.weight, **self.embedding_kwargs))


def _embedding_kwargs(m: nn.Module) -> dict[str, Any]:
    # Exactly the attributes fairscale passes to F.embedding.
    return {"padding_idx": m.padding_idx, "max_norm": m.max_norm, "norm_type": m.norm_type,
                "scale_grad_by_freq": m.scale_grad_by_freq, "sparse": m.sparse}


# ---------------------------------------------------------------------------
# In-place c10d collectives, as the source rewrite of ``functional-collectives`` calls them.
# ---------------------------------------------------------------------------

REDUCE_OPS = {
    dist.ReduceOp.SUM: "sum",
    dist.ReduceOp.AVG: "avg",
    dist.ReduceOp.PRODUCT: "product",
    dist.ReduceOp.MIN: "min",
    dist.ReduceOp.MAX: "max",
}
"""c10d reduce ops and their functional-collective names."""


def _world(group: Any) -> Any:
    return dist.group.WORLD if group is None else group


def all_reduce_(tensor: torch.Tensor, op: str = "sum", group: Any = None) -> torch.Tensor:
    """``dist.all_reduce(tensor, op, group)`` done in place with a functional collective, completed on return."""
    group = _world(group)
    if dist.get_world_size(group) == 1:
        return tensor
    return tensor.copy_(funcol.all_reduce(tensor, op, group))


def all_gather_into_tensor_(output: torch.Tensor, input: torch.Tensor, group: Any = None) -> torch.Tensor:
    """``dist.all_gather_into_tensor(output, input, group)`` (concatenated along dim 0), in place."""
    group = _world(group)
    if dist.get_world_size(group) == 1:
        return output.copy_(input)
    return output.copy_(funcol.all_gather_tensor(input, 0, group))


def reduce_scatter_tensor_(output: torch.Tensor, input: torch.Tensor, op: str = "sum", group: Any = None) -> torch.Tensor:
    """``dist.reduce_scatter_tensor(output, input, op, group)`` (scattered along dim 0), in place."""
    group = _world(group)
    if dist.get_world_size(group) == 1:
        return output.copy_(input)
    return output.copy_(funcol.reduce_scatter_tensor(input, op, 0, group))


# ---------------------------------------------------------------------------
# A custom autograd.Function's forward, run for inference (as ``functional-collectives`` rewrites ``Fn.apply``).
# ---------------------------------------------------------------------------


class InferenceCtx:
    """What an ``autograd.Function``'s ``forward`` gets as ``ctx`` when only the forward runs: it records nothing.

    Dynamo cannot trace some ctx methods (``ctx.mark_dirty``: "Unsupported autograd.Function
    context"), but it traces a plain object whose methods do nothing, and the forward around them.
    """

    def __init__(self, inputs: int) -> None:
        self.needs_input_grad = (False,) * inputs

    def save_for_backward(self, *tensors: Any) -> None:
        pass

    def save_for_forward(self, *tensors: Any) -> None:
        pass

    def mark_dirty(self, *tensors: Any) -> None:
        pass

    def mark_non_differentiable(self, *tensors: Any) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


def forward_takes_ctx(function: type) -> bool:
    """Whether ``function.forward`` takes ``ctx`` first (no ``setup_context`` of its own)."""
    return function.setup_context is torch.autograd.Function.setup_context


def forward_for_inference(function: type, takes_ctx: bool, *args: Any) -> Any:
    """``function.apply(*args)`` for inference: ``function.forward`` alone, with a ctx that records nothing.

    Without autograd, ``apply`` computes exactly its forward; what it would add is the graph for
    the backward. So this refuses, loudly, a call that needs one: grad enabled and a tensor
    argument that requires grad. ``takes_ctx`` is ``forward_takes_ctx(function)``, worked out by
    the rewrite (Dynamo does not compare class attributes by identity reliably).
    """
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        raise RuntimeError(f"{function.__qualname__}.apply was rewritten by graphfix for inference (forward only, no "
                           "backward); call the model under torch.no_grad() or torch.inference_mode()")
    if takes_ctx:
        return function.forward(InferenceCtx(len(args)), *args)
    return function.forward(*args)
