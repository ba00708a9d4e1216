"""The sharded decoder's communicating layers, on functional collectives.

``torch.distributed._functional_collectives`` returns new tensors instead of mutating
(``all_reduce(x, "sum", group)``, ``all_gather_tensor(x, dim, group)``; the same
signatures in torch 2.11 to 2.14; 2.13 renamed ``all_gather_tensor`` to
``all_gather_single``), so Dynamo traces them into the step's graph: a
sharded step is still one graph, and CUDA-graph capture takes the collectives with it.
They are called at every world size, 1 included, so one GPU runs the same code as eight.

Each layer wraps a plain ``nn.Linear``/``nn.Embedding`` holding the rank's shard, so
swaps that look for ``nn.Linear`` by type (``kernels.use_triton_gemv``, weight-only
quantization) reach the shard, and ``weight`` is the shard for the decode kernels.
``fused_forward`` is the decode-kernel hook ``llama._fused`` calls: the same fused GEMV
(``llama._fused`` again, on the wrapped linear: bf16 or quantized), then the collective.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from graphfix.engine.llama import _fused
from graphfix.engine.tp.group import TPGroup

_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
"""``all_gather_single`` where it exists (torch 2.13 deprecates ``all_gather_tensor``, the same op, for it)."""


class _Communicating(nn.Module):
    def __init__(self, tp: TPGroup) -> None:
        super().__init__()
        self.group = tp.group
        self.rank = tp.rank
        self.world_size = tp.world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return funcol.all_reduce(x, "sum", self.group)

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' ``x`` side by side along the last dim.

        Gathered along dim 0 and rearranged here: for another dim, torch 2.11's
        ``all_gather_tensor`` calls ``torch._utils._maybe_view_chunk_cat``, which Dynamo refuses
        to trace (a graph break under ``fullgraph=True``, seen on an H200 with torch 2.11).
        """
        gathered = _all_gather(x.contiguous(), 0, self.group)  # (world * x.shape[0], ...)
        parts = gathered.view(self.world_size, *x.shape)
        return parts.movedim(0, -2).reshape(*x.shape[:-1], self.world_size * x.shape[-1])


class RowParallelLinear(_Communicating):
    """``wo`` and ``w2``: the input split along features, each rank's partial product all-reduced.

    The bias (full, not split) is added once, after the reduction. In the decode kernels the
    residual is added inside rank 0's GEMV (and the bias after it, on rank 0 alone), so the
    all-reduce returns ``residual + sum of partials + bias`` with no separate residual add.
    """

    def __init__(self, linear: nn.Linear, bias: nn.Parameter | None, tp: TPGroup) -> None:
        super().__init__(tp)
        self.linear = linear
        self.bias = bias

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.all_reduce(self.linear(x))
        return out if self.bias is None else out + self.bias

    def fused_forward(self, x: torch.Tensor, *, residual: torch.Tensor | None = None, silu: bool = False,
                      pdl: bool = False) -> torch.Tensor:
        first = self.rank == 0
        part = _fused(self.linear, x, silu=silu, residual=residual if first else None, pdl=pdl)
        if first and self.bias is not None:
            part = part + self.bias
        return self.all_reduce(part)


class VocabParallelHead(_Communicating):
    """The LM head split along the vocabulary: each rank's logits, all-gathered, cut to the real vocabulary.

    The wrapped linear is called ``output`` (the head's name in the decoder), so weight-only quantization
    (``graphfix.quant``, which keeps the LM head in float unless asked) recognises it as the head.
    """

    def __init__(self, linear: nn.Linear, vocab_size: int, tp: TPGroup) -> None:
        super().__init__(tp)
        self.output = linear
        self.vocab_size = vocab_size

    @property
    def weight(self) -> torch.Tensor:
        return self.output.weight

    bias = None

    def _gather(self, part: torch.Tensor) -> torch.Tensor:
        return self.all_gather_last(part)[..., :self.vocab_size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._gather(self.output(x))

    def fused_forward(self, x: torch.Tensor, *, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                      pdl: bool = False) -> torch.Tensor:
        return self._gather(_fused(self.output, x, norm_weight=norm_weight, eps=eps, pdl=pdl))


class VocabParallelEmbedding(_Communicating):
    """The embedding split along the vocabulary: ids outside this rank's rows look up zeros, then all-reduce."""

    def __init__(self, embedding: nn.Embedding, vocab_start: int, tp: TPGroup) -> None:
        super().__init__(tp)
        self.embedding = embedding
        self.vocab_start = vocab_start
        self.rows = embedding.weight.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(torch.where(outside, 0, local), self.embedding.weight)
        return self.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0.0))
