"""Pass functional-collectives on constructs written here, not fairscale's classes.

A custom autograd.Function that all-reduces in place under ``ctx.mark_dirty`` (called through an
alias, as fairscale's mappings do), async collectives whose Work handles are kept in a list, and
``async_op=True`` reduce-scatter / all-gather in a helper. Tensor parallel of size 1 (in-memory
gloo group) and 2 (two gloo processes) must give the same outputs: the model holds its rank's
shards of one set of full weights.
"""

from __future__ import annotations

import ast
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from graphfix.rewrite.blocks.source_rewrite import rewritten_source
from graphfix.rewrite.pass_manager import PassContext
from passes._autograd_functions import TRACED_CTX_METHODS
from passes.collectives import FunctionalCollectivesPass
from tests.fixtures.synthetic import ensure_single_process_group
from tests.helpers_meta import free_port, run_processes

CTX = PassContext()
DIM, HIDDEN, VOCAB = 8, 16, 32


@pytest.fixture(scope="module", autouse=True)
def _process_group():
    ensure_single_process_group()


# ---------------------------------------------------------------------------
# The constructs
# ---------------------------------------------------------------------------


def _reduce(ctx, x: torch.Tensor) -> torch.Tensor:
    ctx.mark_dirty(x)
    if dist.get_world_size() == 1:
        return x
    dist.all_reduce(x)
    return x


class _ReduceShards(torch.autograd.Function):
    """Sums a row-parallel product across ranks, in place (fairscale's _ReduceFromModelParallelRegion, rewritten)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _reduce(ctx, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


reduce_from_shards = _ReduceShards.apply


class _Scale(torch.autograd.Function):
    """No collective: Dynamo traces it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.factor = factor
        return x * factor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)  # torch 2.13's name for it


