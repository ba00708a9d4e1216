"""The front door for a model of any codebase: prefill and decode routed apart, each compiled once.

A model that is neither a Hugging Face causal LM nor Meta's reference ``Transformer`` is
called by its own loop however its code does (litgpt's ``input_pos`` and a growing
``input_pos_maxp1``, gpt-fast's int32 positions bumped in place, fms's caller-owned
cache tuples, a research file's ``forward(tokens)`` with positions in the model). One
compiled forward recompiles at every change between those calls: prompt length to one
token, int64 to int32 positions, normal to inference tensors, a growing cache, an integer
module attribute.

A ``PhaseRouter`` is installed as the instance's ``forward`` (or, after the
``inference-mode`` pass, as the core its eager wrapper calls) by the ``phase-split`` pass
(``optimize`` installs it for every model outside the HF and Meta front doors).
Each call is routed by how many new tokens it carries: one token to the *decode*
callable, several to the *prefill* callable, each a copy of the forward with a code object
of its own (so each has its own Dynamo cache, guards and recompile limit, and its graphs
can be counted). ``compile`` (``optimize``'s compile step) compiles both with ``fullgraph=True``:

- prefill marks every input dimension of the prompt's length dynamic, so a new prompt
  length does not recompile;
- calls run with ``allow_unspec_int_on_nn_module``: an integer module attribute (a position
  counter) is specialised once and then made dynamic, instead of one graph per value until
  the recompile limit, after which Dynamo would silently run the code in Python;
- shapes that change between decode calls (a cache that grows) become dynamic on their
  first change (Dynamo's automatic dynamic shapes): optimize's warm-up runs two decode calls
  so that this happens before any recompile is checked for.

Every graph run is counted (``graph_runs``), so verification can tell a loop that ran
compiled code from one that silently ran in Python.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo.config as dynamo_config
from torch import nn
from torch._dynamo.decorators import skip as skip_frame

from graphfix.diagnose.intercept import new_token_count
from graphfix.rewrite.blocks.side_effects import config_for
from graphfix.rewrite.codeobj import own_code

ATTR = "graphfix_phased"
"""The model attribute holding the installed ``PhaseRouter``."""
PHASES = ("prefill", "decode")


@dataclasses.dataclass
class GraphRuns:
    """Counts the executions of compiled graphs, per phase."""

    runs: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0))

    def backend(self, name: str, phase: str) -> Callable[..., Any]:
        """A backend that compiles with ``name`` and counts every run of what it compiled."""
        from torch._dynamo.backends.registry import lookup_backend

        compiler = lookup_backend(name)

        def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
            compiled = compiler(gm, example_inputs)
            boxed = getattr(compiled, "_boxed_call", False)

            def run(*args: Any) -> Any:
                self.runs[phase] = self.runs.get(phase, 0) + 1
                return compiled(*args)

            if boxed:
                run._boxed_call = True  # type: ignore[attr-defined]
            return run

        return counting_backend

    @property
    def total(self) -> int:
        return sum(self.runs.values())


@dataclasses.dataclass
class PhaseRouter:
    """Prefill and decode callables, routed per call (see the module docstring); compiled by ``compile``."""

    model: nn.Module
    original: Callable[..., Any]
    """What was installed before: the instance's forward, or the core of the inference-mode wrapper."""
    copies: dict[str, Callable[..., Any]]
    """Per phase, a copy of ``original`` with a code object of its own (``original`` itself when it has no code)."""
    code: dict[str, types.CodeType]
    installed_as: str
    callables: dict[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)
    counter: GraphRuns = dataclasses.field(default_factory=GraphRuns)
    calls: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    backend: str | None = None

    def __post_init__(self) -> None:
        if not self.callables:
            self.callables = dict(self.copies)

    @property
    def compiled(self) -> bool:
        return self.backend is not None

    def compile(self, backend: str) -> None:
        """Compile each phase's copy with ``fullgraph=True`` (each compiles on its first call)."""
        self.backend = backend
        self.callables = {phase: torch.compile(fn, backend=self.counter.backend(backend, phase), fullgraph=True)
                          for phase, fn in self.copies.items()}

    def uncompile(self) -> None:
        self.backend = None
        self.callables = dict(self.copies)

    def graphs(self) -> dict[str, int]:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return {phase: len(_debug_get_cache_entry_list(code)) for phase, code in self.code.items()}

    def graph_runs(self) -> int:
        return self.counter.total

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _routed_call(self, args, kwargs)


@skip_frame  # the routing runs eagerly; the two callables it calls are what Dynamo compiles
def _routed_call(router: PhaseRouter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    tokens = new_token_count(args, kwargs)
    phase = "decode" if tokens == 1 else "prefill"
    if phase == "prefill" and tokens is not None and tokens > 1:
        _mark_length_dynamic(tokens, args, kwargs)
    router.calls[phase] += 1
    with dynamo_config.patch(**config_for(router.model, allow_unspec_int_on_nn_module=True)):
        return router.callables[phase](*args, **kwargs)


@skip_frame  # called from the router's eager frame: Dynamo must not trace graphfix's bookkeeping
def _mark_length_dynamic(length: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Mark every dimension of the prompt's length dynamic in the call's tensors (ids, positions, masks)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.shape):
                if size == length:
                    torch._dynamo.maybe_mark_dynamic(value, dim)


def _copies(target: Callable[..., Any]) -> tuple[dict[str, Callable[..., Any]], dict[str, types.CodeType]]:
    copies: dict[str, Callable[..., Any]] = {}
    code: dict[str, types.CodeType] = {}
    fn = getattr(target, "__func__", None)
    for phase in PHASES:
        if isinstance(fn, types.FunctionType):
            own = own_code(fn)
            copies[phase], code[phase] = types.MethodType(own, target.__self__), own.__code__
        elif isinstance(target, types.FunctionType):
            own = own_code(target)
            copies[phase], code[phase] = own, own.__code__
        else:  # a callable object: both phases share it (and its code)
            copies[phase] = target
    return copies, code


def install_router(model: nn.Module) -> PhaseRouter:
    """Route ``model``'s calls per phase (uncompiled until ``compile``); idempotent.

    After the ``inference-mode`` pass the instance's ``forward`` is an eager wrapper that enters
    inference mode and calls ``model.graphfix_forward_core``: the router replaces that core
    (``model.graphfix_core_fn``). Otherwise it replaces the instance's ``forward``, presenting
    the original's signature to callers that read it.
    """
    existing = model.__dict__.get(ATTR)
    if existing is not None:
        return existing
    if "graphfix_forward_core" in model.__dict__:
        copies, code = _copies(model.graphfix_forward_core)
        router = PhaseRouter(model, model.graphfix_forward_core, copies, code, installed_as="graphfix_core_fn")
        model.graphfix_core_fn = router
    else:
        current = model.forward
        copies, code = _copies(current)
        router = PhaseRouter(model, current, copies, code, installed_as="forward")

        @skip_frame
        def forward(*args: Any, **kwargs: Any) -> Any:
            return _routed_call(router, args, kwargs)

        functools.update_wrapper(forward, current)
        object.__setattr__(model, "forward", forward)
    model.__dict__[ATTR] = router
    return router


def router_of(model: nn.Module) -> PhaseRouter | None:
    return model.__dict__.get(ATTR)
