"""``graphfix.quantize(model, "int8" | "int4", group_size=...)``: swap a model's linears for ``QuantLinear``.

A module swap, like the other rewrites: every ``nn.Linear`` (and subclass with a float
``weight``, such as the engine's ``GemvLinear``) is replaced in its parent by a
``QuantLinear`` holding the packed weight; the float weight is released with the old
module. It works on any model (Hugging Face, Meta's reference, litgpt, the engine's
``LlamaDecoder``) because it matches the construct, not a class. Each tensor-parallel rank
calls it on its own shards: the scales are per row and per group of a row, so a shard
quantizes to exactly the rows of the whole.

Which codes and scales (``method``; the stored format is the same for all, see ``quant.gptq``):
``"gptq"`` rounds with error compensation from calibration activations (``quant.calibration``: the
user's tokens, or the shipped English text through the model's tokenizer); ``"mse"`` picks each
row's clipped scale with the smallest squared error (no data); ``"rtn"`` is round-to-nearest with
absmax scales. ``"auto"`` (the default) is ``gptq`` for int8 where the model can be calibrated (a forward
graphfix knows how to call, and tokens; ``AUTO_GPTQ_BITS``) and otherwise the better calibration-free method
measured for the scheme (``FALLBACK``); the report (and each ``QuantLinear.method``) says which ran and why.

The LM head and the embeddings stay in their float dtype unless asked (``lm_head=True``,
``embeddings=True``): they are the layers whose error every token sees, and at batch 1 the
embedding is not streamed (a step reads one row of it). The LM head is found by name
(``lm_head``, ``output``) or by sharing its weight with an embedding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from graphfix.errors import InputError
from graphfix.quant.linear import QuantEmbedding, QuantLinear
from graphfix.quant.scheme import Packed, QuantScheme, parse_scheme, quantize_weight

HEAD_NAMES = ("lm_head", "output")
METHODS = ("auto", "gptq", "mse", "rtn")
FALLBACK = {8: "rtn", 4: "rtn"}
"""``auto`` without calibration. SmolLM2 int8: rtn +1.05% perplexity, mse +1.12% (its smaller weight error did
not carry to the logits). int4 keeps rtn too until mse is measured there (docs/quantization.md)."""
AUTO_GPTQ_BITS = (8,)
"""Where ``auto`` calibrates: int8 (SmolLM2 +1.05% -> +0.49% perplexity). For int4 GPTQ was mixed on SmolLM2, whose
GGUF weights sit on a 4-bit grid of groups of 32: int4:128 +13.7% -> +8.5%, int4:64 +30.9% -> +38.2%
(docs/quantization.md), so int4 keeps round-to-nearest unless ``method="gptq"``."""
HESSIAN_BUDGET = 1 << 30
"""Bytes of float32 ``X^T X`` matrices held at once: linears are calibrated in groups under it (one forward
over the calibration tokens per group), so a 7B model does not hold 22 GB of them."""


@dataclasses.dataclass
class QuantizeReport:
    """What ``quantize`` did: the scheme, the modules swapped, and those kept with the reason."""

    scheme: QuantScheme
    quantized: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    method: str = "rtn"
    """How the codes were chosen: ``gptq``, ``mse`` or ``rtn`` (``quant.gptq``)."""
    calibration: str = ""
    """What ``gptq`` was calibrated on, or why ``auto`` fell back to ``mse``."""
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    """Time of the calibration forward (``calibration``) and of GPTQ's rounding (``rounding``)."""

    def summary(self) -> str:
        kept = "; ".join(f"{k}: {v}" for k, v in list(self.skipped.items())[:4])
        more = f" (+{len(self.skipped) - 4} more)" if len(self.skipped) > 4 else ""
        how = f" ({self.method}{': ' + self.calibration if self.calibration else ''})"
        return f"{self.scheme.name}: {len(self.quantized)} modules quantized{how}" + (
            f"; kept {kept}{more}" if kept else "")


def _is_linear(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and w is not None and w.is_floating_point() and not w.is_meta


def _embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def quantize(model: nn.Module, scheme: str | QuantScheme = "int8", group_size: int | None = None, *,
             lm_head: bool = False, embeddings: bool = False,
             filter_fn: Callable[[nn.Module, str], bool] | None = None, method: str = "auto",
             calibration: Any = None, tokenizer: Any = None,
             progress: Callable[[str], None] | None = None) -> QuantizeReport:
    """Quantize ``model``'s linear layers in place (weight-only); returns a ``QuantizeReport``.

    ``scheme``: ``"int8"`` (per output channel, or groups with ``group_size``), ``"int4"``
    (groups of ``group_size``: 32, 64 or 128, default 128) or ``"int4:64"``.
    ``filter_fn(module, name)``: quantize only the linears it accepts (torchao's shape).
    ``method``: ``"auto"``, ``"gptq"``, ``"mse"`` or ``"rtn"`` (module docstring).
    ``calibration``: token ids (a tensor ``(T,)``/``(rows, T)`` or lists) for ``gptq`` instead of the shipped
    text; ``tokenizer``: tokenizes the shipped text when the model's own cannot be found.
    ``progress``: called with a line per calibration pass (GPTQ on a CPU can take minutes).
    Already quantized modules are left alone, so calling it twice changes nothing.
    """
    sch = parse_scheme(scheme, group_size)
    if method not in METHODS:
        raise InputError(f"unknown quantization method {method!r}", hint=f"one of {', '.join(METHODS)}")
    report = QuantizeReport(sch)
    emb_weights = _embedding_weights(model)
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, (QuantLinear, QuantEmbedding)):
                continue
            if isinstance(child, nn.Embedding):
                if embeddings:
                    why = sch.check(child.embedding_dim)
                    if why:
                        report.skipped[full] = why
                    else:
                        swaps.append((module, child_name, QuantEmbedding.from_embedding(child, sch)))
                        report.quantized.append(full)
                continue
            if not _is_linear(child):
                continue
            is_head = child_name in HEAD_NAMES or id(child.weight) in emb_weights
            if is_head and not lm_head:
                report.skipped[full] = "LM head (lm_head=True quantizes it)"
                continue
            if filter_fn is not None and not filter_fn(child, full):
                report.skipped[full] = "filter_fn"
                continue
            why = sch.check(child.in_features)
            if why:
                report.skipped[full] = why
                continue
            swaps.append((module, child_name, child))
            report.quantized.append(full)
    linears = {full: child for full, (_, _, child) in zip(report.quantized, swaps)
               if not isinstance(child, QuantEmbedding)}
    packed = _choose_codes(model, linears, sch, method, calibration, tokenizer, report, progress or (lambda _m: None))
    for full, (parent, child_name, child) in zip(report.quantized, swaps):
        if isinstance(child, QuantEmbedding):
            setattr(parent, child_name, child)
            continue
        new = QuantLinear(packed[full], child.bias, child.weight.dtype)
        new.method = report.method
        setattr(parent, child_name, new)
    return report


