"""Which steps keep a cache read usable as attention's key/value: a small algebra of dims and their sizes.

After the rewrite a cache read is the whole preallocated buffer: its batch dim has
``max_batch`` rows and its sequence dim ``max_seq_len`` positions, where the original had the
written batch and length. Any other dim has the same size in both. A step between the read
and attention is allowed when it provably keeps the batch and sequence dims whole and
separate: then attention over the buffer, masked to the written positions, equals attention
over the original.

A ``View`` records, per position, a *size token*: ``"b"`` and ``"s"`` for batch and sequence,
``"1"`` for a new axis, an opaque token for any other dim, and products (``"a×b"``) for merged
ones. ``x.shape`` of a view yields ``SizeOf(token)``; ``expand`` and ``reshape`` are checked by
matching their arguments' tokens against the dims they keep or merge (Meta's ``repeat_kv``:
``x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, -1, s, d)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

BATCH, SEQ, UNIT = "b", "s", "1"


@dataclasses.dataclass(frozen=True)
class View:
    """A cache read through shape-keeping steps; ``sizes[i]`` is the size token of dim ``i``."""

    attr: str
    sizes: tuple[str, ...]

    @classmethod
    def of_cache(cls, attr: str, seq_dim: int, rank: int = 4) -> View:
        sizes = tuple(BATCH if i == 0 else SEQ if i == seq_dim else f"{attr}.d{i}" for i in range(rank))
        return cls(attr, sizes)

    def with_sizes(self, sizes: Sequence[str]) -> View:
        return View(self.attr, tuple(sizes))

    @property
    def sdpa_ready(self) -> bool:
        """Rank 4, batch first and sequence at -2: SDPA's key/value layout."""
        return len(self.sizes) == 4 and self.sizes[0] == BATCH and self.sizes[2] == SEQ


@dataclasses.dataclass(frozen=True)
class SizeOf:
    """An int read from a view's shape (``bsz, h, seqlen, d = x.shape``)."""

    token: str

    @property
    def differs(self) -> bool:
        """Batch and sequence sizes are other numbers after the rewrite; the rest are the same."""
        return self.token in (BATCH, SEQ)


Tokens = list[str] | None
"""The size tokens whose product an argument of ``expand``/``reshape`` is; ``None`` for ``-1``."""


def product(tokens: Sequence[str]) -> str:
    factors = sorted(f for t in tokens for f in t.split("×") if f != UNIT)
    return "×".join(factors) or UNIT


def joined(views: Sequence[View], name: str) -> View | None:
    """One view for what any of ``views`` may be (a helper's returns): batch and sequence must sit at the same
    positions in all; other dims that differ get an opaque token."""
    first = views[0]
    if any(v.attr != first.attr or len(v.sizes) != len(first.sizes) for v in views):
        return None
    sizes = []
    for i, column in enumerate(zip(*(v.sizes for v in views))):
        if len(set(column)) == 1:
            sizes.append(column[0])
        elif {BATCH, SEQ} & set(column):
            return None
        else:
            sizes.append(f"{name}.d{i}")
    return first.with_sizes(sizes)


def permuted(view: View, order: Sequence[int]) -> View | None:
    rank = len(view.sizes)
    if sorted(o % rank for o in order) != list(range(rank)):
        return None
    return view.with_sizes([view.sizes[o % rank] for o in order])


def transposed(view: View, a: int, b: int) -> View:
    sizes = list(view.sizes)
    rank = len(sizes)
    sizes[a % rank], sizes[b % rank] = sizes[b % rank], sizes[a % rank]
    return view.with_sizes(sizes)


def repeated(view: View, dim: int, times: str) -> View | None:
    """``repeat_interleave(times, dim)``: allowed on a dim that is neither batch nor sequence."""
    sizes = list(view.sizes)
    if not -len(sizes) <= dim < len(sizes) or sizes[dim] in (BATCH, SEQ):
        return None
    sizes[dim] = product([sizes[dim], times])
    return view.with_sizes(sizes)


def unsqueezed(view: View, dim: int) -> View | None:
    sizes = list(view.sizes)
    if not -len(sizes) - 1 <= dim <= len(sizes):
        return None
    sizes.insert(dim % (len(sizes) + 1), UNIT)
    return view.with_sizes(sizes)


def expanded(view: View, targets: Sequence[Tokens]) -> View | None:
    """``expand(*targets)``: batch and sequence kept (their own size or ``-1``), new axes may grow."""
    if len(targets) != len(view.sizes):
        return None
    sizes = []
    for size, target in zip(view.sizes, targets):
        if target is None or product(target) == product([size]):
            sizes.append(size)
        elif size == UNIT and not {BATCH, SEQ} & set(target):
            sizes.append(product(target))
        else:
            return None
    return view.with_sizes(sizes)


def reshaped(view: View, targets: Sequence[Tokens]) -> View | None:
    """``reshape(*targets)``: each target is a run of consecutive dims whose sizes multiply to it; batch and
    sequence must each be a run of their own (size-1 axes aside). At most one ``-1`` takes what is left."""
    if sum(t is None for t in targets) > 1:
        return None
    source = list(view.sizes)
    if None in targets:
        cut = list(targets).index(None)
        left = _match_runs(source, targets[:cut])
        right = _match_runs(source[::-1], targets[cut + 1:][::-1])
        if left is None or right is None:
            return None
        (left_sizes, used_left), (right_sizes, used_right) = left, right
        if used_left + used_right > len(source):
            return None
        middle = source[used_left:len(source) - used_right]
        if any(s in (BATCH, SEQ) for s in middle):
            return None
        return view.with_sizes(left_sizes + [product(middle)] + right_sizes[::-1])
    matched = _match_runs(source, targets)
    if matched is None or any(s != UNIT for s in source[matched[1]:]):
        return None
    return view.with_sizes(matched[0])


def _match_runs(source: list[str], targets: Sequence[Tokens]) -> tuple[list[str], int] | None:
    """Greedy runs of ``source`` for ``targets`` (no ``-1`` among them): ``(new sizes, dims used)``."""
    sizes, used = [], 0
    for target in targets:
        want = product(target)
        run: list[str] = []
        while used < len(source) and (not run or product(run) != want):
            run.append(source[used])
            used += 1
        if product(run) != want:
            return None
        kept = [s for s in run if s != UNIT]
        if any(s in (BATCH, SEQ) for s in kept) and len(kept) != 1:
            return None
        sizes.append(kept[0] if len(kept) == 1 else product(run))
    return sizes, used
