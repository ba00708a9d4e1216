"""The model zoo: tiny Llama models from distinct codebases, each driven by its own codebase's decode loop.

Every module has ``build(seed) -> model``, ``loop(model, steps) -> (1, steps + 1)
ids``, ``entry() -> (model, loop)`` (the ``package.module:function`` form),
``PROMPT`` and ``logits_without_cache(model, ids)`` (one pass over a whole sequence,
to check what the loop's cache produced). See ``tests/zoo/README.md``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

ZOO: dict[str, str] = {
    "litgpt": "tests.zoo.litgpt_gpt",
    "fms": "tests.zoo.fms_llama",
    "meta": "tests.zoo.meta_llama3",
    "gpt-fast": "tests.zoo.gpt_fast_style",
    "hf-llama": "tests.zoo.hf_loop",
    "hf-qwen2": "tests.zoo.hf_loop",
    "research": "tests.zoo.research_style",
}
"""Zoo entry name -> the module that builds and drives it."""

ENTRY_FUNCTIONS: dict[str, str] = {"hf-qwen2": "entry_qwen2"}
"""The entry function of the names whose module holds more than one model (default ``entry``)."""

BUILDERS: dict[str, str] = {"hf-qwen2": "build_qwen2"}
"""The builder of the names whose module holds more than one model (default ``build``)."""


def entry_spec(name: str) -> str:
    """``"package.module:function"`` of a zoo entry: what graphfix's MODEL argument accepts."""
    return f"{ZOO[name]}:{ENTRY_FUNCTIONS.get(name, 'entry')}"


def module(name: str):
    """The module of a zoo entry (``PROMPT``, ``loop``, ``logits_without_cache``, ...)."""
    if name not in ZOO:
        raise KeyError(f"no zoo entry {name!r}; known: {', '.join(ZOO)}")
    return importlib.import_module(ZOO[name])


def builder(name: str) -> Callable[..., torch.nn.Module]:
    """``build(seed=0)`` of a zoo entry."""
    return getattr(module(name), BUILDERS.get(name, "build"))


def load(name: str) -> tuple[torch.nn.Module, Callable[..., torch.Tensor]]:
    """``(model, loop)`` of a zoo entry: its entry function's result."""
    return getattr(module(name), ENTRY_FUNCTIONS.get(name, "entry"))()