def _choose_codes(model: nn.Module, linears: dict[str, nn.Module], sch: QuantScheme, method: str, calibration: Any,
                  tokenizer: Any, report: QuantizeReport, say: Callable[[str], None]) -> dict[str, Packed]:
    """Each linear's packed weight by ``method``; records on ``report`` the method that ran and its calibration."""
    from graphfix.quant import calibration as cal
    from graphfix.quant import gptq
    from graphfix.quant.gptq import quantize_gptq, quantize_mse

    report.method = method if method in ("rtn", "mse") else FALLBACK[sch.bits]
    if method == "auto" and sch.bits not in AUTO_GPTQ_BITS:
        report.calibration = "no calibration (auto: GPTQ is the default for int8 only; method='gptq' asks for it)"
    elif method in ("auto", "gptq") and linears:
        tokens, forward, why = _calibration(model, calibration, tokenizer)
        if forward is not None:
            out: dict[str, Packed] = {}
            spent = report.seconds
            groups = _budget_groups(linears)
            for i, group in enumerate(groups, 1):
                say(f"GPTQ pass {i}/{len(groups)}: {tokens.numel()} calibration tokens through the model for "
                    f"{len(group)} linears, then rounding them")
                started = time.perf_counter()
                hs = cal.hessians(model, group, forward, tokens)
                rounding = time.perf_counter()
                with _one_thread_on_cpu(next(iter(group.values())).weight.device):
                    for name, lin in group.items():
                        h = hs.pop(name, None)
                        out[name] = quantize_gptq(lin.weight, h, sch, damp=gptq.DAMP) if h is not None \
                            else quantize_mse(lin.weight, sch)
                spent["calibration"] = spent.get("calibration", 0.0) + rounding - started
                spent["rounding"] = spent.get("rounding", 0.0) + time.perf_counter() - rounding
            report.method, report.calibration = "gptq", why
            return out
        if method == "gptq":
            raise InputError(f"GPTQ needs calibration: {why}",
                             hint="pass calibration=token ids (and a model graphfix can call), or method='mse'")
        report.calibration = f"no calibration ({why})"
    fn = quantize_weight if report.method == "rtn" else quantize_mse
    return {name: fn(lin.weight, sch) for name, lin in linears.items()}


def _calibration(model: nn.Module, calibration: Any, tokenizer: Any) -> tuple[torch.Tensor | None, Any, str]:
    """(tokens, forward, what they are), or (None, None, why not)."""
    from graphfix.quant import calibration as cal

    forward = cal.forward_for(model)
    if forward is None:
        return None, None, f"{type(model).__name__} has no forward graphfix can calibrate through"
    if calibration is not None:
        tokens = cal.as_tokens(calibration)
        return tokens, forward, f"{tokens.numel()} calibration tokens given"
    tok = tokenizer if tokenizer is not None else cal.find_tokenizer(model)
    if tok is None:
        return None, None, "no calibration tokens and no tokenizer for the shipped text"
    tokens = cal.text_tokens(tok)
    return tokens, forward, f"{tokens.numel()} tokens of the shipped calibration text"


@contextlib.contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """GPTQ's column loop is thousands of operations on vectors of a few thousand numbers: on CPU, waking a
    thread pool for each costs more than the arithmetic (SmolLM2's w2: 0.31 s on one thread, 2.2 s on two
    shared cores), so the loop runs on one thread and the setting is restored after."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _budget_groups(linears: dict[str, nn.Module]) -> list[dict[str, nn.Module]]:
    groups: list[dict[str, nn.Module]] = [{}]
    used = 0
    for name, lin in linears.items():
        size = 4 * lin.in_features ** 2
        if groups[-1] and used + size > HESSIAN_BUDGET:
            groups.append({})
            used = 0
        groups[-1][name] = lin
        used += size
    return groups


def is_quantized(model: nn.Module) -> QuantScheme | None:
    """The scheme of ``model``'s first quantized linear, or ``None``."""
    return next((m.scheme for m in model.modules() if isinstance(m, QuantLinear)), None)
