"""``StepModel`` over Meta's ``Transformer`` after the passes (``graphfix_step``).

The passes give Meta's model ``graphfix_step(tokens, input_pos)`` with one ``(T,)``
position vector shared by all rows (``graphfix.rewrite.blocks.meta_llama``). ``MetaStepModel``
adapts it to the engine's ``(B, T)`` positions by using row 0's positions, and says
so (``per_row_positions = False``): the ``Generator`` then accepts batch 1, or
batches of equal-length prompts. For per-row positions, tensor parallelism aside,
move the weights into graphfix's decoder instead: ``graphfix.engine.from_meta``.
"""

from __future__ import annotations

import torch
from torch import nn

from graphfix.errors import UnsupportedModelError
from graphfix.rewrite.blocks import meta_llama


class MetaStepModel(nn.Module):
    """Wraps a rewritten Meta ``Transformer``; its parameters and caches stay where they are."""

    per_row_positions = False
    supports_logits_index = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not meta_llama.has_tensor_core(model):
            raise UnsupportedModelError("the Meta model has no graphfix_step",
                                        hint="apply the static-kv-cache pass (graphfix optimize) first")
        if getattr(model, "graphfix_inference_mode", "none") == "inside":
            raise UnsupportedModelError("graphfix_step still enters inference mode inside the compiled frame",
                                        hint="apply the inference-mode pass too (it fails under aot_eager/inductor)")
        self.model = model
        cache = model.layers[0].attention.kv_cache
        self.max_batch_size = cache.k_cache.shape[0]
        self.max_seq_len = model.graphfix_cache_len
        device = cache.k_cache.device
        if model.freqs_cis.device != device:  # Meta's forward moves it lazily; do it once, outside the graphs
            model.freqs_cis = model.freqs_cis.to(device)

    def step(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.model.graphfix_step(tokens, input_pos[0])

    forward = step

    def reset(self) -> None:
        """Nothing to rewind (the cache is masked by position, never cleared)."""
