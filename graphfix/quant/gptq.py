"""Error-compensating rounding (GPTQ) and error-minimising scales, into the same packed formats as ``quant.scheme``.

Round-to-nearest with absmax scales rounds each weight on its own. What a linear's output
loses is ``(W - Q) X``, which depends on the inputs ``X`` the weights meet: with the input
second moment ``H = X^T X`` (summed over calibration tokens) the loss of a row ``w`` is
``(w - q)^T H (w - q)``. GPTQ (Frantar et al., 2022, "Accurate Post-Training Quantization for
Generative Pre-trained Transformers") rounds the columns one at a time and moves each column's
rounding error onto the columns not yet rounded, in the proportions that keep that loss smallest
(the inverse Hessian's Cholesky factor gives them for every column at once). Columns go in order
of decreasing ``H`` diagonal when every row has one scale (``act_order``): the inputs with the largest
activations are rounded first, while the most columns remain to absorb their error.

Nothing about the stored format changes: int8 codes with one float32 scale per row (or float16
per group), int4 codes with a scale and a zero per group. Only which codes and which scales is
decided differently, so the kernels, checkpoints and GGUF re-packing read these weights as they
read round-to-nearest ones.

Without calibration data ``mse_scales`` picks each row's (or group's) scale by a search over
clipping ratios of the absmax, keeping the one with the smallest squared weight error; this is
the calibration-free method.
"""

from __future__ import annotations

import torch

from graphfix.quant.scheme import Packed, QuantScheme, pack_int4

DAMP = 0.1
"""Added to ``H``'s diagonal as a fraction of its mean: keeps the factorisation defined when inputs are collinear,
and keeps GPTQ from fitting a short calibration set. On SmolLM2 (2,048 calibration tokens, output error on
other text relative to round-to-nearest) 0.01 gave 0.59 / 1.58 (a 576-input q/k/v / a 1,536-input w2), 0.1
0.49 / 1.02, 0.3 0.49 / 0.88, 1.0 0.51 / 0.83: 0.1 with enough tokens (``calibration.MAX_TOKENS``)."""
BLOCK = 32
"""Columns rounded between two updates of the remaining columns: inside a block each column is a rank-1 update
of the block's later columns, after it one GEMM updates the rest (small blocks keep the rank-1 part cheap)."""
CLIP_RATIOS = tuple(1.0 - 0.01 * i for i in range(21))
"""Clipping ratios of the absmax (1.0 down to 0.80) the scale search tries."""


def _levels(scheme: QuantScheme) -> tuple[int, int]:
    return (-127, 127) if scheme.bits == 8 else (0, 15)


def _grid(w: torch.Tensor, scheme: QuantScheme, ratio: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The (rounded to their storage dtype) scale and zero of each row of ``w`` ``(..., K)`` over its range x ratio."""
    if scheme.bits == 8:
        scale = (w.abs().amax(-1) * ratio / 127).clamp_min(1e-12).to(scheme.scale_dtype).float()
        return scale, torch.zeros_like(scale)
    lo, hi = w.amin(-1) * ratio, w.amax(-1) * ratio
    scale = ((hi - lo) / 15).clamp_min(1e-6).to(scheme.scale_dtype).float()
    return scale, lo.to(scheme.scale_dtype).float()


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    lo, hi = _levels(scheme)
    return torch.round((w - zero) / scale).clamp_(lo, hi)


def mse_scales(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row (or group) of ``w`` ``(..., K)``: the scale and zero among ``CLIP_RATIOS`` of the range whose
    round-to-nearest has the smallest squared error. Ratio 1.0 (absmax) is a candidate, so it is never worse."""
    best_scale, best_zero = _grid(w, scheme)
    best_err = ((_round(w, best_scale[..., None], best_zero[..., None], scheme) * best_scale[..., None]
                 + best_zero[..., None] - w) ** 2).sum(-1)
    for ratio in CLIP_RATIOS[1:]:
        scale, zero = _grid(w, scheme, ratio)
        err = ((_round(w, scale[..., None], zero[..., None], scheme) * scale[..., None] + zero[..., None] - w) ** 2
               ).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _packed(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme, k: int) -> Packed:
    """Codes ``(N, K)`` (float, integral) and float32 scale/zero ``(N, groups)`` in the storage format.

    Contiguous: GPTQ builds them transposed, and the kernels index codes and scales as row-major ``(N, K)``."""
    q, scale, zero = q.contiguous(), scale.contiguous(), zero.contiguous()
    scales = scale.to(scheme.scale_dtype)
    if scheme.bits == 8:
        return Packed(scheme, q.to(torch.int8), scales, None, k)
    return Packed(scheme, pack_int4(q.to(torch.uint8)), scales, zero.to(scheme.scale_dtype), k)


def quantize_mse(weight: torch.Tensor, scheme: QuantScheme) -> Packed:
    """Round-to-nearest with the error-minimising clipped scales of ``mse_scales`` (no calibration data)."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, scheme.groups(k), -1)
    scale, zero = mse_scales(w, scheme)
    q = _round(w, scale[..., None], zero[..., None], scheme)
    return _packed(q.reshape(n, k), scale, zero, scheme, k)


def _inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper triangular ``U`` with ``U^T U = (H + damp * mean(diag H) * I)^-1``, for ``h`` ``(..., K, K)``.

    GPTQ's per-column weights are the rows of this factor. It is ``R^-1`` for the upper triangular ``R`` with
    ``H = R R^T``, and ``R`` is the lower Cholesky factor of ``H`` with rows and columns reversed: one
    factorisation and one triangular inverse instead of an inverse and two factorisations.
    """
    k = h.shape[-1]
    eye = torch.eye(k, device=h.device, dtype=h.dtype)
    for scale in (1.0, 10.0, 100.0):
        damped = h + eye * (damp * scale * h.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12))[..., None, None]
        lower, info = torch.linalg.cholesky_ex(damped.flip(-1, -2))
        if not bool(info.any()):
            break
    else:
        raise ValueError("GPTQ: the calibration inputs' second moment is not positive definite even damped")
    return torch.linalg.solve_triangular(lower.flip(-1, -2), eye, upper=True)


