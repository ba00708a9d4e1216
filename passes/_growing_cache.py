"""The growing-cache construct in one method's source: find it, prove every use of it, rewrite it.

The construct is a module attribute that grows by concatenation and is read by attention::

    self.cache_k = k if self.cache_k is None else torch.cat([self.cache_k, k], dim=2)
    out = F.scaled_dot_product_attention(q, self.cache_k, self.cache_v, is_causal=T > 1)

After the pass the attribute is a ``PreallocatedCache`` (``graphfix.rewrite.blocks.kv_cache``)
and the method reads::

    self.cache_k.append(k)
    out = _graphfix_attend_written(self.cache_k.length, q, self.cache_k.buffer, self.cache_v.buffer, is_causal=T > 1)

A method is rewritten only when every appearance of a cache attribute is one of the forms
below, so the rewritten method provably computes what the original did:

- writes: ``torch.cat([self.A, x], dim)`` (append), ``None`` or a zero-length tensor (reset),
  any other tensor (the cache becomes it), the ``x if self.A is None else torch.cat(...)``
  conditional (a conditional on anything else stays a Python ``if`` around the writes), and
  ``if self.A is None: ... else: ...`` whose branches only write caches and locals (merged into
  one branch-free sequence: "is None" becomes the tensor ``is_empty()``);
- reads that reach ``F.scaled_dot_product_attention`` (or graphfix's ``sdpa``) as key and value
  through steps that keep the batch and sequence dims whole (``passes._cache_views``: transposes,
  dtype moves, head repeats, ``expand``/``reshape`` matched against the view's own sizes, also
  inside helpers such as Meta's ``repeat_kv``): attention runs over the whole buffer with a
  mask of the written positions, combined with SDPA's own ``is_causal`` or with the original's
  ``attn_mask`` widened to the buffer (``kv_cache.over_written``);
- the length (``self.A.shape[d]``, ``.size(d)``, ``0 if self.A is None else ...``), a tensor
  after the rewrite, used only as ``table[pos : pos + n]`` (becomes ``index_select``) or
  ``torch.arange(pos, pos + n)`` (becomes ``shifted_arange(pos, n)``).

Anything else is refused with its line, and the owner is left as it was.

The rewrite is put together here from one part per kind of construct:

- ``passes._cache_syntax``: the forms, one expression at a time (``torch.cat([self.A, x])``, ``self.A is None``, ...);
- ``passes._cache_rewrite_base``: what a value holds (a view, a length, a position) and the shared state;
- ``passes._cache_statements``: blocks, branches, loops, assignments;
- ``passes._cache_writes``: writes of a cache and the merged ``if self.A is None:`` branches;
- ``passes._cache_expressions``: the expression dispatch, attention over the caches, helpers followed;
- ``passes._cache_steps``: shape-keeping steps on views and their size reads;
- ``passes._cache_positions``: the written length and its two uses.
"""

from __future__ import annotations

from passes._cache_expressions import ExpressionRewrite
from passes._cache_positions import PositionRewrite
from passes._cache_rewrite_base import AMBIGUOUS, HELPERS, STALE, Kind, Position, PositionEnd, length_parameter
from passes._cache_statements import StatementRewrite
from passes._cache_steps import StepRewrite
from passes._cache_syntax import (
    RANK,
    cat_append,
    const_int,
    dim_read,
    is_empty_tensor,
    is_none,
    none_test,
    same,
    self_attr,
)
from passes._cache_writes import BranchOp, Refused, WriteRewrite

__all__ = [
    "AMBIGUOUS", "HELPERS", "RANK", "STALE", "BranchOp", "Kind", "MethodRewrite", "Position", "PositionEnd", "Refused",
    "cat_append", "const_int", "dim_read", "is_empty_tensor", "is_none", "length_parameter", "none_test", "same",
    "self_attr",
]


class MethodRewrite(StatementRewrite, WriteRewrite, ExpressionRewrite, StepRewrite, PositionRewrite):
    """Rewrites the cache constructs of one method's tree in place; ``reasons`` lists what it could not prove.

    ``caches`` maps each cache attribute to its sequence dim (1 or 2). ``sites`` counts the
    constructs rewritten (a write, a reset, a length read, a position use, an attention call).
    """
