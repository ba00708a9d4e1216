"""Drive a model through a realistic inference loop: one prefill, then decode steps.

Diagnosis is only as good as the calls it makes: a single forward misses the
prefill-to-decode recompile, the cache growing, and positions changing. A
driver knows the model's calling convention and its own cache mechanism
(HF ``DynamicCache``, Meta's ``forward(tokens, start_pos)`` with module-attribute
caches, or plain example inputs) and feeds each step the previous step's
greedy token, exactly like generation does.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from graphfix.errors import InputError

PhaseHook = Callable[[str], None]


class Driver(Protocol):
    """Runs ``fn`` (the model or its compiled form) through prefill and decode."""

    description: str
    prefill_tokens: int
    decode_steps: int

    def run(self, fn: Callable[..., Any], on_phase: PhaseHook | None = None, steps: int | None = None) -> list[torch.Tensor]:
        ...


def _param_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def vocab_size(model: nn.Module) -> int:
    """Vocabulary size from the config, or the first embedding table."""
    config = getattr(model, "config", None) or getattr(model, "params", None)
    for attr in ("vocab_size",):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    for module in model.modules():
        n = getattr(module, "num_embeddings", None)
        if isinstance(n, int):
            return n
    raise InputError("cannot tell the model's vocabulary size", hint="pass example inputs or a driver")


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    if logits.device.type == "meta":
        return torch.zeros(logits.shape[0], 1, dtype=torch.long, device="meta")
    return logits[:, -1:].argmax(-1)


def prompt_tokens(model: nn.Module, length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A deterministic pseudo-random prompt of real token ids."""
    device = _param_device(model)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, max(2, vocab_size(model)), (batch, length), generator=gen)
    return ids.to(device)


def greedy_loop(call: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, steps: int,
                on_phase: PhaseHook | None = None) -> list[torch.Tensor]:
    """A prefill of ``ids``, then ``steps`` greedy decode steps, without autograd.

    ``call(ids)`` runs the model on the new tokens (the prompt, then one token a step) and
    returns the logits; the next call gets the greedy token of the last position. Returns
    the greedy token of every call. ``on_phase`` is told ``prefill``, ``decode:1``, ... first.
    """
    tokens: list[torch.Tensor] = []
    with torch.no_grad():
        for step in range(steps + 1):
            if on_phase:
                on_phase("prefill" if step == 0 else f"decode:{step}")
            ids = _greedy(call(ids))
            tokens.append(ids)
    return tokens


@dataclasses.dataclass
class PromptDriver:
    """A prompt (``prompt``, or ``prefill_tokens`` pseudo-random ids of ``batch`` rows) and ``decode_steps``."""

    prefill_tokens: int = 8
    decode_steps: int = 16
    batch: int = 1
    description: str = ""
    prompt: torch.Tensor | None = None

    def start(self, fn: Callable[..., Any], model: nn.Module | None,
              steps: int | None) -> tuple[nn.Module, torch.Tensor, int]:
        """``(model, prompt ids, decode steps)`` of a run of ``fn`` (the model or its compiled form)."""
        model = model if model is not None else unwrap_module(fn)
        ids = self.prompt if self.prompt is not None else prompt_tokens(model, self.prefill_tokens, self.batch)
        return model, ids, self.decode_steps if steps is None else steps


@dataclasses.dataclass
class HFDriver(PromptDriver):
    """Hugging Face causal LM: the same inputs ``generate()`` passes, with a ``DynamicCache``."""

    description: str = "hf-dynamic-cache"

    def run(self, fn: Callable[..., Any], on_phase: PhaseHook | None = None, steps: int | None = None,
            model: nn.Module | None = None) -> list[torch.Tensor]:
        from transformers import DynamicCache

        model, ids, n_steps = self.start(fn, model, steps)
        device = ids.device
        cache_name, with_positions = cache_kwarg(model), "cache_position" in forward_params(type(model))
        cache = DynamicCache(config=model.config)
        if device.type == "meta":
            _preinit_cache(cache, model, ids.shape[0])
        mask = torch.ones_like(ids)
        total = 0

        def call(new: torch.Tensor) -> torch.Tensor:
            nonlocal mask, total
            if total:
                mask = torch.cat([mask, torch.ones_like(new)], dim=1)
            total += new.shape[1]
            kwargs = {} if device.type == "meta" else {"attention_mask": mask}  # an all-ones mask: same math
            if with_positions:  # newer forwards take none: they count positions from the cache's length
                kwargs["cache_position"] = torch.arange(total - new.shape[1], total, device=device)
            return fn(input_ids=new, **{cache_name: cache}, use_cache=True, **kwargs).logits

        return greedy_loop(call, ids, n_steps, on_phase)


