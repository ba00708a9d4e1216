"""Which dims of manual attention's operands are which: einsum subscripts and the transposed key.

SDPA takes q, k, v as ``(batch..., heads, seq, head_dim)``. An einsum names its dims with letters, so the
batch, query, key, head and value dims are read from its subscripts and each operand gets the permutation
that puts them in SDPA's order; a ``q @ kᵀ`` product gives ``k`` back from its transpose (``.mT``,
``transpose(-2, -1)``, ``permute(0, 1, 3, 2)``). ``graphfix.rewrite.attention_match`` calls these while it walks
the attention; each returns the rank it learned (``None`` while unknown), so the walk can check that the scores
and the output agree.
"""

from __future__ import annotations

import ast
import dataclasses
import types

import torch

from graphfix.rewrite.attention_forms import Product, method_call, permuted
from graphfix.rewrite.attention_site import no_match
from graphfix.rewrite.blocks import source_rewrite as sr
from graphfix.rewrite.scope_facts import int_constant


@dataclasses.dataclass
class Permute:
    """A query operand that still needs a permutation (einsum scores), kept apart so a scale on it can fold."""

    expr: ast.expr
    perm: tuple[int, ...]


def check_letters(node: ast.AST, *specs: str) -> None:
    for spec in specs:
        if not spec.isalpha() or len(set(spec)) != len(spec):
            raise no_match(node, f"einsum operand `{spec}` uses `...`, a repeated letter or a non-letter")


def einsum_output(node: ast.expr, spec: tuple[str, str, str],
                  position: int) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """For ``einsum(spec, p, v)`` with the probabilities at ``position``: the rank, the permutation that puts v in
    SDPA's layout, and how SDPA's output dims map to the einsum's output."""
    p_spec, v_spec, o_spec = (spec[0], spec[1], spec[2]) if position == 0 else (spec[1], spec[0], spec[2])
    check_letters(node, p_spec, v_spec, o_spec)
    batch, q_letter, k_letter = p_spec[:-2], p_spec[-2], p_spec[-1]
    extra = set(v_spec) & set(o_spec) - set(p_spec)
    if len(extra) != 1:
        raise no_match(node, f"einsum `{','.join(spec[:2])}->{spec[2]}` has no single value dim")
    e = extra.pop()
    if set(v_spec) != set(batch) | {k_letter, e} or set(o_spec) != set(batch) | {q_letter, e} \
            or len(o_spec) != len(p_spec):
        raise no_match(node, f"einsum `{','.join(spec[:2])}->{spec[2]}` is not probabilities times values "
                             f"over the last dim `{k_letter}`")
    v_perm = tuple(v_spec.index(c) for c in batch + k_letter + e)
    canonical = batch + q_letter + e
    return len(p_spec), v_perm, tuple(canonical.index(c) for c in o_spec)


def einsum_scores(product: Product, rank: int | None) -> tuple[Permute, ast.expr, int]:
    """q (still to permute) and k in SDPA's layout from the einsum of the q·k scores, and the scores' rank."""
    a_spec, b_spec, s_spec = product.spec
    check_letters(product.left, a_spec, b_spec, s_spec)
    q_letter, k_letter = s_spec[-2], s_spec[-1]
    if q_letter in a_spec and k_letter in b_spec:
        (q, q_spec), (k, k_spec) = (product.left, a_spec), (product.right, b_spec)
    elif q_letter in b_spec and k_letter in a_spec:
        (q, q_spec), (k, k_spec) = (product.right, b_spec), (product.left, a_spec)
    else:
        raise no_match(product.left, f"einsum `{a_spec},{b_spec}->{s_spec}` does not end in query, key dims")
    batch = s_spec[:-2]
    head = set(q_spec) & set(k_spec) - set(s_spec)
    if len(head) != 1:
        raise no_match(product.left, f"einsum `{a_spec},{b_spec}->{s_spec}` does not contract one head dim")
    d = head.pop()
    if set(q_spec) != set(batch) | {q_letter, d} or set(k_spec) != set(batch) | {k_letter, d} \
            or k_letter in q_spec or q_letter in k_spec:
        raise no_match(product.left, f"einsum `{a_spec},{b_spec}->{s_spec}` is not q·kᵀ over batch dims "
                                     f"`{batch}`")
    if rank is not None and rank != len(s_spec):
        raise no_match(product.left, "the scores and the output have different ranks")
    q_perm = tuple(q_spec.index(c) for c in batch + q_letter + d)
    k_perm = tuple(k_spec.index(c) for c in batch + k_letter + d)
    return Permute(q, q_perm), permuted(k, k_perm), len(s_spec)


def untransposed(fn: types.FunctionType, kt: ast.expr, rank: int | None) -> tuple[ast.expr, int | None]:
    """``k`` from ``k.transpose(-2, -1)``, ``.mT``, ``.permute(0, 1, 3, 2)``; else ``kt.transpose(-2, -1)``
    (exact for any operand). With the rank, known from now on when positive dims or a permute gave it."""
    if isinstance(kt, ast.Attribute) and kt.attr == "mT":
        return kt.value, rank
    call = method_call(kt, "transpose", "swapaxes", "swapdims", "permute")
    receiver, dims = None, None
    if call is not None and not call.keywords:
        receiver, dims = call.func.value, [int_constant(a) for a in call.args]
    elif isinstance(kt, ast.Call) and sr.resolve(fn, kt.func) is torch.transpose and len(kt.args) == 3:
        receiver, dims = kt.args[0], [int_constant(a) for a in kt.args[1:]]
    if receiver is not None and None not in dims:
        if call is not None and call.func.attr == "permute":
            permute_rank = len(dims)
            if dims == list(range(permute_rank - 2)) + [permute_rank - 1, permute_rank - 2] \
                    and rank in (None, permute_rank):
                return receiver, permute_rank
        elif len(dims) == 2 and sorted(dims) == [-2, -1]:
            return receiver, rank
        elif len(dims) == 2 and min(dims) >= 0 and abs(dims[0] - dims[1]) == 1:
            transpose_rank = max(dims) + 1
            if rank in (None, transpose_rank):
                return receiver, transpose_rank
    return ast.Call(func=ast.Attribute(value=kt, attr="transpose", ctx=ast.Load()),
                    args=[ast.Constant(-2), ast.Constant(-1)], keywords=[]), rank
