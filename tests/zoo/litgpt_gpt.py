"""litgpt's ``GPT`` (PyPI ``litgpt==0.5.13``), driven by litgpt's own ``generate``.

A Llama-style ``litgpt.Config``: RMSNorm, ``LLaMAMLP``, full rotary, no biases,
grouped-query attention through ``n_query_groups``. The loop is what
``litgpt.generate.base.main`` does: size the model to the prompt plus the new tokens
(``model.max_seq_length``), ``model.set_kv_cache(batch_size=1)``, then
``litgpt.generate.base.generate`` with ``temperature=0`` (litgpt's greedy: ``sample``
takes the argmax when the temperature is 0). Each call passes ``input_pos`` (int64,
``arange`` for the prefill, then a one-element tensor bumped with ``add_``) and
``input_pos_maxp1``, a Python int that grows by one each step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tests.zoo._common import PROMPT_IDS, randomize_

PROMPT = torch.tensor(PROMPT_IDS, dtype=torch.int64)
"""litgpt's prompts are 1-D ``(T,)``; ``generate`` adds the batch dimension itself."""

BLOCK_SIZE = 128
"""The config's context length: the longest ``loop`` is ``len(PROMPT) + steps + 1`` positions."""


def config():
    """The tiny Llama-style ``litgpt.Config``."""
    from litgpt import Config

    return Config(
        name="zoo-llama",
        block_size=BLOCK_SIZE,
        vocab_size=128,
        padded_vocab_size=128,
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_query_groups=2,
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        mlp_class_name="LLaMAMLP",
        intermediate_size=128,
        rope_base=10000,
    )


def build(seed: int = 0) -> torch.nn.Module:
    """litgpt's ``GPT`` of the tiny config, weights from ``seed``, eval mode (no KV cache yet: ``loop`` sets it)."""
    from litgpt import GPT

    torch.manual_seed(seed)
    return randomize_(GPT(config()), seed).eval()


def _prepare_kv_cache(model: torch.nn.Module, max_returned_tokens: int) -> None:
    """What litgpt's ``generate.base.main`` does before generating, and after each sample (zeroed caches)."""
    if model.max_seq_length != max_returned_tokens or model.transformer.h[0].attn.kv_cache is None:
        model.max_seq_length = max_returned_tokens
        model.set_kv_cache(batch_size=1)
    else:
        for block in model.transformer.h:
            block.attn.kv_cache.reset_parameters()


def loop(model: torch.nn.Module, steps: int = 32) -> torch.Tensor:
    """litgpt's greedy ``generate`` over ``PROMPT``: the prefill's token and ``steps`` decode tokens, ``(1, steps + 1)``."""
    from litgpt.generate.base import generate

    max_returned_tokens = len(PROMPT) + steps + 1
    _prepare_kv_cache(model, max_returned_tokens)
    new_tokens = generate(model, PROMPT, max_returned_tokens, temperature=0.0, include_prompt=False)
    return new_tokens.view(1, -1).clone()


def logits_without_cache(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``model(ids)`` with no ``input_pos``: litgpt's path that ignores the KV cache (plain causal attention)."""
    with torch.no_grad():
        return model(ids)


def entry() -> tuple[torch.nn.Module, Callable]:
    """``package.module:function`` form: ``(build(), loop)``."""
    return build(), loop
