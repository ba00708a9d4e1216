"""Classify raw compile events into the documented taxonomy (docs/taxonomy.md).

Rules look at the graph-break type from torch's registry, the reason text, the
user stack (file paths and source lines) and, for recompiles, the failing
guard. The first rule that matches wins, so specific causes (fairscale's
``mark_dirty``) come before generic ones (an autograd.Function).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from graphfix.diagnose.findings import Category, Location

Rule = Callable[[str, list[Location]], bool]


def _in_stack(stack: list[Location], *needles: str) -> bool:
    return any(any(n in (f.source or "") or n in f.file for n in needles) for f in stack)


def _text_has(text: str, *needles: str) -> bool:
    low = text.lower()
    return any(n.lower() in low for n in needles)


def _inner(stack: list[Location]) -> list[Location]:
    """Source-line rules look only at the innermost frame: that is the line that broke."""
    return stack[-1:]


def _head(text: str) -> str:
    """The break type and the reason's first lines, without the user traceback (whose source lines name
    whatever the surrounding frames call, e.g. an ``sdp_kernel`` context around a collective)."""
    return text.split("User code traceback:", 1)[0].split("from user code:", 1)[0]


_LOGGING_FILES = (os.sep + os.path.join("logging", "__init__.py"), os.sep + "warnings.py")


_RULES: list[tuple[Category, Rule]] = [
    (
        Category.AUTOGRAD_FUNCTION_CTX,
        lambda t, s: _text_has(_head(t), "autograd.function context", "mark_dirty", "mark_non_differentiable"),
    ),
    (Category.SDPA_CONTEXT_MANAGER, lambda t, s: _in_stack(_inner(s), "sdp_kernel") or "sdp_kernel" in _head(t)),
    (Category.INFERENCE_MODE, lambda t, s: _text_has(t, "inference tensor", "inference_mode", "version_counter")),
    (Category.PYTHON_SIDE_EFFECT, lambda t, s: any(f.file.endswith(_LOGGING_FILES) for f in s)),
    (
        Category.COLLECTIVE,
        lambda t, s: _text_has(t, "distributed collective", "async_op", "c10d", "processgroup")
        or _in_stack(_inner(s), "dist.", "work.wait()", ".wait()")
        or any("torch/distributed" in f.file or "model_parallel" in f.file for f in s),
    ),
    (Category.COMPLEX_ROPE, lambda t, s: _text_has(t, "complex") or _in_stack(_inner(s), "view_as_complex", "polar")),
    (
        Category.DATA_DEPENDENT,
        lambda t, s: _text_has(t, "tensor.item()", "tolist", "data-dependent", "generic_jump", "capture_scalar_outputs")
        or _in_stack(_inner(s), ".item()", ".tolist()"),
    ),
    (
        Category.PYTHON_SIDE_EFFECT,
        lambda t, s: _text_has(t, "builtin operator `print`", "warnings.warn", "time.time")
        or _in_stack(_inner(s), "print(", "logging.", "logger.", "warnings.warn", "time.time(", "perf_counter("),
    ),
    (
        Category.UNSUPPORTED_OP,
        lambda t, s: _text_has(t, "operator does not support", "unsupported operator", "not supported by dynamo"),
    ),
]


def classify_break(gb_type: str | None, reason: str, stack: list[Location]) -> Category:
    """The category of a graph break or compile failure."""
    text = f"{gb_type or ''}\n{reason}"
    for category, rule in _RULES:
        if rule(text, stack):
            return category
    return Category.OTHER


_POSITION_GUARD = re.compile(
    r"start_pos|input_pos|cache_position|position_ids|past_key_values|past_key_value_states|\['cache'\]"
    r"|cumulative_length|kv_len"
)
"""Guard sources that name positions or a cache (``L['cache']``: transformers 5.24's name for ``past_key_values``)."""

_INT_ATTRIBUTE_GUARD = re.compile(r"^(?:L\['self'\]|self)(?:\._modules\['[^']+'\]|\.\w+|\[\d+\])*\.\w+ == -?\d+")
"""``self.pos == 3`` / ``L['self']._modules['layers']._modules['0'].n == 3``: a module's int attribute, specialised."""


_SIZE_CHANGE = re.compile(r"size mismatch at index \d+\. expected (\d+), actual (\d+)")


def is_prefill_to_decode(guard: str, prefill_tokens: int | None) -> bool:
    """Whether a size guard failed because a prompt-length dimension became one token (decode)."""
    m = _SIZE_CHANGE.search(guard)
    return bool(m) and int(m.group(2)) == 1 and (prefill_tokens is None or int(m.group(1)) == prefill_tokens)


def _grows_by_one(guard: str) -> bool:
    """A size guard that failed because a dimension grew by one token: a cache growing in decode."""
    m = _SIZE_CHANGE.search(guard)
    return bool(m) and int(m.group(2)) == int(m.group(1)) + 1


def _is_state(text: str) -> bool:
    """A guard on a module's own tensor attribute (``self.cache_k``): state that grows between calls."""
    return bool(re.match(r"^tensor '(?:L\['self'\]|self)[.\[]", text))


def _is_length_guard(text: str, prefill_tokens: int | None) -> bool:
    m = re.match(r"^([A-Za-z_]\w*) == (\d+)$", text)
    return bool(m) and prefill_tokens is not None and int(m.group(2)) == prefill_tokens and m.group(1) != "self"


def classify_recompile(guard: str, phase: str = "", nested: bool = False, prefill_tokens: int | None = None) -> Category:
    """The cause of a recompile, from the guard that failed.

    - an integer attribute of a module (Dynamo specialises them: one graph per value) is its own
      category, whatever it is named;
    - a dtype change of an input (int32 positions in decode, int64 in prefill), or a change of its
      kind (an inference tensor after a normal one: dispatch keys) is another;
    - a shape change of a frame compiled on its own (``nested``: not the forward graphfix compiled,
      but a frame after a graph break), called again with other shapes *within* a phase, is a
      function reused at other shapes (the prompt length becoming one token is the phase change);
    - positions, caches and the prefill-to-decode shape change of the forward are the cache category.
    """
    text = guard.split("#")[0].strip()
    if _INT_ATTRIBUTE_GUARD.match(text) or "integer attributes of the nn.Module" in guard:
        return Category.INT_ATTRIBUTE
    if "dtype mismatch" in guard or "dispatch key set mismatch" in guard:
        return Category.DTYPE_RECOMPILE
    shape = "size mismatch" in guard or "stride mismatch" in guard
    if phase.startswith("decode") and _is_length_guard(text, prefill_tokens):
        return Category.DYNAMIC_CACHE  # an int local equal to the prompt length (a resume frame's seqlen == 5)
    if nested and shape and not (phase.startswith("decode") and (is_prefill_to_decode(guard, prefill_tokens)
                                                                 or _grows_by_one(guard) or _is_state(text))):
        return Category.SHAPE_REUSE
    if _POSITION_GUARD.search(text):
        return Category.DYNAMIC_CACHE
    if shape and phase.startswith("decode"):
        return Category.DYNAMIC_CACHE
    return Category.OTHER


SUGGESTIONS: dict[Category, str] = {
    Category.COMPLEX_ROPE: "precompute real cos/sin tables instead of torch.polar/view_as_complex",
    Category.COLLECTIVE: "use torch.distributed._functional_collectives (all_reduce, all_gather_tensor)",
    Category.AUTOGRAD_FUNCTION_CTX: "replace the autograd.Function wrapper (fairscale mappings) with functional collectives",
    Category.SDPA_CONTEXT_MANAGER: "use torch.nn.attention.sdpa_kernel([...]) instead of torch.backends.cuda.sdp_kernel",
    Category.INFERENCE_MODE: "enter torch.inference_mode() outside the compiled call, not as a decorator on forward",
    Category.DATA_DEPENDENT: "replace `.item()`-driven `if` with torch.where / torch.cond, or move it out of forward",
    Category.PYTHON_SIDE_EFFECT: "remove print/logging/warnings from forward or register them as reorderable",
    Category.DYNAMIC_CACHE: "use a static KV cache with tensor positions; compile prefill and decode separately",
    Category.UNSUPPORTED_OP: "replace the op with a traceable equivalent or wrap it as a custom op",
    Category.RECOMPILE_LIMIT: "remove the source of recompiles; the frame now runs uncompiled",
    Category.INT_ATTRIBUTE: ("an int attribute of a module changes between calls: compile with it dynamic "
                             "(allow_unspec_int_on_nn_module), one compiled callable per phase"),
    Category.DTYPE_RECOMPILE: ("an input changes dtype (or becomes an inference tensor) between calls: one compiled "
                               "callable per phase, or one dtype and one kind of tensor"),
    Category.SHAPE_REUSE: ("a frame compiled on its own (after a graph break) is called with other shapes: remove the "
                           "break above it so that it is inlined, or mark the dimension dynamic"),
    Category.NOT_COMPILED: ("make the loop call the model it is given (model(...) or model.forward(...)); a loop "
                            "that calls another entry point (a submodule, generate of another object) is not seen"),
    Category.OTHER: "",
}
