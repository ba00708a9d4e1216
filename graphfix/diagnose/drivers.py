"""Drive a model through a realistic inference loop: one prefill, then decode steps.

Diagnosis and verification are only as good as the calls they make: a single forward
misses the prefill-to-decode recompile, the cache growing and positions changing. The
truth is the user's own loop, so a driver is, first of all, **the user's loop**
(``LoopDriver``: ``fn(model)`` runs the model the way their code does and returns the
generated tokens). When no loop is given, graphfix recognises the common calling
conventions by the forward's signature, never by a guess that ends inside the model:

==================  =====================================================================
``hf``              a transformers ``PreTrainedModel``: ``input_ids``, a ``DynamicCache``
``meta-start-pos``  ``forward(tokens, start_pos: int)``, caches kept in the modules (Meta)
``input-pos``       ``forward(idx, input_pos: Tensor)`` with ``setup_caches`` (gpt-fast) or
                    ``set_kv_cache`` (litgpt): static caches written at tensor positions
``fms``             ``forward(x, ..., past_key_value_states=..., use_cache=...)`` (IBM fms)
==================  =====================================================================

Anything else is refused in one line that names the forward's signature and ``--driver``.
Drivers call the model (``model(...)``); graphfix routes those calls to a compiled forward,
labels their phases and counts them with ``graphfix.diagnose.intercept``, the same way for
a built-in driver and for the user's loop.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from graphfix.diagnose.intercept import LoopStopped, intercepted
from graphfix.errors import InputError


class Driver(Protocol):
    """Runs the model through a prefill and decode steps; returns the generated tokens (or ``None``)."""

    description: str
    prefill_tokens: int
    decode_steps: int
    auto: bool
    """Chosen by graphfix from the forward's signature (a failure then is graphfix's guess, not the model)."""

    def run(self, model: nn.Module, steps: int | None = None) -> torch.Tensor | None:
        ...


def _param_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def vocab_size(model: nn.Module) -> int:
    """Vocabulary size from the config, or the first embedding table."""
    for holder in (getattr(model, "config", None), getattr(model, "params", None)):
        for attr in ("vocab_size", "padded_vocab_size", "src_vocab_size"):
            value = getattr(holder, attr, None)
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


def greedy_loop(call: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, steps: int) -> torch.Tensor:
    """A prefill of ``ids``, then ``steps`` greedy decode steps, without autograd.

    ``call(ids)`` runs the model on the new tokens (the prompt, then one token a step) and
    returns the logits; the next call gets the greedy token of the last position. Returns
    ``(batch, steps + 1)``: the greedy token of every call.
    """
    tokens: list[torch.Tensor] = []
    with torch.no_grad():
        for _ in range(steps + 1):
            ids = _greedy(call(ids))
            tokens.append(ids)
    return torch.cat(tokens, dim=1)


@dataclasses.dataclass
class PromptDriver:
    """A prompt (``prompt``, or ``prefill_tokens`` pseudo-random ids of ``batch`` rows) and ``decode_steps``."""

    prefill_tokens: int = 8
    decode_steps: int = 16
    batch: int = 1
    description: str = ""
    prompt: torch.Tensor | None = None
    auto: bool = True

    def __post_init__(self) -> None:
        if self.prompt is not None:
            if self.prompt.dim() == 1:
                self.prompt = self.prompt[None]
            self.prefill_tokens, self.batch = int(self.prompt.shape[1]), int(self.prompt.shape[0])

    def start(self, model: nn.Module, steps: int | None) -> tuple[torch.Tensor, int]:
        """``(prompt ids on the model's device, decode steps)`` of a run."""
        ids = self.prompt if self.prompt is not None else prompt_tokens(model, self.prefill_tokens, self.batch)
        return ids.to(_param_device(model)), self.decode_steps if steps is None else steps


@dataclasses.dataclass
class HFDriver(PromptDriver):
    """Hugging Face causal LM: the same inputs ``generate()`` passes, with a ``DynamicCache``."""

    description: str = "hf-dynamic-cache"

    def run(self, model: nn.Module, steps: int | None = None) -> torch.Tensor:
        from transformers import DynamicCache

        ids, n_steps = self.start(model, steps)
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
            return model(input_ids=new, **{cache_name: cache}, use_cache=True, **kwargs).logits

        return greedy_loop(call, ids, n_steps)


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


def _check_fits(ids: torch.Tensor, steps: int, limit: int | None) -> None:
    if limit is not None and ids.shape[1] + steps > limit:
        raise InputError(
            f"prompt of {ids.shape[1]} tokens plus {steps} decode steps exceeds the model's cache of {limit}",
            hint="use a shorter prompt, fewer steps, or build the model with a larger max_seq_len",
        )


@dataclasses.dataclass
class MetaDriver(PromptDriver):
    """Meta reference style: ``forward(tokens, start_pos: int)`` with caches kept in the modules."""

    description: str = "meta-start-pos"

    def run(self, model: nn.Module, steps: int | None = None) -> torch.Tensor:
        ids, n_steps = self.start(model, steps)
        _check_fits(ids, n_steps, max_seq_len(model))
        pos = 0

        def call(new: torch.Tensor) -> torch.Tensor:
            nonlocal pos
            logits = model(new, pos)
            pos += new.shape[1]
            return logits

        return greedy_loop(call, ids, n_steps)


CACHE_SETUP_METHODS = ("setup_caches", "set_kv_cache")
"""Methods that allocate a static cache before a tensor-position forward (gpt-fast, litgpt)."""


@dataclasses.dataclass
class InputPosDriver(PromptDriver):
    """``forward(idx, input_pos: Tensor)`` with a static cache set up first (gpt-fast, litgpt).

    Positions are int64 tensors: ``arange(T)`` for the prompt, then ``[pos]`` per step.
    """

    description: str = "input-pos"
    position_arg: str = "input_pos"

    def run(self, model: nn.Module, steps: int | None = None) -> torch.Tensor:
        ids, n_steps = self.start(model, steps)
        setup_static_cache(model, batch=ids.shape[0], length=ids.shape[1] + n_steps + 1)
        pos = 0

        def call(new: torch.Tensor) -> torch.Tensor:
            nonlocal pos
            input_pos = torch.arange(pos, pos + new.shape[1], device=new.device)
            pos += new.shape[1]
            return model(new, **{self.position_arg: input_pos})

        return greedy_loop(call, ids, n_steps)


def setup_static_cache(model: nn.Module, *, batch: int, length: int) -> None:
    """Call the model's own cache set-up method (``setup_caches`` / ``set_kv_cache``) for ``length`` positions."""
    for name in CACHE_SETUP_METHODS:
        method = getattr(model, name, None)
        if callable(method):
            break
    else:
        raise InputError(f"{type(model).__name__} takes tensor positions but has no {' or '.join(CACHE_SETUP_METHODS)}",
                         hint="pass your own loop as a driver (--driver pkg.mod:fn)")
    params = inspect.signature(method).parameters
    limit = getattr(model, "max_seq_length", None)
    if isinstance(limit, int) and 0 < limit < length:
        raise InputError(f"a prompt plus decode steps of {length} positions exceeds {type(model).__name__}'s "
                         f"max_seq_length {limit}", hint="use a shorter prompt or fewer steps")
    kwargs: dict[str, Any] = {}
    for names, value in ((("max_batch_size", "batch_size"), batch), (("max_seq_length", "max_seq_len"), length)):
        found = next((n for n in names if n in params), None)
        if found is not None:
            kwargs[found] = value
    method(**kwargs)


@dataclasses.dataclass
class FMSDriver(PromptDriver):
    """IBM foundation-model-stack style: ``forward(x, past_key_value_states=..., use_cache=True)`` returns
    ``(logits, cache)``, and the next call gets that cache back."""

    description: str = "fms-past-key-value-states"

    def run(self, model: nn.Module, steps: int | None = None) -> torch.Tensor:
        ids, n_steps = self.start(model, steps)
        cache: Any = None

        def call(new: torch.Tensor) -> torch.Tensor:
            nonlocal cache
            logits, cache = model(new, past_key_value_states=cache, use_cache=True)
            return logits

        return greedy_loop(call, ids, n_steps)


@dataclasses.dataclass
class CallsDriver:
    """User-supplied example calls: a list of ``(args, kwargs)``, the first one is the prefill."""

    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]
    description: str = "example-inputs"
    auto: bool = False

    @property
    def prefill_tokens(self) -> int:
        return 0

    @property
    def decode_steps(self) -> int:
        return max(0, len(self.calls) - 1)

    def run(self, model: nn.Module, steps: int | None = None) -> None:
        calls = self.calls if steps is None else self.calls[: steps + 1]
        with torch.no_grad():
            for args, kwargs in calls:
                model(*args, **kwargs)


