"""The drop-in runtime for Hugging Face causal LMs: a static cache, decode and prefill compiled apart.

``optimize`` installs it on the model *instance* (the class is untouched):

- ``model.generate`` (same signature) hands ``generate`` a ``GraphfixStaticCache`` when the
  caller gave no cache: a transformers ``StaticCache`` whose layers all hold the whole
  ``max_seq_len`` (also for sliding-window models: the window is the attention mask that
  transformers builds from the config, not a ring buffer, so nothing in the traced code
  depends on how full the window is). One cache per batch size is allocated on first use
  and reset by each ``generate`` call, so its tensors keep their addresses;
- ``model.forward`` (same signature; an eager frame that Dynamo skips) dispatches
  ``generate``'s ``self(**model_inputs)`` calls: one new token with a graphfix cache goes
  to the compiled *decode* callable (``fullgraph=True``, static shapes, compiled once),
  several tokens to the compiled *prefill* callable (``fullgraph=True``, sequence length
  marked dynamic, so a new prompt length does not recompile), anything else (no cache, a
  ``DynamicCache`` or another cache the caller built, ``inputs_embeds``, extra outputs) to
  the original forward, eagerly.

Decode and prefill are functions with code objects of their own (per model, and per set
of keyword names the caller passes: ``canonical_kwargs``), so Dynamo keeps a separate
compile cache and recompile limit for each, and the number of graphs each one compiled
can be read back (``graphs()``, ``recompiles()``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch._dynamo.decorators import skip as skip_frame
from transformers import StaticCache
from transformers.cache_utils import Cache, StaticLayer

from graphfix.diagnose.drivers import HFDriver, cache_kwarg, greedy_loop
from graphfix.rewrite.blocks.side_effects import config_for
from graphfix.rewrite.codeobj import own_code

ATTR = "graphfix_runtime"
"""The model attribute holding the installed ``HFRuntime``."""

_SEQ_KWARGS = ("position_ids", "token_type_ids")
"""Keyword tensors whose last dimension is the sequence length (marked dynamic in prefill)."""

CACHE_KWARGS = ("cache", "past_key_values")
"""The names a cache may come by, whatever the installed forward takes: ``generate`` and callers written for
transformers 5.24 pass ``cache``, older ones (and 5.24's deprecated alias) ``past_key_values``."""

_EAGER_KWARGS = ("inputs_embeds", "labels", "output_attentions", "output_hidden_states")
"""Keyword arguments that send a call to the original forward (not what generation passes)."""


class EagerFallbackWarning(UserWarning):
    """An optimized model ran a call with its original, uncompiled forward (said once per model and reason)."""


def kv_shape(config: Any) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a transformers decoder config."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


class GraphfixStaticCache(StaticCache):
    """A transformers ``StaticCache`` whose layers all hold ``max_seq_len`` positions, allocated up front.

    transformers' own ``StaticCache`` gives a sliding-window model ``StaticSlidingWindowLayer``s,
    which count tokens in a Python int and branch on it: Dynamo recompiles as the window
    fills. Here the window is only the attention mask (built by the model from its config).
    """

    def __init__(self, model: nn.Module, max_seq_len: int, batch: int) -> None:
        layers, kv_heads, head_dim = kv_shape(model.config)
        Cache.__init__(self, layers=[StaticLayer(max_cache_len=max_seq_len) for _ in range(layers)])
        self.graphfix_batch = batch
        self.early_initialization(batch, kv_heads, head_dim, model.dtype, model.device)


def is_graphfix_cache(cache: Any) -> bool:
    return isinstance(cache, GraphfixStaticCache)


@dataclasses.dataclass
class Variant:
    """One compiled callable: a phase and the keyword arguments it is called with."""

    phase: str
    kwargs: tuple[str, ...]
    fn: Callable[..., Any]
    code: types.CodeType


@dataclasses.dataclass
class HFRuntime:
    """What ``optimize`` installed on one HF model, and the state of its compiled paths."""

    model: nn.Module
    max_seq_len: int
    max_batch_size: int
    original_forward: Callable[..., Any]
    original_generate: Callable[..., Any]
    cache_kwarg: str
    """The name the original forward takes its cache by (``drivers.cache_kwarg``): what compiled calls pass."""
    backend: str | None = None
    """Set by ``compile``; ``None``: every call runs the original forward."""
    cuda_graphs: bool = False
    variants: dict[tuple[str, tuple[str, ...]], Variant] = dataclasses.field(default_factory=dict)
    logging_functions: frozenset = frozenset()
    caches: dict[int, Any] = dataclasses.field(default_factory=dict)
    eager_calls: dict[str, int] = dataclasses.field(default_factory=dict)
    compiled_calls: dict[str, int] = dataclasses.field(default_factory=lambda: {"prefill": 0, "decode": 0,
                                                                                "prefill-own": 0, "decode-own": 0})
    enforce_from: int | None = None
    """While set (``enforce``), decode calls from this count on (and prefills, when 0) run under
    ``torch.compiler.set_stance("fail_on_recompile")``."""
    decode_seen: int = 0
    new_variants_enforced: list[str] = dataclasses.field(default_factory=list)
    """Variants first compiled while ``enforce`` was on (a compile the stance cannot see)."""
    warned: set[str] = dataclasses.field(default_factory=set)
    engine: Any = None
    """The ``hf_engine.EngineDoor`` serving ``generate`` (``None``: transformers' generate on this runtime)."""

    @property
    def compiled(self) -> bool:
        return self.backend is not None

    def cache_for(self, batch: int) -> GraphfixStaticCache:
        """The reusable cache of this batch size (allocated on first use), reset. Made again when the model's layer
        count changed since (a diagnosis of representative layers, ``diagnose.layer_subset``, ran generate)."""
        cache = self.caches.get(batch)
        if cache is None or len(cache.layers) != kv_shape(self.model.config)[0]:
            cache = self.caches[batch] = GraphfixStaticCache(self.model, self.max_seq_len, batch)
        cache.reset()
        return cache

    def new_cache(self, batch: int) -> GraphfixStaticCache:
        """A fresh cache that is not shared with ``generate`` (diagnosis, tests); compiled code guards on
        the cache's tensors, so the first calls with a new cache compile again."""
        return GraphfixStaticCache(self.model, self.max_seq_len, batch)

    def compile(self, backend: str, *, cuda_graphs: bool = False) -> None:
        """From now on, decode (static, ``fullgraph=True``) and prefill (dynamic length, ``fullgraph=True``)
        run compiled; each is compiled on its first call."""
        self.backend, self.cuda_graphs = backend, cuda_graphs

    def uncompile(self) -> None:
        """Back to the original forward for every call (the cache and ``generate`` wrapper stay)."""
        self.backend = None
        self.variants.clear()
        self.engine = None

    def variant(self, phase: str, kwargs: dict[str, Any]) -> Variant:
        """The compiled callable for this phase and these keyword names (made on first use).

        transformers passes different keyword sets depending on the caller (``generate(ids)``
        or ``generate(ids, attention_mask=...)``, its version): Dynamo would recompile one
        code object for each; here each set gets a code object of its own, compiled once.
        """
        key = (phase, tuple(sorted(kwargs)))
        found = self.variants.get(key)
        if found is None:
            step = own_code(_make_step(self.original_forward))
            if phase.endswith("-own"):  # the caller's own cache grows: shapes are dynamic, still one graph each
                fn = torch.compile(step, backend=self.backend, fullgraph=True)
            elif phase == "decode":
                mode = "reduce-overhead" if self.cuda_graphs else None
                fn = torch.compile(step, backend=self.backend, fullgraph=True, dynamic=False, mode=mode)
            else:
                fn = torch.compile(step, backend=self.backend, fullgraph=True)
            found = self.variants[key] = Variant(phase, key[1], fn, step.__code__)
            if self.enforce_from is not None and len([v for v in self.variants.values() if v.phase == phase]) > 1:
                self.new_variants_enforced.append(f"{phase} with {', '.join(key[1])}")
        return found

    def graphs(self) -> dict[str, int]:
        """Graphs compiled so far per phase, over its variants (Dynamo's cache entries)."""
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        out = {"prefill": 0, "decode": 0}
        for v in self.variants.values():
            out[v.phase] = out.get(v.phase, 0) + len(_debug_get_cache_entry_list(v.code))
        if self.engine is not None:
            for kind, n in self.engine.generator.graphs().items():
                out[f"engine-{kind}"] = n
        return out

    def graph_runs(self) -> int:
        """Calls routed into the compiled callables (each runs its graph or, under ``fail_on_recompile``, raises),
        and generate calls the engine served."""
        return sum(self.compiled_calls.values()) + (self.engine.served if self.engine is not None else 0)

    def recompiles(self) -> int:
        """Graphs beyond the first of each variant's code object."""
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        own = sum(max(0, len(_debug_get_cache_entry_list(v.code)) - 1) for v in self.variants.values())
        return own + (self.engine.generator.recompiles() if self.engine is not None else 0)

    @contextlib.contextmanager
    def enforce(self, from_decode: int = 2, prefill: bool = False) -> Iterator[None]:
        """Fail on any recompile from the ``from_decode``-th decode call on (and in prefill if ``prefill``)."""
        previous = self.enforce_from, self.decode_seen
        self.enforce_from, self.decode_seen = (0 if prefill else from_decode), 0
        try:
            yield
        finally:
            self.enforce_from, self.decode_seen = previous

    def fallback(self, reason: str) -> None:
        self.eager_calls[reason] = self.eager_calls.get(reason, 0) + 1
        if reason not in self.warned and reason in ("cache", "length", "batch"):
            self.warned.add(reason)
            warnings.warn(f"graphfix: {type(self.model).__name__} runs uncompiled: {FALLBACK_REASONS[reason]}",
                          EagerFallbackWarning, stacklevel=4)


FALLBACK_REASONS = {
    "no-cache": "called without a cache (a plain forward)",
    "cache": "called with a cache graphfix did not make (DynamicCache or the caller's own) while the compiled path "
             "is off",
    "inputs": "called with inputs_embeds, labels or extra outputs",
    "length": "generate() asked for more tokens than max_seq_len",
    "batch": "generate() with a batch larger than max_batch_size, beams or several return sequences",
    "not-compiled": "the compiled path is off",
}


def _make_step(original_forward: Callable[..., Any]) -> Callable[..., Any]:
    def step(input_ids: torch.Tensor, **kwargs: Any) -> Any:
        return original_forward(input_ids=input_ids, **kwargs)

    return step


@skip_frame
def hf_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The instance ``forward``: compiled decode / prefill for graphfix caches, else the original forward."""
    rt: HFRuntime = self.__dict__[ATTR]
    if args and "input_ids" not in kwargs and len(args) == 1:
        kwargs["input_ids"], args = args[0], ()
    input_ids = kwargs.get("input_ids")
    cache_name = next((k for k in CACHE_KWARGS if kwargs.get(k) is not None), rt.cache_kwarg)
    cache = kwargs.get(cache_name)
    reason = None
    if args or input_ids is None or any(kwargs.get(k) is not None and kwargs.get(k) is not False
                                        for k in _EAGER_KWARGS):
        reason = "inputs"
    elif cache is None:
        reason = "no-cache"
    elif rt.backend is None:
        reason = "cache" if not is_graphfix_cache(cache) else "not-compiled"
    if reason is not None:
        rt.fallback(reason)
        return rt.original_forward(*args, **kwargs)
    if kwargs.get("use_cache") is False:
        rt.fallback("inputs")
        return rt.original_forward(*args, **kwargs)
    kwargs.pop("input_ids")
    kwargs[rt.cache_kwarg] = kwargs.pop(cache_name)  # the installed forward's name: no deprecation warning
    input_ids = dense(input_ids)  # a slice of a wider buffer has other strides, which would recompile
    tuple_out = kwargs.get("return_dict") is False
    kwargs = canonical_kwargs(kwargs)
    own = not is_graphfix_cache(cache)
    if input_ids.shape[1] == 1:
        phase = "decode-own" if own else "decode"
        rt.decode_seen += 1
        strict = rt.enforce_from is not None and rt.decode_seen >= rt.enforce_from
        if own:
            _mark_cache_dynamic(kwargs)
        elif rt.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
    else:
        phase = "prefill-own" if own else "prefill"
        strict = rt.enforce_from == 0
        _mark_sequence_dynamic(input_ids, kwargs)
    fn = rt.variant(phase, kwargs).fn
    rt.compiled_calls[phase] += 1
    stance = torch.compiler.set_stance("fail_on_recompile") if strict else contextlib.nullcontext()
    logging = torch._dynamo.config.patch(**config_for(None, rt.logging_functions)) if rt.logging_functions \
        else contextlib.nullcontext()
    with stance, logging:
        out = fn(input_ids, **kwargs)
    if rt.cuda_graphs and not own and getattr(out, "logits", None) is not None:
        out["logits"] = out.logits.clone()  # the graph's output buffer is overwritten by the next replay
    return out.to_tuple() if tuple_out else out


_DEFAULTS = {"use_cache": True, "return_dict": True, "output_attentions": False, "output_hidden_states": False,
             "logits_to_keep": 0}


def canonical_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments the compiled callables see: the same set whoever calls.

    Dynamo guards on the number and names of ``**kwargs``; transformers versions and direct
    callers pass different sets (``return_dict=True`` or not, ``attention_mask=None``,
    ``logits_to_keep=0``, ...). Values that are the forward's defaults are dropped, and
    ``use_cache``/``return_dict`` are always given (the caller's ``return_dict=False`` is
    honoured after the call).
    """
    out = {k: v for k, v in kwargs.items() if v is not None and _DEFAULTS.get(k, object()) is not v
           and not (k == "logits_to_keep" and isinstance(v, int) and v == 0)}
    out["use_cache"], out["return_dict"] = True, True
    return out


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides of a new contiguous tensor of its shape (a copy only when they differ).

    Dynamo guards on strides, and ``is_contiguous()`` ignores the stride of a size-1 dim:
    ``buffer[:, k:k+1]`` of a ``(2, 64)`` buffer is "contiguous" with strides ``(64, 1)``.
    """
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.append(step)
        step *= max(size, 1)
    if tuple(reversed(expected)) == t.stride():
        return t
    return t.clone(memory_format=torch.contiguous_format)


@skip_frame  # called from hf_forward's eager frame: Dynamo must not trace graphfix's bookkeeping
def _mark_sequence_dynamic(input_ids: torch.Tensor, kwargs: dict[str, Any]) -> None:
    """Mark the prompt length dynamic in every input that has it, so a new length does not recompile."""
    seq = input_ids.shape[1]
    torch._dynamo.maybe_mark_dynamic(input_ids, 1)
    for name in _SEQ_KWARGS:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.shape[-1] == seq:
            torch._dynamo.maybe_mark_dynamic(value, value.dim() - 1)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        if mask.dim() == 4 and mask.shape[2] == seq:
            torch._dynamo.maybe_mark_dynamic(mask, 2)  # (batch, 1, query, max_seq_len): the query length
        elif mask.dim() == 2:
            torch._dynamo.maybe_mark_dynamic(mask, 1)


@skip_frame
def _mark_cache_dynamic(kwargs: dict[str, Any]) -> None:
    """Mark the length of a caller's growing cache (and of its attention mask) dynamic before a decode call.

    Without this the first two decode calls compile twice (Dynamo makes a dimension dynamic only
    once it has changed); with it, decode compiles once, whatever the cache's length.
    """
    cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
    for layer in getattr(cache, "layers", None) or ():
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 4 and tensor.shape[2] > 1:
                torch._dynamo.maybe_mark_dynamic(tensor, 2)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] > 1:
        torch._dynamo.maybe_mark_dynamic(mask, 1)


def _requested_length(model: nn.Module, prompt_len: int, kwargs: dict[str, Any]) -> int:
    config = kwargs.get("generation_config") or model.generation_config
    new = kwargs.get("max_new_tokens")
    if new is not None:
        return prompt_len + int(new)
    if kwargs.get("max_length") is not None:
        return int(kwargs["max_length"])
    if getattr(config, "max_new_tokens", None) is not None:
        return prompt_len + int(config.max_new_tokens)
    return max(int(getattr(config, "max_length", 20) or 20), prompt_len + 1)


def hf_generate(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The instance ``generate``: the engine when it serves the call, else the original given a graphfix static cache
    when the caller gave no cache."""
    rt: HFRuntime = self.__dict__[ATTR]
    if rt.engine is not None and rt.backend is not None:
        from graphfix.optimize import hf_engine

        served = hf_engine.serve(rt.engine, self, args, kwargs)
        if served is not None:
            return served
    inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    config = kwargs.get("generation_config") or self.generation_config
    wants_cache = (
        all(kwargs.get(k) is None for k in CACHE_KWARGS)
        and kwargs.get("cache_implementation") is None
        and getattr(config, "cache_implementation", None) is None
        and kwargs.get("use_cache", getattr(config, "use_cache", True)) is not False
        and isinstance(inputs, torch.Tensor) and inputs.dim() == 2
    )
    if wants_cache:
        beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
        returns = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1
        if beams > 1 or returns > 1 or inputs.shape[0] > rt.max_batch_size:
            rt.fallback("batch")
        elif _requested_length(self, inputs.shape[1], kwargs) > rt.max_seq_len:
            rt.fallback("length")
        else:
            kwargs[rt.cache_kwarg] = rt.cache_for(inputs.shape[0])
            kwargs.setdefault("disable_compile", True)  # graphfix compiled forward already; transformers must not
    return rt.original_generate(*args, **kwargs)


def _with_signature_of(original: Callable[..., Any], call: Callable[..., Any]) -> Callable[..., Any]:
    """``call`` (a ``(*args, **kwargs)`` callable) presenting ``original``'s name, docstring and signature.

    ``generate`` reads ``inspect.signature(model.forward)`` to decide what to pass: with a bare
    ``(*args, **kwargs)`` it passed no ``logits_to_keep`` (so prefill made logits for every prompt
    position, not just the last), no ``position_ids`` and, without one from the caller, no
    attention mask. The original's signature keeps ``generate`` calling the optimized model
    exactly as it calls the original.
    """

    @skip_frame  # like hf_forward: the compiled calls live inside, diagnosis must not trace this frame
    def forward(*args: Any, **kwargs: Any) -> Any:
        return call(*args, **kwargs)

    return functools.update_wrapper(forward, original)


def install(model: nn.Module, *, max_seq_len: int, max_batch_size: int) -> HFRuntime:
    """Install the runtime on ``model`` (instance ``forward`` and ``generate``); idempotent."""
    existing = model.__dict__.get(ATTR)
    if existing is not None:
        return existing
    rt = HFRuntime(model=model, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                   original_forward=model.forward, original_generate=model.generate, cache_kwarg=cache_kwarg(model))
    model.__dict__[ATTR] = rt
    model.forward = _with_signature_of(rt.original_forward, types.MethodType(hf_forward, model))
    model.generate = types.MethodType(hf_generate, model)
    return rt


def uninstall(model: nn.Module) -> None:
    """Remove the runtime: the instance's ``forward`` and ``generate`` are the class's again."""
    if model.__dict__.pop(ATTR, None) is not None:
        model.__dict__.pop("forward", None)
        model.__dict__.pop("generate", None)


def runtime_of(model: nn.Module) -> HFRuntime | None:
    return model.__dict__.get(ATTR)


@dataclasses.dataclass
class StaticCacheDriver(HFDriver):
    """``HFDriver``'s prefill and greedy decode steps, with a graphfix cache instead of a ``DynamicCache``."""

    description: str = "hf-graphfix-static-cache"

    def run(self, model: nn.Module, steps: int | None = None) -> torch.Tensor:
        ids, n_steps = self.start(model, steps)
        rt = runtime_of(model)
        cache = rt.new_cache(ids.shape[0])
        return greedy_loop(lambda new: model(input_ids=new, **{rt.cache_kwarg: cache}, use_cache=True).logits, ids,
                           n_steps)
