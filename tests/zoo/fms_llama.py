"""IBM foundation-model-stack's ``fms.models.llama.LLaMA`` (PyPI ``ibm-fms``), driven by ``fms.utils.generation.generate``.

fms keeps no cache in the model: with ``use_cache=True`` every call returns
``(logits, past_key_value_states)``, one ``(k, v)`` pair per layer that attention
grows with ``torch.cat``, and ``generate`` feeds it back in as a keyword argument
together with only the new token. Positions are not passed: the rotary embedding
derives them from the cache length. Greedy is ``do_sample=False``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tests.zoo._common import PROMPT, randomize_

MAX_SEQ_LEN = 128
"""``max_expected_seq_len`` of the config (the RoPE table) and ``generate``'s ``max_seq_len``."""


def config():
    """The tiny ``LLaMAConfig``: 2 layers, width 64, 4 heads over 2 KV heads, vocab 160, fused QKV as fms defaults."""
    from fms.models.llama import LLaMAConfig

    return LLaMAConfig(src_vocab_size=160, emb_dim=64, nheads=4, kvheads=2, nlayers=2, multiple_of=16,
                       max_expected_seq_len=MAX_SEQ_LEN)


def build(seed: int = 0) -> torch.nn.Module:
    """fms's ``LLaMA`` of the tiny config, weights from ``seed``, eval mode."""
    from fms.models.llama import LLaMA

    torch.manual_seed(seed)
    return randomize_(LLaMA(config()), seed).eval()


def loop(model: torch.nn.Module, steps: int = 32) -> torch.Tensor:
    """fms's greedy ``generate`` with ``use_cache=True``: the prefill's token and ``steps`` decode tokens, ``(1, steps + 1)``."""
    from fms.utils.generation import generate

    with torch.no_grad():
        result = generate(model, PROMPT, max_seq_len=MAX_SEQ_LEN, max_new_tokens=steps + 1, use_cache=True,
                          do_sample=False)
    return result[:, PROMPT.shape[1]:]


def logits_without_cache(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``model(ids)`` with ``use_cache=False``: one causal pass over the whole sequence."""
    with torch.no_grad():
        return model(ids)


def entry() -> tuple[torch.nn.Module, Callable]:
    """``package.module:function`` form: ``(build(), loop)``."""
    return build(), loop