@dataclasses.dataclass
class LoopDriver:
    """The user's own loop: ``fn(model)`` runs prefill and decode steps as their code does, returns the tokens.

    ``steps`` (a shorter run) stops the loop at the call after the prefill and ``steps`` decode calls.
    """

    fn: Callable[[nn.Module], Any]
    description: str = ""
    auto: bool = False
    prefill_tokens: int = 0
    """Learned from the first run (the first call's token count)."""
    decode_steps: int = 0
    """Learned from the first run (calls after the first)."""

    def __post_init__(self) -> None:
        if not self.description:
            name = getattr(self.fn, "__qualname__", None) or type(self.fn).__name__
            self.description = f"loop:{getattr(self.fn, '__module__', '') or ''}.{name}".replace(":.", ":")

    def run(self, model: nn.Module, steps: int | None = None) -> torch.Tensor | None:
        limit = None if steps is None else steps + 1
        with intercepted(model, max_calls=limit) as log:
            try:
                with torch.no_grad():
                    out = self.fn(model)
            except LoopStopped:
                out = None
        if steps is None:
            self.decode_steps = max(0, log.calls - 1)
            self.prefill_tokens = (log.new_tokens[0] or 0) if log.new_tokens else 0
        return as_token_tensor(out)


def as_token_tensor(out: Any) -> torch.Tensor | None:
    """A loop's returned tokens as ``(batch, n)`` int64 on CPU, or ``None`` when it returned none."""
    if out is None:
        return None
    if isinstance(out, torch.Tensor):
        t = out
    elif isinstance(out, (list, tuple)) and out and all(isinstance(x, torch.Tensor) for x in out):
        t = torch.cat([x.reshape(x.shape[0] if x.dim() > 1 else 1, -1) for x in out], dim=-1)
    elif isinstance(out, (list, tuple)) and all(isinstance(x, int) for x in out):
        t = torch.tensor(out)
    else:
        raise InputError(f"the driver returned {type(out).__name__}, not the generated tokens",
                         hint="return a tensor (or list) of the token ids the loop generated")
    t = t.detach().to("cpu", torch.long)
    return t[None] if t.dim() == 1 else t.reshape(t.shape[0], -1)


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


