"""Recognise manual attention in a function's source: ``softmax(scale * q kᵀ + mask) v``, however it is spelled.

The match starts at a product of two tensors (``p @ v``, ``torch.matmul``, ``torch.bmm``, ``.matmul``,
``torch.einsum``) whose first factor reaches a softmax, and walks the data flow backwards through single
assignments of one block (a function body or a branch): probability casts and dropout, the softmax (with its
float32 upcast), masks (additive, ``masked_fill(..., -inf)``, ``torch.where``, also under ``if <test>:``),
scale factors (on the scores or on q), and the ``q kᵀ`` product. What it finds is a ``Site``: the three SDPA
operands in ``(batch..., heads, seq, head_dim)`` layout (transposes applied), the mask, dropout and scale
expressions, and the statements the rewrite removes. A construct that is attention but does not match in full
raises ``NoMatch`` with what did not match; nothing is ever half-rewritten.

Three readings are assumptions, stated so a reader can check them: ``k.transpose(2, 3)`` (positive dims) is read
as the transpose of the last two dims of a 4-D tensor, and a softmax over ``dim=3`` as the key dim of 4-D
scores (negative dims and einsum subscripts need no assumption); a tensor *added* to the scores is a float mask
(a bool tensor added to scores adds 0 or 1, where SDPA would read it as keep or drop). Every attention we know
writes them so.

What a match finds is in ``graphfix.rewrite.attention_site`` (``Site``, ``NoMatch``, and the SDPA mask and scale
made from the parts found); which dims are which (einsum subscripts, the transposed key) in
``graphfix.rewrite.attention_layouts``. Both are re-exported here.
"""

from __future__ import annotations

import ast

import torch

from graphfix.rewrite import dataflow
from graphfix.rewrite.attention_forms import Forms, Product, Step, method_call, negated, peek, permuted, written_name
from graphfix.rewrite.attention_layouts import Permute, einsum_output, einsum_scores, untransposed
from graphfix.rewrite.attention_site import WHERE, MaskPart, NoMatch, Removal, Site, no_match, sdpa_mask, sdpa_scale
from graphfix.rewrite.blocks import source_rewrite as sr
from graphfix.rewrite.scope_facts import MAX_DEPTH, constant_value, int_constant

__all__ = ["WHERE", "MaskPart", "Matcher", "NoMatch", "Removal", "Site"]


class _QueryReadElsewhere(NoMatch):
    """The scaled query, folded into SDPA's scale, is read elsewhere too: match again with it as a plain operand."""


class Matcher:
    """Finds attention sites in one function; ``match`` answers for one product node of one block."""

    def __init__(self, forms: Forms) -> None:
        self.forms = forms

    def match(self, body: list[ast.stmt], index: int, node: ast.AST) -> Site | None:
        """The attention whose output product is ``node`` (in ``body[index]``); ``None``: not attention.

        ``NoMatch`` says what did not match when it is attention.
        """
        found = self.forms.product(node)
        if found is None:
            return None
        operands = [(found.left, found.right, 0)]
        if found.kind == "einsum":
            operands.append((found.right, found.left, 1))
        for probs, value, position in operands:
            softmax = self.forms.reaches_softmax(body, probs, index)
            if softmax is None:
                continue
            try:
                try:
                    return _Walk(self.forms, body, index, True).run(node, found, probs, value, position)
                except _QueryReadElsewhere:
                    return _Walk(self.forms, body, index, False).run(node, found, probs, value, position)
            except sr.Unrewritable as exc:
                error = NoMatch(node.lineno, str(exc))
            except NoMatch as exc:
                error = exc
            error.softmax = softmax
            raise error
        return None