class _GatherRows(torch.autograd.Function):
    """A collective that Dynamo traces (save_for_backward only)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
        gather_single(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def reduce_pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    pending = []
    pending.append(dist.all_reduce(a, async_op=True))
    pending.append(dist.all_reduce(b, async_op=True))
    for work in pending:
        work.wait()
    return a + b


def reduce_each(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    works = [dist.all_reduce(t, async_op=True) for t in tensors]
    for w in works:
        w.wait()
    return tensors


def reduce_by_halves(y: torch.Tensor) -> torch.Tensor:
    """An all-reduce as reduce-scatter then all-gather, both async."""
    rows = y.reshape(-1, y.shape[-1]).contiguous()
    part = rows.new_empty(rows.shape[0] // dist.get_world_size(), rows.shape[1])
    scattered = dist.reduce_scatter_tensor(part, rows, async_op=True)
    scattered.wait()
    full = torch.empty_like(rows)
    gathered = gather_single(full, part, async_op=True)
    gathered.wait()
    return full.view_as(y)


def _full(seed: int, name: str, *shape: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1000 + sum(map(ord, name)))
    return torch.randn(*shape, generator=gen) / shape[-1] ** 0.5


class ShardedBlock(nn.Module):
    """Column-parallel up/gate, row-parallel down/side: each rank holds its shards of the same full weights."""

    def __init__(self, seed: int, index: int) -> None:
        super().__init__()
        ws, rank = dist.get_world_size(), dist.get_rank()
        column = {n: _full(seed, f"{index}.{n}", HIDDEN, DIM).chunk(ws, 0)[rank] for n in ("up", "gate")}
        row = {n: _full(seed, f"{index}.{n}", DIM, HIDDEN).chunk(ws, 1)[rank] for n in ("down", "side")}
        self.up, self.gate = (nn.Parameter(column[n].clone()) for n in ("up", "gate"))
        self.down, self.side = (nn.Parameter(row[n].clone()) for n in ("down", "side"))
        self.norm = nn.LayerNorm(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        up, gate = F.linear(h, self.up).relu(), F.linear(h, self.gate).sigmoid()
        y = reduce_from_shards(F.linear(up * gate, self.down))
        z = reduce_pair(F.linear(gate, self.side), F.linear(up, self.side))
        [c] = reduce_each([F.linear(up, self.down)])
        w = reduce_by_halves(F.linear(gate, self.down))
        gathered = _GatherRows.apply(_Scale.apply(x, 0.5))[: x.shape[0]]
        return x + y + 0.5 * z + c + w + gathered


class ShardedModel(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(ShardedBlock(seed, i) for i in range(2))
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(_full(seed, "embed", VOCAB, DIM))
            self.head.weight.copy_(_full(seed, "head", VOCAB, DIM))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


TOKENS = torch.tensor([[3, 1, 4, 1, 5, 9]])


def _outputs(seed: int = 0, ambients: tuple[str, ...] = ("no_grad", "inference_mode")) -> dict[str, torch.Tensor]:
    """Logits of the original, the rewritten and the compiled rewritten model (aot_eager, under each ambient mode)."""
    original, model = ShardedModel(seed), ShardedModel(seed)
    result = FunctionalCollectivesPass().apply(model, CTX)
    graphs: list[torch.fx.GraphModule] = []

    def recording(gm, inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)

    out = {}
    with torch.no_grad():
        out["original"], out["rewritten"] = original(TOKENS), model(TOKENS)
    for ambient in ambients:
        torch._dynamo.reset()
        with getattr(torch, ambient)():
            out[f"compiled {ambient}"] = torch.compile(model, backend=recording, fullgraph=True)(TOKENS)
    out["graph_ops"] = Counter(str(n.target) for g in graphs[-1:] for n in g.graph.nodes if n.op == "call_function")
    out["result"] = result
    return out


# ---------------------------------------------------------------------------
# World size 1
# ---------------------------------------------------------------------------


def test_dynamo_breaks_on_mark_dirty_only():
    """What the pass relies on (torch 2.13): mark_dirty breaks; save_for_backward and collectives trace."""

    def reasons(fn, x):
        torch._dynamo.reset()
        with torch.no_grad():
            return [r.reason.splitlines()[0] for r in torch._dynamo.explain(fn)(x).break_reasons]

    x = torch.randn(2, DIM)
    assert any("mark_dirty" in r for r in reasons(lambda t: reduce_from_shards(t * 1) + 1, x))
    assert reasons(lambda t: _GatherRows.apply(_Scale.apply(t, 2.0)) + 1, x) == []
    assert {"save_for_backward", "mark_non_differentiable"} <= TRACED_CTX_METHODS and "mark_dirty" not in TRACED_CTX_METHODS


def test_world_size_1_rewrite_keeps_outputs_and_compiles():
    out = _outputs()
    result = out["result"]
    # the Function's alias call, 2 appends + 1 comprehension of handles, reduce-scatter and all-gather in a helper
    assert result.rewritten == 6 and not result.skipped, result
    notes = " | ".join(result.notes)
    assert "for inference" in notes and "_ReduceShards (1)" in notes
    assert "_GatherRows runs a collective that Dynamo traces as it is" in notes
    for name in ("rewritten", "compiled no_grad", "compiled inference_mode"):
        assert torch.equal(out[name], out["original"]), name


def test_rewritten_sources():
    model = ShardedModel()
    FunctionalCollectivesPass().apply(model, CTX)
    block = rewritten_source(model.layers[0])
    assert "_graphfix_forward_for_inference(_graphfix_autograd__ReduceShards, True, F.linear(up * gate, self.down))" in block
    assert "_GatherRows.apply(_Scale.apply(x, 0.5))" in block  # traced as they are
    helpers = model.layers[0].forward.__func__.__closure__
    cells = dict(zip(model.layers[0].forward.__func__.__code__.co_freevars, helpers))
    for name in ("reduce_pair", "reduce_each", "reduce_by_halves"):
        source = rewritten_source_of(cells[f"_graphfix_fn_{name}"].cell_contents)
        assert "async_op" not in source and ".wait()" not in source, source
    assert "_graphfix_all_reduce_(t, 'sum', None) for t in tensors]" in rewritten_source_of(
        cells["_graphfix_fn_reduce_each"].cell_contents)
    assert model.layers[1].forward.__func__ is model.layers[0].forward.__func__
    assert FunctionalCollectivesPass().apply(model, CTX).rewritten == 0


def rewritten_source_of(fn) -> str:
    return ast.unparse(fn.__graphfix_ast__)


def test_the_rewrite_refuses_a_call_that_needs_grad():
    model = ShardedModel()
    FunctionalCollectivesPass().apply(model, CTX)
    with pytest.raises(RuntimeError) as err:
        model(TOKENS)
    message = str(err.value)
    assert "\n" not in message and "_ReduceShards.apply was rewritten by graphfix for inference" in message
    for p in model.parameters():
        p.requires_grad_(False)
    assert not model(TOKENS).requires_grad  # grad on, nothing requires it: no backward is lost


class _Doubler(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(x)
        return x.mul_(2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * 2


class Leftovers(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple:
        y = _Doubler.apply(x.clone())
        fn = _ReduceShards.apply
        works = []
        works.append(dist.all_reduce(y, async_op=True))
        for w in works:
            w.wait()
        return fn(y), works


def test_what_is_left_alone_is_reported():
    model = Leftovers()
    result = FunctionalCollectivesPass().apply(model, CTX)
    assert result.rewritten == 0 and "forward" not in model.__dict__
    by_site = {}
    for where, reason in result.skipped:
        by_site.setdefault(where, []).append(reason)
    line = Leftovers.forward.__code__.co_firstlineno
    assert any(f"line {line + 2}:" in r and "_ReduceShards.apply is used other than called" in r
               for r in by_site["<root>"])
    assert any(f"line {line + 7}:" in r and "the list `works` of Work handles is used other than" in r
               for r in by_site["<root>"])
    assert "runs no collective: left alone" in by_site["_Doubler"][0] and "ctx.mark_dirty" in by_site["_Doubler"][0]


# ---------------------------------------------------------------------------
# World size 2
# ---------------------------------------------------------------------------


def _worker(rank: int, port: int, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    out = _outputs(ambients=("inference_mode",))
    if rank == 0:
        torch.save({k: v for k, v in out.items() if k != "result"} | {"notes": out["result"].notes}, path)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_world_size_2_matches_world_size_1(tmp_path):
    with torch.no_grad():
        ref = ShardedModel()(TOKENS)  # world size 1: the full weights
    path = str(tmp_path / "rank0.pt")
    run_processes(_worker, (free_port(), path))
    got = torch.load(path, weights_only=False)
    scale = ref.abs().max().item()
    for name in ("original", "rewritten", "compiled inference_mode"):
        assert (got[name] - ref).abs().max().item() <= 1e-5 * scale, name
    ops = {op.rpartition("_c10d_functional.")[2]: n for op, n in got["graph_ops"].items() if "_c10d_functional" in op}
    # per block: the Function's in-place all_reduce (Dynamo made it functional), 2 + 1 from the lists of handles;
    # the helper's reduce-scatter and all-gather; _GatherRows' all-gather (traced as it is)
    assert (ops.get("all_reduce"), ops.get("reduce_scatter_tensor"), ops.get("all_gather_into_tensor")) == (8, 2, 4), ops


def test_fairscales_own_mappings_are_matched_as_a_construct(monkeypatch):
    """Without the class swap, the generic rewrite reaches fairscale's _ReduceFromModelParallelRegion.apply."""
    import passes.collectives as pass_module
    from tests.helpers_meta import init_model_parallel
    from tests.test_pass_collectives import FairscaleMLP

    init_model_parallel(1)
    monkeypatch.setattr(pass_module, "_fairscale_swaps", dict)
    torch.manual_seed(0)
    model = FairscaleMLP().eval()
    ids = torch.tensor([[1, 5, 15, -1]])
    with torch.no_grad():
        ref = model(ids)
    result = FunctionalCollectivesPass().apply(model, CTX)
    assert result.rewritten == 1 and "_ReduceFromModelParallelRegion (1)" in " ".join(result.notes)  # one helper
    torch._dynamo.reset()
    with torch.no_grad():
        assert torch.equal(model(ids), ref)
        assert torch.equal(torch.compile(model, backend="aot_eager", fullgraph=True)(ids), ref)
