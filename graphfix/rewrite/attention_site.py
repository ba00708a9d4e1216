"""What a match of manual attention finds, and how its masks and scale factors become SDPA's arguments.

``graphfix.rewrite.attention_match`` walks the attention and fills these in; ``passes.sdpa`` reads a ``Site`` to
write the ``F.scaled_dot_product_attention`` call and remove the statements it replaces. ``NoMatch`` is what a
construct that is attention but does not match in full raises, with what did not match.
"""

from __future__ import annotations

import ast
import dataclasses
import math

WHERE = "_graphfix_where"
"""The name a combined boolean-and-additive mask calls ``torch.where`` by (the rewrite binds it)."""


class NoMatch(Exception):
    """The construct is attention, but one part of it is not something SDPA expresses; the message says which."""

    def __init__(self, line: int | None, what: str) -> None:
        super().__init__(f"line {line}: {what}" if line else what)
        self.line = line
        self.what = what
        self.softmax: ast.Call | None = None
        """The softmax of the attention that did not match, when known (so it is reported once)."""



def no_match(node: ast.AST, what: str) -> NoMatch:
    """``NoMatch`` at ``node``'s line (when it has one)."""
    return NoMatch(getattr(node, "lineno", None), what)


@dataclasses.dataclass
class MaskPart:
    """One mask applied to the scores: additive, or boolean with True where a query may attend."""

    expr: ast.expr
    boolean: bool
    condition: ast.expr | None = None
    """Applied only when this holds (the mask was added under ``if <condition>:``)."""


@dataclasses.dataclass
class Site:
    """A matched attention: where it is, the SDPA arguments, and what the rewrite removes."""

    body: list[ast.stmt]
    stmt: ast.stmt
    """The statement of ``body`` that computes the output (the product is replaced there)."""
    product: ast.expr
    softmax: ast.Call
    query: ast.expr
    key: ast.expr
    value: ast.expr
    output_perm: tuple[int, ...] | None
    """How the SDPA output's dims map to the original output's (``None``: the same layout)."""
    attn_mask: ast.expr | None
    scale: ast.expr
    dropout_p: ast.expr | None
    removed: list[Removal]
    upcast: bool
    """The original computed the softmax in float32 (and cast back)."""


@dataclasses.dataclass
class Removal:
    """A statement the rewrite deletes from ``block``; when it empties the body of ``outer`` (an ``if``), that goes."""

    block: list[ast.stmt]
    stmt: ast.stmt
    outer: ast.If | None = None


def sdpa_mask(parts: list[MaskPart]) -> ast.expr | None:
    """One SDPA mask for every mask the scores got: a sum of additive ones, an AND of boolean ones."""
    if not parts:
        return None
    if len(parts) == 1:
        part = parts[0]
        if part.condition is None or (_tests_not_none(part.condition, part.expr) and not part.boolean):
            return part.expr
        return ast.IfExp(test=part.condition, body=part.expr, orelse=ast.Constant(None))
    if any(p.condition is not None for p in parts):
        raise NoMatch(parts[0].expr.lineno, "several masks, one of them under `if`: no single SDPA mask")
    additive = _joined([p.expr for p in parts if not p.boolean], ast.Add())
    keep = _joined([p.expr for p in parts if p.boolean], ast.BitAnd())
    if keep is None or additive is None:
        return keep or additive
    where = ast.Name(id=WHERE, ctx=ast.Load())
    return ast.Call(func=where, args=[keep, additive, ast.Constant(-math.inf)], keywords=[])


def sdpa_scale(numerators: list[ast.expr], divisors: list[ast.expr]) -> ast.expr:
    """SDPA's ``scale``: the product of the factors over the product of the divisors (1.0 when none)."""
    scale = _joined(numerators, ast.Mult()) or ast.Constant(1.0)
    for divisor in divisors:
        scale = ast.BinOp(left=scale, op=ast.Div(), right=divisor)
    return scale


def _joined(exprs: list[ast.expr], op: ast.operator) -> ast.expr | None:
    if not exprs:
        return None
    joined = exprs[0]
    for expr in exprs[1:]:
        joined = ast.BinOp(left=joined, op=op, right=expr)
    return joined


def _tests_not_none(test: ast.expr, expr: ast.expr) -> bool:
    """Whether ``test`` is ``expr is not None`` for the name ``expr`` (then ``expr if test else None`` is ``expr``)."""
    return (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.IsNot)
            and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value is None
            and isinstance(test.left, ast.Name) and isinstance(expr, ast.Name) and test.left.id == expr.id)