def _signature(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(type(model).forward)
    except (TypeError, ValueError):
        return None


def _is_int_annotation(annotation: Any) -> bool:
    return annotation is int or annotation == "int"


def convention(model: nn.Module) -> str | None:
    """The calling convention ``model``'s forward signature declares (see the module docstring), or ``None``."""
    if is_hf_causal_lm(model):
        return "hf"
    sig = _signature(model)
    if sig is None:
        return None
    params = [p for name, p in sig.parameters.items() if name != "self"]
    names = [p.name for p in params]
    if "past_key_value_states" in names and "use_cache" in names:
        return "fms"
    if len(params) < 2:
        return None
    second = params[1]
    if second.name == "start_pos" or _is_int_annotation(second.annotation):
        return "meta-start-pos"
    if second.name == "input_pos" and any(callable(getattr(model, m, None)) for m in CACHE_SETUP_METHODS):
        return "input-pos"
    return None


def describe_signature(model: nn.Module) -> str:
    sig = _signature(model)
    text = str(sig).replace("(self, ", "(").replace("(self)", "()") if sig is not None else "(...)"
    return f"{type(model).__name__}.forward{text}"


NO_CONVENTION_HINT = ("give graphfix the loop your code runs: graphfix.diagnose(model, driver=fn) or --driver "
                      "pkg.mod:fn, where fn(model) runs a prefill and decode steps and returns the tokens")


def auto_driver(model: nn.Module, prefill_tokens: int = 8, decode_steps: int = 16,
                prompt: torch.Tensor | None = None) -> Driver:
    """The driver for the calling convention the model's forward declares; one line naming it otherwise."""
    found = convention(model)
    common = {"prefill_tokens": prefill_tokens, "decode_steps": decode_steps, "prompt": prompt}
    if found == "hf":
        return HFDriver(**common)
    if found == "meta-start-pos":
        return MetaDriver(**common)
    if found == "input-pos":
        return InputPosDriver(**common)
    if found == "fms":
        return FMSDriver(**common)
    sig = _signature(model)
    if sig is not None:
        params = [n for n in sig.parameters if n != "self"]
        if len(params) >= 2 and params[1] in ("input_pos", "pos", "position_ids"):
            raise InputError(f"{describe_signature(model)}: a tensor-position forward with no cache set-up method "
                             f"({' or '.join(CACHE_SETUP_METHODS)})", hint=NO_CONVENTION_HINT)
    raise InputError(f"cannot tell how to run {describe_signature(model)} in a decode loop", hint=NO_CONVENTION_HINT)


def driver_from(spec: Any, model: nn.Module, *, prefill_tokens: int = 8, decode_steps: int = 16) -> Driver:
    """A driver from what a user gave: a driver, a loop ``fn(model)``, a prompt tensor, or example calls."""
    if spec is None:
        return auto_driver(model, prefill_tokens, decode_steps)
    if hasattr(spec, "run") and hasattr(spec, "description"):
        return spec
    if isinstance(spec, torch.Tensor):
        if spec.is_floating_point() or spec.dim() not in (1, 2):
            raise InputError(f"a prompt must be token ids of shape (seq,) or (batch, seq), got {tuple(spec.shape)} "
                             f"{spec.dtype}")
        return auto_driver(model, prefill_tokens, decode_steps, prompt=spec)
    if callable(spec):
        return LoopDriver(spec)
    if isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
        return CallsDriver(normalize_calls(spec))
    raise InputError(f"do not know how to use a {type(spec).__name__} as a driver",
                     hint="give a loop fn(model), a prompt tensor, or a list of example calls")


def normalize_calls(inputs: Sequence[Any]) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Example calls as ``(args, kwargs)``: a dict is kwargs, a tuple/list args, anything else one argument."""
    calls = []
    for item in inputs:
        if isinstance(item, dict):
            calls.append(((), dict(item)))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict) and isinstance(item[0], tuple):
            calls.append(item)
        elif isinstance(item, (tuple, list)):
            calls.append((tuple(item), {}))
        else:
            calls.append(((item,), {}))
    if not calls:
        raise InputError("no example inputs given", hint="pass at least one call: a prefill")
    return calls
