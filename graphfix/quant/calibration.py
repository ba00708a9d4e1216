"""Calibration for GPTQ rounding: which tokens, how the model is run on them, and the inputs' second moments.

GPTQ needs, for every linear, ``H = X^T X`` of the inputs the linear sees on real text. The
tokens are the user's (``quantize(..., calibration=ids)``) or, by default, the shipped English
text ``calibration_text.txt`` (the Apache License 2.0 and sections of the Python Language
Reference, see ``calibration_text.NOTICE``) through the model's tokenizer (given, or found from the
model's config). It is not the text the quality bench evaluates on
(``tests/fixtures/quant_eval_text.txt``, the PSF licence).

How many tokens matters more than anything else (SmolLM2-135M int8, docs/quantization.md): ``H`` of a
1,536-input ``w2`` from 2,048 tokens is nearly singular and GPTQ fits it, worsening the error on
other text; 16,384 tokens reach +0.49% perplexity, 2,048 only +0.90 to +1.02%.

The model is run the way its kind is called, in chunks of at most ``CHUNK`` tokens (each chunk
its own sequence from position 0): an engine ``StepModel`` (``step(tokens, input_pos)``, e.g.
``LlamaDecoder``) or a Hugging Face causal LM (``model(input_ids=..., use_cache=False)``).
Anything else has no forward graphfix can call without guessing, and ``quantize`` falls back to
the calibration-free method (``forward_for`` returns ``None``). Every linear's ``H`` comes from one
run of the unquantized model (forward pre-hooks), float32, on the model's device.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

TEXT = Path(__file__).resolve().with_name("calibration_text.txt")
MAX_TOKENS = 16384
"""Calibration tokens taken from the text by default (the shipped text has about 23,700 SmolLM2 tokens): the
fewest measured to keep SmolLM2's int8 within 0.5% (a CPU spends minutes on them, a GPU seconds)."""
CHUNK = 512
"""Tokens per forward call: bounded so that attention's memory stays small and short caches fit."""

Forward = Callable[[torch.Tensor], Any]


def text_tokens(tokenizer: Any, text: str | None = None, max_tokens: int = MAX_TOKENS) -> torch.Tensor:
    """Token ids ``(1, T)`` of ``text`` (default: the shipped calibration text), at most ``max_tokens``."""
    ids = tokenizer(text if text is not None else TEXT.read_text(), return_tensors="pt").input_ids
    return ids[:, :max_tokens]


def find_tokenizer(model: nn.Module) -> Any | None:
    """The tokenizer of a Hugging Face model whose config names a local folder or GGUF file, else ``None``.

    ``config.name_or_path`` is where the weights were read (a model folder, a GGUF file, or the folder
    holding exactly one GGUF file for a model loaded with ``gguf_file=``). Nothing is downloaded.
    """
    from graphfix.cli.generate_cmd import _tokenizer

    spec = getattr(getattr(model, "config", None), "name_or_path", None) or getattr(model, "tokenizer_source", None)
    if not spec or not Path(str(spec)).exists():
        return None
    path = Path(str(spec))
    tok = _tokenizer(str(path))
    if tok is None and path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            tok = _tokenizer(str(ggufs[0]))
    return tok


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def forward_for(model: nn.Module) -> Forward | None:
    """A call that runs ``model`` on token ids ``(B, T)`` for calibration, or ``None`` when there is none to trust."""
    device = _device(model)
    if callable(getattr(model, "step", None)) and getattr(model, "max_seq_len", 0):
        def step(ids: torch.Tensor) -> Any:
            pos = torch.arange(ids.shape[1], device=device).expand(ids.shape[0], -1)
            if getattr(model, "supports_logits_index", False):  # the LM head's logits are not needed: one column
                last = torch.zeros(ids.shape[0], dtype=torch.long, device=device)
                return model.step(ids.to(device), pos, logits_index=last)
            return model.step(ids.to(device), pos)

        return step
    from graphfix.diagnose.drivers import is_hf_causal_lm

    if is_hf_causal_lm(model):
        import inspect

        keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        return lambda ids: model(input_ids=ids.to(device), use_cache=False, **keep)
    return None


def _chunk_len(model: nn.Module) -> int:
    limit = getattr(model, "max_seq_len", 0) or getattr(getattr(model, "config", None), "max_position_embeddings", 0)
    return min(CHUNK, limit) if limit else CHUNK


def as_tokens(calibration: Any) -> torch.Tensor:
    """User calibration (a tensor, or a list of token ids or of lists of them) -> ``(rows, T)`` int64 ids."""
    ids = calibration if isinstance(calibration, torch.Tensor) else torch.tensor(calibration)
    ids = ids.long()
    if ids.numel() < 2:
        from graphfix.errors import InputError

        raise InputError("calibration needs at least 2 token ids", hint="or calibration=None for the shipped text")
    return ids[None] if ids.dim() == 1 else ids.reshape(-1, ids.shape[-1])


@torch.no_grad()
def hessians(model: nn.Module, linears: dict[str, nn.Module], forward: Forward,
             tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """``X^T X`` (float32, ``(K, K)``) of each of ``linears``' inputs over ``tokens`` run through ``forward``."""
    out: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            acc = out.get(name)
            out[name] = x.T @ x if acc is None else acc.addmm_(x.T, x)

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()]
    try:
        chunk = _chunk_len(model)
        for row in tokens:
            for start in range(0, row.shape[0], chunk):
                piece = row[start:start + chunk]
                if piece.shape[0] > 1:
                    forward(piece[None])
    finally:
        for h in handles:
            h.remove()
    return out
