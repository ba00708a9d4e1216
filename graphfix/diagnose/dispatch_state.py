"""Keep a failed compile from leaving the thread's dispatch keys switched on.

A failure inside ``torch.compile`` can leave dispatch-key guards alive in the frames of its
traceback. Each one, when destroyed, sets the thread's dispatch keys back to what they were
when it was made: mid-compile, with the Python dispatcher on. Destroyed whenever the
exception is freed (at the end of an ``except`` block, or by the garbage collector from a
report that kept it), they left the process in a state where every later compile died with
"Hit PythonDispatcher dispatch key but PythonDispatcherTLS was not set". graphfix compiles
models that fail on purpose (that is what it diagnoses), so every place that catches a
compile failure runs it inside ``compile_failure_contained``.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def release_frames(exc: BaseException) -> None:
    """Clear the locals of the frames ``exc`` (and what it chains) holds, now, keeping files and lines.

    This destroys the leftover guards at a known point (see the module docstring), so that
    ``DispatchTLS.restore`` right after undoes what they set.
    """
    chain: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop()
        if err is None or any(err is seen for seen in chain):
            continue
        chain.append(err)
        inner = getattr(err, "inner_exception", None)
        todo += [err.__cause__, err.__context__, inner if isinstance(inner, BaseException) else None]
    for err in chain:
        traceback.clear_frames(err.__traceback__)


_PINNED_GUARDS: list[Any] = []
"""Inference-mode guards entered to undo a failed compile's leftovers. They stay alive: destroying one
would set the mode back to what it undid."""


@dataclasses.dataclass
class DispatchTLS:
    """The thread's dispatch keys and autograd modes, saved before a compile run and put back after a failure.

    A compiled graph that enters inference mode (``torch.autograd.grad_mode._enter_inference_mode``)
    and fails before it exits leaves guards whose destruction, in no set order, can leave the
    thread in inference mode with grad off (measured on torch 2.13, tests/test_pass_modes_generic.py).
    """

    included: Any
    excluded: Any
    grad_enabled: bool = True
    inference_mode: bool = False

    @classmethod
    def save(cls) -> DispatchTLS:
        return cls(torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set(),
                   torch.is_grad_enabled(), torch.is_inference_mode_enabled())

    def restore(self) -> None:
        if torch.is_inference_mode_enabled() != self.inference_mode:
            guard = torch._C._InferenceMode(self.inference_mode)  # the only setter: a guard (also sets the keys)
            guard.__enter__()
            _PINNED_GUARDS.append(guard)
        torch._C._set_grad_enabled(self.grad_enabled)
        now_in, now_ex = torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set()
        for key in torch._C.DispatchKey.__members__.values():
            try:
                if now_in.has(key) != self.included.has(key):
                    torch._C._dispatch_tls_set_dispatch_key_included(key, self.included.has(key))
                if now_ex.has(key) != self.excluded.has(key):
                    torch._C._dispatch_tls_set_dispatch_key_excluded(key, self.excluded.has(key))
            except RuntimeError:  # alias keys (Autograd, CompositeImplicit...) are not per-thread state
                continue


@contextmanager
def compile_failure_contained() -> Iterator[None]:
    """Run a compile; if it raises, free the failure's frames now and put the dispatch keys back, then re-raise."""
    saved = DispatchTLS.save()
    try:
        yield
    except Exception as exc:
        release_frames(exc)
        saved.restore()
        raise
