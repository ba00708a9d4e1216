"""Watch, route and count a model's forward calls while some loop (the user's own, or a driver's) runs it.

graphfix does not own the loop that runs a model: litgpt's ``generate_fn``, fms's ``generate``,
Meta's ``Llama3.generate`` or a research file's ``for`` loop call the model however their
code does (``model(...)`` or ``model.forward(...)``, with their own caches and positions).
So instead of calling the model itself, graphfix swaps the *instance's* ``forward`` for the
duration of a run: every call, whichever way it comes, passes through ``intercepted``, which

- labels it (``prefill`` for the first call and later calls of several new tokens,
  ``decode:N`` for one-token calls), so captured events know their phase;
- routes it to a compiled version of the forward (diagnosis, warm-up), or to the current one;
- counts it, and records the last position's logits (parity needs them);
- can stop the loop after ``max_calls`` calls (a short run of a loop that would go on), and
  can put calls from a given index on under ``torch.compiler.set_stance("fail_on_recompile")``.

``nn.Module.__call__`` looks ``forward`` up on the instance first, so ``model(x)`` and
``model.forward(x)`` both reach the routed function; the class is never touched and the
instance's previous ``forward`` (if any) is put back afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch._dynamo.decorators import skip as skip_frame

Route = Callable[..., Any]
PhaseListener = Callable[[str], None]


class LoopStopped(BaseException):
    """Raised into a loop at the call after ``max_calls``: the loop has run as far as graphfix wanted.

    A ``BaseException``, so that a loop's own ``except Exception`` does not swallow it.
    """


@dataclasses.dataclass
class CallLog:
    """What the intercepted calls were: their phases, inputs' token counts and (optionally) logits."""

    phases: list[str] = dataclasses.field(default_factory=list)
    new_tokens: list[int | None] = dataclasses.field(default_factory=list)
    logits: list[torch.Tensor] = dataclasses.field(default_factory=list)
    """``(batch, vocab)`` CPU logits of each call's last position (when ``record_logits``): float32, float64 ones
    kept."""
    unrecorded: int = 0
    """Calls whose output held no logits graphfix could find."""

    @property
    def calls(self) -> int:
        return len(self.phases)

    @property
    def decode_calls(self) -> int:
        return sum(1 for p in self.phases if p.startswith("decode"))

    def greedy_tokens(self) -> torch.Tensor | None:
        """``(batch, calls)``: the argmax of each recorded call (the loop's tokens when it returns none)."""
        if not self.logits or self.unrecorded:
            return None
        return torch.stack([x.argmax(-1) for x in self.logits], dim=1)


@skip_frame  # called from eager routing frames that Dynamo's callback may be active around
def new_token_count(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """How many new tokens a forward call carries: dim 1 of its token-id tensor, if one can be found.

    The token ids are the first integer tensor of two or more dimensions among the positional
    arguments, or the keyword ``input_ids`` / ``idx`` / ``tokens`` / ``x``.
    """
    candidates = [kwargs.get(k) for k in ("input_ids", "idx", "tokens", "x", "input")] + list(args)
    for value in candidates:
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and not value.is_floating_point() \
                and not value.is_complex():
            return int(value.shape[1])
    return None


def find_logits(output: Any, vocab: int | None = None) -> torch.Tensor | None:
    """The logits tensor in a forward's output: the tensor itself, ``.logits``, or the first tensor of a tuple.

    With ``vocab`` known, a tensor whose last dimension differs is not taken for logits.
    """
    candidates: list[Any] = []
    if isinstance(output, torch.Tensor):
        candidates.append(output)
    else:
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, dict):
            logits = output.get("logits")
        if logits is not None:
            candidates.append(logits)
        elif isinstance(output, (tuple, list)) and output:
            candidates.append(output[0])
    for value in candidates:
        if (isinstance(value, torch.Tensor) and value.dim() >= 2 and value.is_floating_point()
                and (vocab is None or value.shape[-1] == vocab)):
            return value
    return None


def last_position(logits: torch.Tensor) -> torch.Tensor:
    """``(batch, vocab)`` logits of the last position of a ``(batch, seq, vocab)`` (or ``(batch, vocab)``) output."""
    last = logits[:, -1] if logits.dim() >= 3 else logits
    return recorded(last).clone()


def recorded(logits: torch.Tensor) -> torch.Tensor:
    """Logits as graphfix keeps them: on the CPU, float32, or float64 when they are (a high-precision reference's
    rounding to float32 would be as large as the float32 error it measures)."""
    return logits.detach().to("cpu", torch.float64 if logits.dtype == torch.float64 else torch.float32)


@dataclasses.dataclass
class _Interceptor:
    model: nn.Module
    route: Route
    log: CallLog
    on_phase: PhaseListener | None
    record_logits: bool
    vocab: int | None
    max_calls: int | None
    strict_from: int | None
    prefills: int = 0

    def call(self, *args: Any, **kwargs: Any) -> Any:
        index = self.log.calls
        if self.max_calls is not None and index >= self.max_calls:
            raise LoopStopped(f"stopped after {self.max_calls} calls")
        tokens = new_token_count(args, kwargs)
        decode = tokens == 1 and index > 0
        phase = f"decode:{self.log.decode_calls + 1}" if decode else ("prefill" if index == 0 else f"prefill:{index}")
        self.log.phases.append(phase)
        self.log.new_tokens.append(tokens)
        if self.on_phase is not None:
            self.on_phase(phase)
        strict = self.strict_from is not None and index >= self.strict_from
        with torch.compiler.set_stance("fail_on_recompile") if strict else contextlib.nullcontext():
            output = self.route(*args, **kwargs)
        if self.record_logits:
            logits = find_logits(output, self.vocab)
            if logits is None:
                self.log.unrecorded += 1
            else:
                self.log.logits.append(last_position(logits))
        return output


@contextlib.contextmanager
def intercepted(model: nn.Module, route: Route | None = None, *, on_phase: PhaseListener | None = None,
                record_logits: bool = False, vocab: int | None = None, max_calls: int | None = None,
                strict_from: int | None = None) -> Iterator[CallLog]:
    """Route every call of ``model``'s forward through graphfix for the duration of the block.

    ``route``: what runs each call (e.g. ``torch.compile(forward)``); default the forward the
    instance has now. ``strict_from``: calls from this index on run under
    ``fail_on_recompile`` (0: all). ``max_calls``: the call after that many raises
    ``LoopStopped`` into the loop.
    """
    current = model.forward
    log = CallLog()
    interceptor = _Interceptor(model, route or current, log, on_phase, record_logits, vocab, max_calls, strict_from)
    had_own = "forward" in model.__dict__
    previous = model.__dict__.get("forward")

    @skip_frame  # graphfix's bookkeeping runs eagerly; the routed forward is what gets compiled
    def forward(*args: Any, **kwargs: Any) -> Any:
        return interceptor.call(*args, **kwargs)

    functools.update_wrapper(forward, current)  # generate() and other callers read the signature
    object.__setattr__(model, "forward", forward)
    try:
        yield log
    finally:
        if had_own:
            object.__setattr__(model, "forward", previous)
        else:
            model.__dict__.pop("forward", None)

