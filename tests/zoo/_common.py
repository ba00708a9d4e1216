"""What every zoo entry shares: the prompt and deterministic random weights.

Each codebase initialises its weights its own way (litgpt and fms draw std-0.02
normals, Meta's fairscale layers leave memory uninitialised), which makes tiny
models either non-deterministic or nearly constant in their greedy tokens. So every
zoo model is refilled here from one seeded generator, with scales that keep the
activations O(1) through the layers: the greedy tokens then vary step to step, and
a cache bug changes them.
"""

from __future__ import annotations

import torch
from torch import nn

PROMPT_IDS: tuple[int, ...] = (5, 17, 99, 3, 42)
"""The fixed prompt every zoo loop starts from (ids below the smallest zoo vocabulary, 128)."""

PROMPT = torch.tensor([PROMPT_IDS], dtype=torch.int64)
"""``PROMPT_IDS`` as a batch of one, ``(1, T)``: what most loops feed their model."""


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter of ``model`` in place from a generator seeded with ``seed``; returns ``model``.

    Embedding tables get unit normals, other matrices normals of std ``1/sqrt(fan_in)``,
    vectors named like a bias small normals, other vectors (norm gains) ``1 + 0.1 * normal``.
    Parameters are visited in ``named_parameters`` order, so the same architecture and seed give the
    same weights on every run. A tied weight is filled once.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                draw = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                if isinstance(module, nn.Embedding):
                    value = draw
                elif param.dim() >= 2:
                    value = draw * param.shape[-1] ** -0.5
                elif "bias" in name:
                    value = draw * 0.02
                else:
                    value = 1.0 + 0.1 * draw
                param.copy_(value.to(param.dtype))
    return model
