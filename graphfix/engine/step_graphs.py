"""The functions ``Generator`` compiles, and the fixed-address state they mutate.

``_make_prefill``, ``_make_first`` and ``_make_decode`` build the step functions (one per
model, sampling mode and attended cache length); ``_BatchState`` holds the device tensors of
one batch size at fixed addresses (CUDA graphs mutate them in place); ``_Clock`` reads
device-ordered timestamps. Apart from ``generator.py`` so that each module has one job: this
one is what runs inside the graphs, that one decides which graph runs when.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from graphfix.engine.protocol import StepModel
from graphfix.engine.sampling import sample


class _BatchState:
    """Device tensors of one batch size, at fixed addresses (CUDA graphs mutate them in place)."""

    def __init__(self, batch: int, capacity: int, device: torch.device, max_eos: int) -> None:
        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.batch = batch
        self.tokens, self.pos, self.done = zeros(batch, 1), zeros(batch, 1), zeros(batch, dtype=torch.bool)
        self.out, self.step, self.lengths = zeros(batch, capacity), zeros(1), zeros(batch)
        self.seeds, self.top_k = zeros(batch), zeros(batch)
        self.temperature = torch.ones(batch, device=device)
        self.top_p = torch.ones(batch, device=device)
        self.eos = torch.full((max_eos,), -1, dtype=torch.long, device=device)
        self.pad = zeros(1)
        for t in self.all():
            torch._dynamo.mark_static_address(t)

    def all(self) -> tuple[torch.Tensor, ...]:
        return (self.tokens, self.pos, self.done, self.out, self.step, self.lengths, self.seeds, self.top_k,
                self.temperature, self.top_p, self.eos, self.pad)

    def args(self) -> tuple[torch.Tensor, ...]:
        """The decode graph's arguments, in its order."""
        return (self.tokens, self.pos, self.done, self.out, self.step, self.seeds, self.temperature, self.top_k,
                self.top_p, self.eos, self.pad)

    def rewind(self) -> None:
        for t in (self.pos, self.done, self.step):
            t.zero_()


def _is_eos(tokens: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    return (tokens.unsqueeze(-1) == eos).any(-1)


def _make_prefill(model: StepModel, use_index: bool) -> Callable:
    def prefill(tokens: torch.Tensor, input_pos: torch.Tensor, gather: torch.Tensor) -> torch.Tensor:
        if use_index:
            logits = model.step(tokens, input_pos, logits_index=gather)
        else:
            full = model.step(tokens, input_pos)
            logits = full.gather(1, gather.view(-1, 1, 1).expand(-1, 1, full.shape[-1]))
        return logits[:, 0].float()

    return prefill


def _make_first(mode: str) -> Callable:
    def first(logits, tokens, pos, done, out, step, lengths, seeds, temperature, top_k, top_p, eos):
        step.zero_()
        nxt = sample(logits, mode, seeds, step, temperature, top_k, top_p)
        out.index_copy_(1, step, nxt.unsqueeze(1))
        done.copy_(_is_eos(nxt, eos))
        tokens.copy_(nxt.unsqueeze(1))
        pos.copy_(lengths.unsqueeze(1))
        step.fill_(1)

    return first


def _make_decode(model: StepModel, mode: str, last_slot: int, kv_len: int | None) -> Callable:
    """One decode step writing into the state; it returns the step's logits too.

    Returned always, so that a run that keeps them (``record_logits``: the verification) replays
    the serving graph itself instead of compiling a second, logits-returning copy of the whole
    step (a quarter of ``optimize``'s cold compile on a 7B model, docs/optimize.md). A serving run
    drops them: the logits are computed for sampling anyway, and an output of a CUDA graph is a
    view of its static memory, not a copy.
    """

    def decode(tokens, pos, done, out, step, seeds, temperature, top_k, top_p, eos, pad):
        if kv_len is None:
            logits = model.step(tokens, pos)[:, -1].float()
        else:
            logits = model.step(tokens, pos, kv_len=kv_len)[:, -1].float()
        nxt = sample(logits, mode, seeds, step, temperature, top_k, top_p)
        nxt = torch.where(done, pad, nxt)
        out.index_copy_(1, step, nxt.unsqueeze(1))
        done.logical_or_(_is_eos(nxt, eos))
        tokens.copy_(nxt.unsqueeze(1))
        pos.copy_((pos + 1).clamp(max=last_slot))
        step.add_(1)
        return logits

    return decode


def _device_of(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return torch.device(getattr(model, "device", "cpu"))


class _Clock:
    """Device-ordered timestamps: CUDA events on CUDA (no sync until read), the host clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a