class _Walk:
    """One attempt to match an output product, collecting what the site needs; ``NoMatch`` on a mismatch."""

    def __init__(self, forms: Forms, body: list[ast.stmt], index: int, fold_named_query: bool) -> None:
        self.forms = forms
        self.fn = forms.fn
        self.body = body
        self.index = index
        self.fold_named_query = fold_named_query
        self.edges: set[int] = set()
        self.intermediates: set[str] = set()
        self.removed: list[Removal] = []
        self.origins: list[int] = []
        self.moved: list[tuple[ast.expr, int]] = []
        self.masks: list[MaskPart] = []
        self.scale_num: list[ast.expr] = []
        self.scale_den: list[ast.expr] = []
        self.upcast = False
        self.rank: int | None = None
        self.folded_query: str | None = None

    def fail(self, node: ast.AST, what: str) -> NoMatch:
        return no_match(node, what)

    def follow(self, name: ast.Name, at: int) -> Step:
        """The step that wrote intermediate ``name``; it joins the statements the rewrite removes."""
        step = peek(self.body, name, at)
        if step is None:
            j = dataflow.last_write(self.body, at, name.id)
            where = f"is written at line {self.body[j].lineno}" if j is not None else "comes from outside the block"
            raise self.fail(name, f"`{name.id}` {where}, not by a single assignment in the same straight-line block")
        self.edges.add(id(name))
        self.intermediates.add(name.id)
        self.removed.append(Removal(step.block, step.stmt, step.outer))
        self.origins.append(step.at)
        if step.condition is not None:
            if any(isinstance(n, (ast.Call, ast.NamedExpr, ast.Await)) for n in ast.walk(step.condition)):
                raise self.fail(step.outer, f"`if {ast.unparse(step.condition)}` calls a function: the SDPA call "
                                            "would evaluate it again")
            self._move(step.condition, step.at)
            for kept in step.block[:-1]:
                if any(dataflow.binds(kept, n) for n in dataflow.names_read(step.condition)):
                    raise self.fail(kept, f"the branch changes what `if {ast.unparse(step.condition)}` tests")
        return step

    def _move(self, expr: ast.expr, origin: int) -> None:
        self.moved.append((expr, origin))

    # --- output ---------------------------------------------------------------------------------

    def run(self, node: ast.expr, product: Product, probs: ast.expr, value: ast.expr, position: int) -> Site:
        value_in, output_perm = value, None
        if product.kind == "bmm":
            self.rank = 3
        if product.kind == "einsum":
            self.rank, v_perm, output_perm = einsum_output(node, product.spec, position)
            value_in = permuted(value, v_perm)
        softmax, dropout_p = self._probabilities(probs, self.index)
        query, key = self._scores(softmax)
        self._check_reads()
        self._check_moves()
        return Site(self.body, self.body[self.index], node, softmax[0], query, key, value_in, output_perm,
                    sdpa_mask(self.masks), sdpa_scale(self.scale_num, self.scale_den), dropout_p, self.removed,
                    self.upcast)

    def _check_reads(self) -> None:
        """The values the chain computes must be read only along it (weights returned or stored: no rewrite)."""
        first_writes: dict[str, ast.stmt] = {}
        for removal in reversed(self.removed):  # the walk goes backwards: the last removal is the first write
            name = written_name(removal.stmt)
            if name is not None and name not in first_writes:
                first_writes[name] = removal.stmt
        chain = {id(r.stmt) for r in self.removed}
        stray = dataflow.stray_reads(self.forms.scope.tree, first_writes, chain, self.edges)
        if not stray:
            return
        node = stray[0]
        error = _QueryReadElsewhere if {n.id for n in stray} == {self.folded_query} else NoMatch
        raise error(node.lineno, f"`{node.id}`, computed by the attention at line {first_writes[node.id].lineno}, "
                                 "is also read here (attention weights returned, stored or logged?); SDPA does not "
                                 "produce them")

    def _check_moves(self) -> None:
        """Each operand moves to the output statement: nothing in between may change what it reads."""
        gone = {id(r.stmt) for r in self.removed if r.outer is None}
        gone |= {id(r.outer) for r in self.removed if r.outer is not None
                 and all(any(s is q.stmt for q in self.removed) for s in r.outer.body)}
        for expr, origin in self.moved:
            reason = dataflow.movable(self.body, origin, self.index, expr, gone)
            if reason:
                raise NoMatch(getattr(expr, "lineno", None), f"{reason}, so it cannot move down to the attention "
                                                             f"output at line {self.body[self.index].lineno}")

    # --- probabilities --------------------------------------------------------------------------

    def _probabilities(self, expr: ast.expr, at: int) -> tuple[tuple[ast.Call, int], ast.expr | None]:
        dropout_p = None
        while True:
            if isinstance(expr, ast.Name):
                step = self.follow(expr, at)
                if step.condition is not None:
                    raise self.fail(step.stmt, f"the probabilities change under `if {ast.unparse(step.condition)}`")
                expr, at = step.value, step.at
                continue
            if self.forms.softmax(expr) is not None:
                return (expr, at), dropout_p
            cast = self.forms.cast(expr)
            if cast is not None:
                expr = cast[0]
                continue
            dropped = self.forms.dropout(expr)
            if dropped is None:
                raise self.fail(expr, f"`{ast.unparse(expr)}` between the softmax and the product with v is not a "
                                      "cast or a dropout")
            if dropout_p is not None:
                raise self.fail(expr, "dropout is applied twice to the probabilities")
            dropout_p = self._dropout_p(expr, dropped[1], dropped[2], at)
            expr = dropped[0]

    def _dropout_p(self, node: ast.expr, p: ast.expr | None, training: ast.expr | None, at: int) -> ast.expr | None:
        if p is None:  # nn.Identity
            return None
        if not self.forms.scope.is_number(p, at, self.body):
            raise self.fail(node, f"dropout probability `{ast.unparse(p)}` is not provably a Python number")
        self._move(p, at)
        self._move(training, at)
        constant = constant_value(self.fn, training)
        if constant is True:
            return p
        if constant is False:
            return ast.Constant(0.0)
        return ast.IfExp(test=training, body=p, orelse=ast.Constant(0.0))

    # --- softmax and scores ---------------------------------------------------------------------

    def _scores(self, softmax: tuple[ast.Call, int]) -> tuple[ast.expr, ast.expr]:
        call, at = softmax
        expr, dim, dtype = self.forms.softmax(call)
        if dtype is not None:
            if sr.resolve(self.fn, dtype) is not torch.float32:
                raise self.fail(call, f"softmax in dtype `{ast.unparse(dtype)}` (SDPA keeps the input dtype)")
            self.upcast = True
        self._softmax_dim = (call, dim)
        scaled = False
        for _ in range(MAX_DEPTH):
            if isinstance(expr, ast.Name):
                step = self.follow(expr, at)
                expr, at = step.value, step.at
                if step.condition is not None:
                    expr = self._mask(expr, at, scaled, step)
                continue
            product = self.forms.product(expr)
            if product is not None:
                query, key = self._qk(product, at)
                self._check_softmax_dim()
                return query, key
            cast = self.forms.cast(expr)
            if cast is not None:
                expr, upcast = cast
                self.upcast |= upcast
                continue
            masked = self._mask_or_none(expr, at, scaled)
            if masked is not None:
                expr = masked
                continue
            factor = self._scale(expr, at)
            if factor is None:
                raise self.fail(expr, f"`{ast.unparse(expr)}` between the q·k product and the softmax is not a "
                                      "scale, a mask or a cast")
            expr, scaled = factor, True
        raise self.fail(call, "the scores chain is too long")

    def _check_softmax_dim(self) -> None:
        call, dim = self._softmax_dim
        value = int_constant(dim) if dim is not None else None
        if value == -1 or (value is not None and self.rank is not None and value == self.rank - 1):
            return
        raise self.fail(call, f"softmax over dim `{ast.unparse(dim) if dim is not None else None}`, not provably "
                              "the key dim (-1)")

    def _mask(self, expr: ast.expr, at: int, scaled: bool, step: Step) -> ast.expr:
        """A mask written under ``if``: it must mask the name itself, so that skipping it leaves the scores."""
        masked = self._mask_or_none(expr, at, scaled)
        if not isinstance(masked, ast.Name):
            raise self.fail(step.stmt, f"under `if {ast.unparse(step.condition)}` the scores change by more than a "
                                       "mask")
        target = written_name(step.stmt)
        if masked.id != target:
            raise self.fail(step.stmt, f"under `if {ast.unparse(step.condition)}` the scores are not masked in place")
        self.masks[-1].condition = step.condition
        return masked

    def _mask_or_none(self, expr: ast.expr, at: int, scaled: bool) -> ast.expr | None:
        """The scores operand of a mask applied to them (the mask is recorded), or ``None``: not a mask."""
        scoreish = lambda e: self.forms.scoreish(self.body, e, at)
        part = None
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            left, right = scoreish(expr.left), scoreish(expr.right)
            if left == right:
                raise self.fail(expr, f"cannot tell the scores from the mask in `{ast.unparse(expr)}`")
            scores, mask = (expr.left, expr.right) if left else (expr.right, expr.left)
            part = MaskPart(mask, boolean=False)
        fill = method_call(expr, "masked_fill")
        if fill is not None:
            args = {**dict(zip(("mask", "value"), fill.args)), **{k.arg: k.value for k in fill.keywords}}
            if set(args) != {"mask", "value"}:
                raise self.fail(expr, "masked_fill with unexpected arguments")
            if not self.forms.neg_inf(args["value"]):
                raise self.fail(expr, f"masked_fill with `{ast.unparse(args['value'])}`, not -inf: SDPA's boolean "
                                      "mask fills -inf, and rows masked everywhere would differ")
            scores, part = fill.func.value, MaskPart(negated(args["mask"]), boolean=True)
        if isinstance(expr, ast.Call) and sr.resolve(self.fn, expr.func) is torch.where and len(expr.args) == 3 \
                and not expr.keywords:
            cond, a, b = expr.args
            if scoreish(a) and self.forms.neg_inf(b):
                scores, part = a, MaskPart(cond, boolean=True)
            elif scoreish(b) and self.forms.neg_inf(a):
                scores, part = b, MaskPart(negated(cond), boolean=True)
            else:
                raise self.fail(expr, "torch.where on the scores with something other than -inf")
        if part is None:
            return None
        if scaled:
            raise self.fail(expr, "a mask is applied before a scale (SDPA scales first, then masks)")
        self._move(part.expr, at)
        self.masks.append(part)
        return scores

    def _scale(self, expr: ast.expr, at: int) -> ast.expr | None:
        """The scores operand of ``scores * s`` / ``s * scores`` / ``scores / s`` (``s`` recorded), else ``None``."""
        if not (isinstance(expr, ast.BinOp) and isinstance(expr.op, (ast.Mult, ast.Div))):
            return None
        scoreish = lambda e: self.forms.scoreish(self.body, e, at)
        if isinstance(expr.op, ast.Div) or scoreish(expr.left):
            scores, factor = expr.left, expr.right
        else:
            scores, factor = expr.right, expr.left
        if not scoreish(scores):
            return None
        self._factor(factor, isinstance(expr.op, ast.Div), at, expr)
        return scores

    def _factor(self, factor: ast.expr, divide: bool, at: int, where: ast.AST) -> None:
        if not self.forms.scope.is_number(factor, at, self.body):
            raise self.fail(where, f"scale `{ast.unparse(factor)}` is not provably a Python number (SDPA's scale "
                                   "must be a float)")
        self._move(factor, at)
        (self.scale_den if divide else self.scale_num).append(factor)

    # --- the q·k product ------------------------------------------------------------------------

    def _qk(self, product: Product, at: int) -> tuple[ast.expr, ast.expr]:
        if product.kind == "einsum":
            query, key, self.rank = einsum_scores(product, self.rank)
        else:
            if product.kind == "bmm":
                self.rank = 3
            query = product.left
            key, self.rank = untransposed(self.fn, product.right, self.rank)
        query = self._query(query, at)
        for operand, role in ((query, "q"), (key, "k")):
            self._check_not_cast(operand, role, at)
        self._move(query, at)
        self._move(key, at)
        return query, key

    def _check_not_cast(self, operand: ast.expr, role: str, at: int) -> None:
        """q or k cast to another dtype for the product (``q.float()``, ``q = q.to(torch.float32)``): SDPA takes
        q, k, v in one dtype, and the output would change dtype too."""
        while isinstance(operand, ast.Call) and isinstance(operand.func, ast.Attribute) \
                and operand.func.attr in ("transpose", "permute"):
            operand = operand.func.value
        written = operand
        if isinstance(operand, ast.Name):
            j = dataflow.last_write(self.body, at, operand.id)
            stmt = self.body[j] if j is not None else None
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                written = stmt.value
        if self.forms.cast(written) is not None:
            raise self.fail(operand, f"{role} is cast (`{ast.unparse(written)}`) for the product: SDPA takes q, k, v "
                                     "in one dtype")

    def _query(self, query: ast.expr, at: int) -> ast.expr:
        """Fold a scale applied to q (``(q * s) @ kᵀ``, or ``q = q * s`` just before) into SDPA's scale."""
        permute = query if isinstance(query, Permute) else None
        inner = permute.expr if permute else query
        folded = self._query_scale(inner, at)
        if folded is None and isinstance(inner, ast.Name) and self.fold_named_query:
            step = peek(self.body, inner, at)
            if step is not None and step.condition is None and self._query_scale(step.value, step.at, probe=True):
                step = self.follow(inner, at)
                self.folded_query = inner.id
                folded = self._query_scale(step.value, step.at)
        result = folded if folded is not None else inner
        return permuted(result, permute.perm) if permute else result

    def _query_scale(self, expr: ast.expr, at: int, probe: bool = False) -> ast.expr | None:
        if not (isinstance(expr, ast.BinOp) and isinstance(expr.op, (ast.Mult, ast.Div))):
            return None
        number = lambda e: self.forms.scope.is_number(e, at, self.body)
        if isinstance(expr.op, ast.Div):
            q, factor = (expr.left, expr.right) if number(expr.right) else (None, None)
        elif number(expr.right):
            q, factor = expr.left, expr.right
        elif number(expr.left):
            q, factor = expr.right, expr.left
        else:
            q, factor = None, None
        if q is None or probe:
            return q
        self._factor(factor, isinstance(expr.op, ast.Div), at, expr)
        return q