def quantize_gptq(weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, *, damp: float = DAMP,
                  act_order: bool = True, block: int = BLOCK) -> Packed | list[Packed]:
    """GPTQ-round ``weight`` ``(N, K)`` given ``hessian`` ``(K, K)`` (the inputs' ``X^T X``); see the module docstring.

    Batched: ``weight`` ``(B, N, K)`` with ``hessian`` ``(B, K, K)`` rounds B linears of one shape at once
    (one Python loop over the columns for all of them) and returns B packed weights.
    Scales: per row, chosen before rounding by ``mse_scales`` and the row then rounded in units of its scale;
    per group, chosen when the group's first column is reached, from the group's already-compensated weights
    (so they cover what the group will hold). ``act_order`` applies to per-row scales only (a permuted group
    would no longer be contiguous in ``K``).
    """
    batched = weight.dim() == 3
    w = (weight if batched else weight[None]).detach().float()
    h = (hessian if batched else hessian[None]).detach().to(w.device, torch.float32).clone()
    bsz, n, k = w.shape
    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0  # inputs that were always zero: their weights never matter
    diag.masked_fill_(dead, 1.0)
    grouped = scheme.group_size is not None
    size = scheme.group_size or k
    lo, hi = _levels(scheme)
    scale = torch.ones(bsz, k // size, n, device=w.device)
    zero = torch.zeros(bsz, k // size, n, device=w.device)
    if not grouped:  # the row's scale is fixed: round in its units (fewer operations a column)
        scale[:, 0] = mse_scales(w, scheme)[0]
    # Columns as rows ``(B, K, N)``: the column being rounded and the ones it updates are contiguous.
    wt = w.transpose(1, 2).masked_fill(dead[..., None], 0.0)
    wt = (wt / scale[:, :1] if not grouped else wt).contiguous()
    if act_order and not grouped:
        perm = torch.argsort(diag, dim=-1, descending=True)
        wt = wt.gather(1, perm[..., None].expand(-1, -1, n))
        h = h.gather(-1, perm[:, None, :].expand(-1, k, -1)).gather(-2, perm[:, :, None].expand(-1, -1, k))
    else:
        perm = None
    u = _inverse_factor(h, damp)
    del h
    if grouped:
        block = max(size, block // size * size)  # a group never straddles two blocks
    q = torch.empty_like(wt)
    for start in range(0, k, block):
        end = min(start + block, k)
        wb, ub = wt[:, start:end], u[:, start:end, start:end]
        err = torch.empty_like(wb)
        for i in range(end - start):
            col = start + i
            x = wb[:, i]
            if grouped:
                g = col // size
                if col % size == 0:
                    s, z = mse_scales(wt[:, col:col + size].transpose(1, 2), scheme)
                    scale[:, g], zero[:, g] = s, z
                s, z = scale[:, g], zero[:, g]
                qc = torch.round((x - z) / s).clamp_(lo, hi)
                e = (x - qc * s - z) / ub[:, i, i, None]
            else:
                qc = torch.round(x).clamp_(lo, hi)
                e = (x - qc) / ub[:, i, i, None]
            q[:, col] = qc
            wb[:, i + 1:] -= ub[:, i, i + 1:, None] * e[:, None, :]
            err[:, i] = e
        wt[:, end:].baddbmm_(u[:, start:end, end:].transpose(1, 2), err, alpha=-1)
    if perm is not None:
        q = q.gather(1, torch.argsort(perm, dim=-1)[..., None].expand(-1, -1, n))
    q, scale, zero = q.transpose(1, 2), scale.transpose(1, 2), zero.transpose(1, 2)
    out = [_packed(q[b], scale[b], zero[b], scheme, k) for b in range(bsz)]
    return out if batched else out[0]
