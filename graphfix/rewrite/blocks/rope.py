"""Real-valued rotary position embeddings: tables and rotations for both checkpoint layouts.

Two layouts of the rotated pairs exist in checkpoints, and a model must keep the
one its weights were trained with:

- ``interleaved``: pairs ``(x[2i], x[2i+1])``, Meta's reference code (complex view of
  the last dim). Tables are ``(positions, head_dim // 2)``.
- ``half``: pairs ``(x[i], x[i + head_dim/2])``, Hugging Face (``rotate_half``) after
  its conversion script permutes ``wq``/``wk``. Tables are ``(positions, head_dim)``.

The inverse frequencies are computed with the same float32 expression as Meta's
``precompute_freqs_cis`` and Hugging Face's ``compute_default_rope_parameters``, and
the angles with the same ``outer(t, inv_freq)``: the tables are cos/sin of the
same float32 angles as the ``torch.polar`` ones (equal up to the last bit of the
cos/sin kernels: within 1e-7, tests/test_blocks_rope.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch

Layout = Literal["interleaved", "half"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A frequency scaling variant: ``llama3`` (Llama 3.1 smooth interpolation) or ``linear``."""

    kind: Literal["llama3", "linear"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_meta_args(cls, args: Any) -> RopeScaling | None:
        """Meta ``ModelArgs``: ``use_scaled_rope`` means Llama 3.1 scaling with Meta's fixed constants."""
        if not getattr(args, "use_scaled_rope", False):
            return None
        # The constants hard-coded in llama_models.llama3.model.apply_scaling.
        return cls("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

    @classmethod
    def from_hf_config(cls, config: Any) -> RopeScaling | None:
        """A Hugging Face config's ``rope_parameters`` (or legacy ``rope_scaling``).

        Raises ``ValueError`` for a scaling type graphfix has no table for (yarn, dynamic, ...).
        """
        params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        kind = params.get("rope_type", params.get("type", "default"))
        if kind in (None, "default"):
            return None
        if kind == "linear":
            return cls("linear", factor=float(params["factor"]))
        if kind == "llama3":
            return cls(
                "llama3",
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            )
        raise ValueError(f"RoPE scaling type {kind!r} is not supported by graphfix.rewrite.blocks.rope")


def hf_rope_theta(config: Any) -> float:
    """The RoPE base of a Hugging Face config (``rope_parameters['rope_theta']`` or ``rope_theta``)."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """The ``head_dim // 2`` inverse frequencies (float32), scaled as ``scaling`` says."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64)[: head_dim // 2].float() / head_dim))
    if scaling is None:
        return freqs
    if scaling.kind == "linear":
        return freqs / scaling.factor
    if scaling.kind == "llama3":
        low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wavelen = 2 * math.pi / freqs
        scaled = torch.where(wavelen > low_freq_wavelen, freqs / scaling.factor, freqs)
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unknown RoPE scaling kind {scaling.kind!r}")


def rope_tables(
    head_dim: int,
    end: int,
    theta: float,
    scaling: RopeScaling | None = None,
    layout: Layout = "interleaved",
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` float32 tables for positions ``0 .. end-1``.

    Shapes: ``(end, head_dim // 2)`` for ``interleaved``, ``(end, head_dim)`` for ``half``.
    """
    angles = torch.outer(torch.arange(end, dtype=torch.float32), inv_freq(head_dim, theta, scaling))
    if layout == "half":
        angles = torch.cat((angles, angles), dim=-1)
    elif layout != "interleaved":
        raise ValueError(f"unknown RoPE layout {layout!r}")
    return angles.cos().to(device), angles.sin().to(device)


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[..., 2i], x[..., 2i+1])`` by the angles whose cos/sin are given.

    ``cos`` and ``sin`` broadcast against ``x.shape[:-1] + (head_dim // 2,)``. Computed in
    float32 like Meta's complex product, then cast back to ``x.dtype``.
    """
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` of the two halves of the last dim (Hugging Face's layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[..., i], x[..., i + head_dim/2])``: ``x * cos + rotate_half(x) * sin``.

    ``cos`` and ``sin`` are ``half``-layout tables broadcasting against ``x``; the
    arithmetic runs in their dtype like Hugging Face's ``apply_rotary_pos_emb``
    (which casts cos/sin to the activations' dtype first).
    """
    return x * cos + rotate_half(x) * sin
