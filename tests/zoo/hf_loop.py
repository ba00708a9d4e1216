"""Hugging Face ``LlamaForCausalLM`` and ``Qwen2ForCausalLM``, driven by a hand-written greedy loop.

The loop is the one users write around ``transformers`` rather than ``generate``:
``cache = DynamicCache(config=model.config)``, then
``model(input_ids=..., past_key_values=cache, use_cache=True)`` for the prompt and for
each new token, greedy argmax of the last logits. ``past_key_values`` is the name
every supported ``transformers`` accepts; 5.x renamed it to ``cache`` and logs a
FutureWarning on every call, which ``loop`` keeps out of the output.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import torch

from tests.fixtures.tiny_hf import tiny_hf
from tests.zoo._common import PROMPT, randomize_


def build_llama(seed: int = 0) -> torch.nn.Module:
    """A tiny ``LlamaForCausalLM`` (``tests.fixtures.tiny_hf.TINY``: hidden 64, 2 layers, 4 / 2 KV heads, vocab 128)."""
    return randomize_(tiny_hf("llama", seed), seed)


def build_qwen2(seed: int = 0) -> torch.nn.Module:
    """A tiny ``Qwen2ForCausalLM`` of the same size (QKV biases, untied head)."""
    return randomize_(tiny_hf("qwen2", seed), seed)


build = build_llama


@contextlib.contextmanager
def _quiet_cache_rename() -> Iterator[None]:
    """Hide transformers' "`past_key_values` is deprecated ... Use `cache` instead" FutureWarning (5.x) in the loop."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        yield


def loop(model: torch.nn.Module, steps: int = 32) -> torch.Tensor:
    """A fresh ``DynamicCache``, the prompt, then ``steps`` single-token calls: ``(1, steps + 1)`` greedy ids."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    input_ids = PROMPT
    generated = []
    with torch.no_grad(), _quiet_cache_rename():
        for _ in range(steps + 1):
            out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
            input_ids = out.logits[:, -1:].argmax(dim=-1)
            generated.append(input_ids)
    return torch.cat(generated, dim=1)


def logits_without_cache(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``model(input_ids=ids, use_cache=False).logits``: one causal pass over the whole sequence."""
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def entry() -> tuple[torch.nn.Module, Callable]:
    """``package.module:function`` form for the Llama model: ``(build_llama(), loop)``."""
    return build_llama(), loop


def entry_qwen2() -> tuple[torch.nn.Module, Callable]:
    """``package.module:function`` form for the Qwen2 model: ``(build_qwen2(), loop)``."""
    return build_qwen2(), loop
