"""Meta's reference ``llama_models.llama3.model.Transformer`` (fairscale layers), driven by ``Llama3.generate``.

The model is ``tests.helpers_meta.build_meta_transformer`` (world-size-1 gloo group
and fairscale model parallel set up on first use, deterministic weights). The loop is
Meta's own ``llama_models.llama3.generation.Llama3.generate`` at temperature 0:
``model.forward(tokens[:, prev_pos:cur_pos], prev_pos)`` with a Python-int
``start_pos``, a KV cache preallocated in every ``Attention`` and written in place at
``start_pos`` (so nothing needs resetting between generations: every position is
written before it is read).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable, Mapping

import torch

from tests.zoo._common import PROMPT


class IdsTokenizer:
    """What ``Llama3`` reads from a tokenizer, for a model whose tokens are plain ids (no tiktoken model file).

    ``ChatFormat`` looks up ``<|image|>``; ``generate`` pads with ``pad_id``, stops on
    ``stop_tokens`` and decodes every token. The one stop token is ``vocab_size``,
    which the model's logits cannot select, so a generation always runs its full length.
    """

    pad_id = -1

    def __init__(self, vocab_size: int) -> None:
        self.special_tokens: Mapping[str, int] = types.MappingProxyType({"<|image|>": vocab_size - 1})
        self.stop_tokens = [vocab_size]

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def import_generation() -> types.ModuleType:
    """``llama_models.llama3.generation``, importable without torchvision.

    ``generation.py`` imports the multimodal ``CrossAttentionTransformer`` only to tell
    text and vision models apart (``isinstance``); its module needs torchvision, which
    has no build for the CPU torch the tests install. An empty class stands in for
    that one import while ``generation`` loads; ``sys.modules`` is restored afterwards.
    """
    name = "llama_models.llama3.generation"
    if name in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return importlib.import_module(name)
    stub_name = "llama_models.llama3.multimodal.model"
    previous = sys.modules.get(stub_name)
    stub = types.ModuleType(stub_name)
    stub.CrossAttentionTransformer = type("CrossAttentionTransformer", (torch.nn.Module,), {})
    sys.modules[stub_name] = stub
    try:
        return importlib.import_module(name)
    finally:
        if previous is None:
            sys.modules.pop(stub_name, None)
        else:
            sys.modules[stub_name] = previous


def build(seed: int = 0) -> torch.nn.Module:
    """Meta's ``Transformer`` of ``tests.helpers_meta.TINY_ARGS`` (dim 64, 2 layers, 4 heads / 2 KV heads, vocab 128)."""
    from tests.helpers_meta import build_meta_transformer

    return build_meta_transformer(seed)


def loop(model: torch.nn.Module, steps: int = 32) -> torch.Tensor:
    """``Llama3.generate`` at temperature 0 on ``PROMPT``: the prefill's token and ``steps`` decode tokens."""
    from llama_models.llama3.chat_format import LLMInput

    generation = import_generation()
    llama = generation.Llama3(model, IdsTokenizer(model.params.vocab_size), model.params)
    steps_out = llama.generate([LLMInput(tokens=PROMPT[0].tolist())], temperature=0, max_gen_len=steps + 1)
    tokens = [[result.token for result in step if not result.ignore_token] for step in steps_out]
    return torch.tensor([[t for step in tokens for t in step]], dtype=torch.int64)


def logits_without_cache(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``forward(ids, 0)``: Meta's code always writes its cache, so this is one causal pass over the whole sequence."""
    return model.forward(ids, 0)


def entry() -> tuple[torch.nn.Module, Callable]:
    """``package.module:function`` form: ``(build(), loop)``."""
    return build(), loop
