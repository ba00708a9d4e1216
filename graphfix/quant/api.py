"""``graphfix.quantize(model, "int8" | "int4", group_size=...)``: swap a model's linears for ``QuantLinear``.

A module swap, like the other rewrites: every ``nn.Linear`` (and subclass with a float
``weight``, such as the engine's ``GemvLinear``) is replaced in its parent by a
``QuantLinear`` holding the packed weight; the float weight is released with the old
module. It works on any model (Hugging Face, Meta's reference, litgpt, the engine's
``LlamaDecoder``) because it matches the construct, not a class. Each tensor-parallel rank
calls it on its own shards: the scales are per row and per group of a row, so a shard
quantizes to exactly the rows of the whole.

The LM head and the embeddings stay in their float dtype unless asked (``lm_head=True``,
``embeddings=True``): they are the layers whose error every token sees, and at batch 1 the
embedding is not streamed (a step reads one row of it). The LM head is found by name
(``lm_head``, ``output``) or by sharing its weight with an embedding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from graphfix.quant.linear import QuantEmbedding, QuantLinear
from graphfix.quant.scheme import QuantScheme, parse_scheme

HEAD_NAMES = ("lm_head", "output")


@dataclasses.dataclass
class QuantizeReport:
    """What ``quantize`` did: the scheme, the modules swapped, and those kept with the reason."""

    scheme: QuantScheme
    quantized: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        kept = "; ".join(f"{k}: {v}" for k, v in list(self.skipped.items())[:4])
        more = f" (+{len(self.skipped) - 4} more)" if len(self.skipped) > 4 else ""
        return f"{self.scheme.name}: {len(self.quantized)} modules quantized" + (f"; kept {kept}{more}" if kept else "")


def _is_linear(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and w is not None and w.is_floating_point() and not w.is_meta


def _embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def quantize(model: nn.Module, scheme: str | QuantScheme = "int8", group_size: int | None = None, *,
             lm_head: bool = False, embeddings: bool = False,
             filter_fn: Callable[[nn.Module, str], bool] | None = None) -> QuantizeReport:
    """Quantize ``model``'s linear layers in place (weight-only); returns a ``QuantizeReport``.

    ``scheme``: ``"int8"`` (per output channel, or groups with ``group_size``), ``"int4"``
    (groups of ``group_size``: 32, 64 or 128, default 128) or ``"int4:64"``.
    ``filter_fn(module, name)``: quantize only the linears it accepts (torchao's shape).
    Already quantized modules are left alone, so calling it twice changes nothing.
    """
    sch = parse_scheme(scheme, group_size)
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
            swaps.append((module, child_name, QuantLinear.from_linear(child, sch)))
            report.quantized.append(full)
    for parent, child_name, new in swaps:
        setattr(parent, child_name, new)
    return report


def is_quantized(model: nn.Module) -> QuantScheme | None:
    """The scheme of ``model``'s first quantized linear, or ``None``."""
    return next((m.scheme for m in model.modules() if isinstance(m, QuantLinear)), None)
