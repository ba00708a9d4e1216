"""Find the ops Inductor will run as ATen fallbacks instead of generated kernels.

Installed as a post-grad custom pass: it sees the exact ATen graph Inductor is
about to lower, with each node's user stack trace, and records ops that have
no lowering, are registered as fallbacks, or touch complex dtypes (Inductor has
no complex codegen). It never changes the graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from graphfix.diagnose.capture import is_internal, parse_stack
from graphfix.diagnose.findings import Location


@dataclasses.dataclass
class RawFallback:
    op: str
    reason: str
    location: Location | None
    stack: list[Location]
    phase: str


def _is_complex(node: torch.fx.Node) -> bool:
    vals = [node.meta.get("val")] + [a.meta.get("val") for a in node.all_input_nodes]
    for val in vals:
        items = val if isinstance(val, (list, tuple)) else [val]
        if any(isinstance(v, torch.Tensor) and v.is_complex() for v in items):
            return True
    return False


# Attention kernels are library kernels by design, not a codegen gap worth reporting.
_BY_DESIGN = ("_scaled_dot_product", "_flash_attention", "_efficient_attention", "_cudnn_attention")


def fallback_reason(node: torch.fx.Node) -> str | None:
    """Why this node will be a fallback kernel, or None if Inductor generates code for it."""
    from torch._inductor import lowering

    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    if any(name in str(target) for name in _BY_DESIGN):
        return None
    if _is_complex(node):
        return "complex dtype: Inductor has no complex code generation"
    if target in lowering.fallbacks:
        return "registered as an ATen fallback"
    handler = lowering.lowerings.get(target) or lowering.lowerings.get(target.overloadpacket)
    if handler is None:
        return "no Inductor lowering (implicit fallback)"
    if getattr(handler, "_is_fallback_handler", False):
        return "lowered as a fallback kernel"
    return None


class FallbackScanner(CustomGraphPass):
    """Records fallbacks; ``phase`` is set by the driver between calls."""

    def __init__(self) -> None:
        self.found: list[RawFallback] = []
        self.phase = ""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            reason = fallback_reason(node)
            if reason is None:
                continue
            stack = [f for f in parse_stack(node.meta.get("stack_trace") or "") if not is_internal(f.file)]
            self.found.append(RawFallback(str(node.target), reason, stack[-1] if stack else None, stack, self.phase))

    def uuid(self) -> Any:
        return get_hash_for_files((__file__,))


@contextlib.contextmanager
def scan_fallbacks() -> Iterator[FallbackScanner]:
    """Install the scanner for the duration; fresh compiles (no FX cache) so every graph is seen."""
    scanner = FallbackScanner()
    with inductor_config.patch(post_grad_custom_post_pass=scanner, fx_graph_cache=False):
        yield scanner
