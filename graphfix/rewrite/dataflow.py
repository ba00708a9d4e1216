"""Data flow in straight-line code, for source transforms that fold several statements into one.

A transform that replaces a chain of assignments (``s = q @ k.mT``; ``s = s + m``; ``p = s.softmax(-1)``;
``o = p @ v``) by one expression must know three things: which earlier statement of the same block last
wrote a name; whether a value the chain computes is read anywhere but along the chain (then the chain
cannot go); and whether an expression may be evaluated later than where it was written (nothing in
between rebinds or mutates what it reads). A *block* is one list of statements (a function body, an
``if`` branch); positions are indexes in it. What lies outside the block is judged conservatively.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator

_SCOPES = (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp,
           ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_LOOPS = (ast.For, ast.AsyncFor, ast.While)


def blocks(fdef: ast.FunctionDef) -> Iterator[list[ast.stmt]]:
    """Every statement list of ``fdef``'s own scope (its body, branches, loop and ``with`` bodies, handlers)."""
    yield from _blocks(fdef)


def _blocks(node: ast.AST) -> Iterator[list[ast.stmt]]:
    for block in child_blocks(node):
        yield block
        for stmt in block:
            if not isinstance(stmt, _SCOPES):
                yield from _blocks(stmt)


def child_blocks(node: ast.AST) -> Iterator[list[ast.stmt]]:
    """The statement lists directly under ``node``: bodies, ``else``/``finally`` blocks, handlers, match cases."""
    for field in ("body", "orelse", "finalbody"):
        value = getattr(node, field, None)
        if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
            yield value
    for sub in getattr(node, "handlers", []) + getattr(node, "cases", []):
        yield from child_blocks(sub)


def is_loop(stmt: ast.stmt) -> bool:
    return isinstance(stmt, _LOOPS)


def expression_nodes(stmt: ast.stmt) -> Iterator[ast.AST]:
    """The nodes of ``stmt``'s own expressions: not its nested blocks, not nested scopes (lambdas, comprehensions)."""
    for _, value in ast.iter_fields(stmt):
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, ast.AST) and not isinstance(item, (ast.stmt, ast.excepthandler)):
                yield from _walk_scope(item)


def _walk_scope(node: ast.AST) -> Iterator[ast.AST]:
    if isinstance(node, _SCOPES):
        return
    yield node
    for child in ast.iter_child_nodes(node):
        yield from _walk_scope(child)


def root_name(node: ast.AST) -> str | None:
    """``x`` for ``x``, ``x.a.b``, ``x[i].c``, ``x.m(...)``: the local whose object an expression reaches into."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def names_read(node: ast.AST) -> set[str]:
    """The names an expression reads (nested scopes included: conservative)."""
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def binds(stmt: ast.stmt, name: str) -> bool:
    """Whether ``stmt`` (with its nested blocks) may bind or delete ``name``."""
    for node in ast.walk(stmt):
        if isinstance(node, ast.Name) and node.id == name and not isinstance(node.ctx, ast.Load):
            return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                (a.asname or a.name.partition(".")[0]) == name for a in node.names):
            return True
        if isinstance(node, (ast.Global, ast.Nonlocal)) and name in node.names:
            return True
    return False


def mutates(stmt: ast.stmt, name: str) -> bool:
    """Whether ``stmt`` may change the object ``name`` holds: ``name[...] = ``, ``name.a = ``, ``name.<op>_(...)``,
    or a method of it called for its effect alone (``name.cache.update(...)`` as a statement)."""
    for node in ast.walk(stmt):
        if isinstance(node, (ast.Attribute, ast.Subscript)) and not isinstance(node.ctx, ast.Load) \
                and root_name(node) == name:
            return True
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.endswith("_")
                and not node.func.attr.startswith("_") and root_name(node.func.value) == name):
            return True
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and root_name(node.value.func) == name:
            return True
    return False


def last_write(body: list[ast.stmt], index: int, name: str) -> int | None:
    """The index of the last statement before ``body[index]`` that binds or mutates ``name``, if any."""
    for j in range(index - 1, -1, -1):
        if binds(body[j], name) or mutates(body[j], name):
            return j
    return None


def movable(body: list[ast.stmt], start: int, end: int, expr: ast.AST, ignore: set[int]) -> str | None:
    """Why ``expr``, written in ``body[start]``, cannot be evaluated at ``body[end]`` instead (``None``: it can).

    Statements in between whose ids are in ``ignore`` (those the rewrite removes) do not count. A call in
    ``expr`` never moves past another call: either may have effects the other sees.
    """
    names = names_read(expr)
    calls = any(isinstance(n, ast.Call) for n in ast.walk(expr))
    for m in range(start + 1, end):
        stmt = body[m]
        if id(stmt) in ignore:
            continue
        for name in sorted(names):
            if binds(stmt, name) or mutates(stmt, name):
                return f"line {stmt.lineno} changes `{name}`, which `{ast.unparse(expr)}` reads"
        if calls and any(isinstance(n, ast.Call) for n in ast.walk(stmt)):
            return f"`{ast.unparse(expr)}` calls a function and line {stmt.lineno} does too"
    return None


def _position(node: ast.AST) -> tuple[int, int]:
    return getattr(node, "lineno", 0), getattr(node, "col_offset", 0)


def _end(node: ast.AST) -> tuple[int, int]:
    return getattr(node, "end_lineno", 0) or 0, getattr(node, "end_col_offset", 0) or 0


def _rebinds(stmt: ast.stmt, name: str) -> bool:
    """Whether ``stmt`` always binds ``name`` anew (a plain assignment to it)."""
    if isinstance(stmt, ast.Assign):
        targets = [e for t in stmt.targets for e in (t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t])]
        return any(isinstance(t, ast.Name) and t.id == name for t in targets)
    return isinstance(stmt, ast.AnnAssign) and stmt.value is not None and \
        isinstance(stmt.target, ast.Name) and stmt.target.id == name


def stray_reads(fdef: ast.FunctionDef, first_writes: dict[str, ast.stmt], chain: set[int],
                along: set[int]) -> list[ast.Name]:
    """Reads that may see a value a chain of statements computes, other than the chain's own reads (``along``).

    ``first_writes`` maps each name the chain writes to its first statement writing it; ``chain`` holds the ids
    of all its statements. A read up to the end of that first write sees an older value (unless a loop runs the
    chain again before it); a read after a later plain rebinding outside the chain sees the new value.
    """
    stray = []
    for name, write in first_writes.items():
        block = next((b for b in blocks(fdef) if any(s is write for s in b)), None)
        after = block[[id(s) for s in block].index(id(write)) + 1:] if block else []
        kill = next((s for s in after if id(s) not in chain and _rebinds(s, name)), None)
        start = _end(write)
        in_loop = {id(n) for loop in ast.walk(fdef) if isinstance(loop, _LOOPS)
                   and any(n is write for n in ast.walk(loop)) for n in ast.walk(loop)}
        for node in ast.walk(fdef):  # nested scopes too: a closure may read the name
            if not (isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Load, ast.Del)) and node.id == name):
                continue  # a `del` counts: it would fail once the chain no longer binds the name
            pos = _position(node)
            if id(node) in along or (kill is not None and pos > _end(kill)):
                continue
            if pos > start or id(node) in in_loop:
                stray.append(node)
    return sorted(stray, key=_position)