@functools.cache
def forward_params(cls: type) -> frozenset[str]:
    """The parameter names of ``cls.forward``, read once per class.

    The class's, not the instance's: once graphfix's HF runtime is installed, the instance's
    ``forward`` is graphfix's wrapper, and the class's is what transformers defines.
    """
    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def cache_kwarg(model: nn.Module) -> str:
    """The name ``model``'s forward takes its KV cache by: ``cache`` from transformers 5.24 on, ``past_key_values``
    before. 5.24 still maps ``past_key_values`` to ``cache``, with a FutureWarning (removed in 5.40)."""
    return "cache" if "cache" in forward_params(type(model)) else "past_key_values"


def _preinit_cache(cache: Any, model: nn.Module, batch: int) -> None:
    """On the meta device, give each cache layer empty tensors before tracing.

    ``DynamicCache`` creates its first tensor lazily inside forward; Dynamo
    cannot fake a meta tensor made there, so the layers are started empty here,
    which leaves the traced code path unchanged.
    """
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    empty = torch.empty(batch, heads, 0, head_dim, device="meta", dtype=next(model.parameters()).dtype)
    for layer in range(cfg.num_hidden_layers):
        cache.update(empty, empty, layer)


@dataclasses.dataclass
class MetaDriver(PromptDriver):
    """Meta reference style: ``forward(tokens, start_pos: int)`` with caches kept in the modules."""

    description: str = "meta-start-pos"

    def run(self, fn: Callable[..., Any], on_phase: PhaseHook | None = None, steps: int | None = None,
            model: nn.Module | None = None) -> list[torch.Tensor]:
        model, ids, n_steps = self.start(fn, model, steps)
        limit = max_seq_len(model)
        if limit is not None and ids.shape[1] + n_steps > limit:
            raise InputError(
                f"prompt of {ids.shape[1]} tokens plus {n_steps} decode steps exceeds the model's cache of {limit}",
                hint="use a shorter prompt, fewer steps, or build the model with a larger max_seq_len",
            )
        pos = 0

        def call(new: torch.Tensor) -> torch.Tensor:
            nonlocal pos
            logits = fn(new, pos)
            pos += new.shape[1]
            return logits

        return greedy_loop(call, ids, n_steps, on_phase)


@dataclasses.dataclass
class CallsDriver:
    """User-supplied example calls: a list of ``(args, kwargs)``, the first one is the prefill."""

    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]
    description: str = "example-inputs"

    @property
    def prefill_tokens(self) -> int:
        return 0

    @property
    def decode_steps(self) -> int:
        return max(0, len(self.calls) - 1)

    def run(self, fn: Callable[..., Any], on_phase: PhaseHook | None = None, steps: int | None = None,
            model: nn.Module | None = None) -> list[Any]:
        outs = []
        calls = self.calls if steps is None else self.calls[: steps + 1]
        with torch.no_grad():
            for i, (args, kwargs) in enumerate(calls):
                if on_phase:
                    on_phase("prefill" if i == 0 else f"decode:{i}")
                outs.append(fn(*args, **kwargs))
        return outs


def max_seq_len(model: nn.Module) -> int | None:
    params = getattr(model, "params", None)
    value = getattr(params, "max_seq_len", None)
    return value if isinstance(value, int) else None


def unwrap_module(fn: Any) -> nn.Module:
    """The eager module behind a compiled module (``torch.compile(model)`` keeps it as ``_orig_mod``)."""
    module = getattr(fn, "_orig_mod", fn)
    if not isinstance(module, nn.Module):
        raise InputError("cannot find the model behind the callable", hint="pass the nn.Module to diagnose")
    return module


def is_hf_causal_lm(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel) and hasattr(model, "config")


def takes_start_pos(model: nn.Module) -> bool:
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return False
    return len(params) >= 2 and params[1] in ("start_pos", "input_pos", "pos")


def auto_driver(model: nn.Module, prefill_tokens: int = 8, decode_steps: int = 16) -> Driver:
    """Pick the driver for the model's calling convention."""
    if is_hf_causal_lm(model):
        return HFDriver(prefill_tokens, decode_steps)
    if takes_start_pos(model):
        return MetaDriver(prefill_tokens, decode_steps)
    raise InputError(
        f"do not know how to drive {type(model).__name__}.forward",
        hint="pass example inputs (graphfix.diagnose(model, inputs=[...])) or return them from your module:function",
    )
