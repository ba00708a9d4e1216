"""The front door for a model of any codebase: prefill and decode compiled apart, each with its own cache.

A model that is neither a Hugging Face causal LM nor Meta's reference ``Transformer`` is
called by its own loop however its code does (litgpt's ``input_pos`` and a growing
``input_pos_maxp1``, gpt-fast's int32 positions bumped in place, fms's caller-owned
cache tuples, a research file's ``forward(tokens)`` with positions in the model). One
compiled forward would recompile at every change between those calls: prompt length to
one token, int64 to int32 positions, a growing cache, an integer module attribute.

``PhasedForward`` is installed as the instance's ``forward`` (or, after the
``inference-mode`` pass, as the core its eager wrapper calls). Each call is routed by how
many new tokens it carries: one token to the *decode* callable, several to the *prefill*
callable, each a copy of the forward with a code object of its own (so each has its own
Dynamo cache, guards and recompile limit, and its graphs can be counted), compiled with
``fullgraph=True``:

- prefill marks every input dimension of the prompt's length dynamic, so a new prompt
  length does not recompile;
- both compile with ``allow_unspec_int_on_nn_module``: an integer module attribute (a
  position counter) is specialised once and then made dynamic, instead of one graph per
  value until the recompile limit, after which Dynamo would silently run the code in Python;
- shapes that change between decode calls (a cache that grows) become dynamic on their
  first change (Dynamo's automatic dynamic shapes): warm-up runs two decode calls so that
  this happens before any recompile is checked for.

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
from graphfix.rewrite.blocks.side_effects import reorder_logging
from graphfix.rewrite.codeobj import own_code

ATTR = "graphfix_phased"
"""The model attribute holding the installed ``PhasedForward``."""


@dataclasses.dataclass
class GraphRuns:
    """Counts the executions of compiled graphs, per phase."""

    runs: dict[str, int] = dataclasses.field(default_factory=lambda: {"prefill": 0, "decode": 0})

    def backend(self, name: str, phase: str) -> Callable[..., Any]:
        """A backend that compiles with ``name`` and counts every run of what it compiled."""
        from torch._dynamo.backends.registry import lookup_backend

        compiler = lookup_backend(name)

        def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
            compiled = compiler(gm, example_inputs)
            boxed = getattr(compiled, "_boxed_call", False)

            def run(*args: Any) -> Any:
                self.runs[phase] += 1
                return compiled(*args)

            if boxed:
                run._boxed_call = True  # type: ignore[attr-defined]
            return run

        return counting_backend

    @property
    def total(self) -> int:
        return sum(self.runs.values())


@dataclasses.dataclass
class PhasedForward:
    """Prefill and decode callables compiled apart (see the module docstring)."""

    model: nn.Module
    original: Callable[..., Any]
    prefill: Callable[..., Any]
    decode: Callable[..., Any]
    code: dict[str, types.CodeType]
    counter: GraphRuns
    calls: dict[str, int] = dataclasses.field(default_factory=lambda: {"prefill": 0, "decode": 0})
    installed_as: str = "forward"

    @classmethod
    def build(cls, model: nn.Module, target: Callable[..., Any], backend: str) -> PhasedForward:
        counter = GraphRuns()
        copies, code = {}, {}
        for phase in ("prefill", "decode"):
            fn = getattr(target, "__func__", None)
            if isinstance(fn, types.FunctionType):
                own = own_code(fn)
                copies[phase] = types.MethodType(own, target.__self__)
                code[phase] = own.__code__
            elif isinstance(target, types.FunctionType):
                own = own_code(target)
                copies[phase], code[phase] = own, own.__code__
            else:  # a callable object: compiled as it is (its code is shared by both phases)
                copies[phase] = target
        compiled = {phase: torch.compile(copies[phase], backend=counter.backend(backend, phase), fullgraph=True)
                    for phase in copies}
        return cls(model, target, compiled["prefill"], compiled["decode"], code, counter)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _phased_call(self, args, kwargs)

    compiled = True

    def graphs(self) -> dict[str, int]:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return {phase: len(_debug_get_cache_entry_list(code)) for phase, code in self.code.items()}

    def graph_runs(self) -> int:
        return self.counter.total


@skip_frame  # the routing runs eagerly; the two callables it calls are what Dynamo compiles
def _phased_call(phased: PhasedForward, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    tokens = new_token_count(args, kwargs)
    if tokens == 1:
        phase, fn = "decode", phased.decode
    else:
        phase, fn = "prefill", phased.prefill
        if tokens is not None and tokens > 1:
            _mark_length_dynamic(tokens, args, kwargs)
    phased.calls[phase] += 1
    with dynamo_config.patch(allow_unspec_int_on_nn_module=True), reorder_logging(phased.model):
        return fn(*args, **kwargs)


def _mark_length_dynamic(length: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Mark every dimension of the prompt's length dynamic in the call's tensors (ids, positions, masks)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.shape):
                if size == length:
                    torch._dynamo.maybe_mark_dynamic(value, dim)


def install(model: nn.Module, backend: str) -> PhasedForward:
    """Compile ``model``'s step per phase and install it; ``uninstall`` puts the previous callable back.

    After the ``inference-mode`` pass the instance's ``forward`` is an eager wrapper that enters
    inference mode and calls ``model.graphfix_forward_core``: the phased callable replaces that
    core (``model.graphfix_core_fn``). Otherwise it replaces the instance's ``forward``, presenting
    the original's signature to callers that read it.
    """
    if "graphfix_forward_core" in model.__dict__:
        phased = PhasedForward.build(model, model.graphfix_forward_core, backend)
        phased.installed_as = "graphfix_core_fn"
        model.graphfix_core_fn = phased
    else:
        current = model.forward
        phased = PhasedForward.build(model, current, backend)

        @skip_frame
        def forward(*args: Any, **kwargs: Any) -> Any:
            return _phased_call(phased, args, kwargs)

        functools.update_wrapper(forward, current)
        object.__setattr__(model, "forward", forward)
    model.__dict__[ATTR] = phased
    return phased


def uninstall(model: nn.Module) -> None:
    phased = model.__dict__.pop(ATTR, None)
    if phased is None:
        return
    if phased.installed_as == "graphfix_core_fn":
        model.graphfix_core_fn = None
    elif isinstance(phased.original, types.MethodType) and phased.original.__func__ is getattr(
            type(model), "forward", None):
        model.__dict__.pop("forward", None)
    else:
        object.__setattr__(model, "forward", phased.original)


def phased_of(model: nn.Module) -> PhasedForward | None:
    return model.__dict__.get(ATTR)
