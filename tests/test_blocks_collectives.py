"""graphfix's tensor-parallel layers equal fairscale's (world size 1) and trace without graph breaks."""

from __future__ import annotations

import fairscale.nn.model_parallel.layers as fs
import pytest
import torch

from graphfix.rewrite.blocks import collectives as gc
from tests.helpers_meta import init_model_parallel


@pytest.fixture(scope="module")
def mp():
    init_model_parallel(1)
    return gc.ModelParallelGroup.from_fairscale()


def _filled(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return module.eval()


@pytest.mark.parametrize(
    "make, new_cls, x",
    [
        (lambda: fs.ColumnParallelLinear(8, 6, bias=True, gather_output=True), gc.ColumnParallelLinear,
         torch.randn(2, 3, 8)),
        (lambda: fs.ColumnParallelLinear(8, 6, bias=False, gather_output=False), gc.ColumnParallelLinear,
         torch.randn(2, 3, 8)),
        (lambda: fs.RowParallelLinear(8, 6, bias=True, input_is_parallel=False), gc.RowParallelLinear,
         torch.randn(2, 3, 8)),
        (lambda: fs.RowParallelLinear(8, 6, bias=False, input_is_parallel=True), gc.RowParallelLinear,
         torch.randn(2, 3, 8)),
        (lambda: fs.VocabParallelEmbedding(11, 6), gc.VocabParallelEmbedding, torch.tensor([[0, 3, 10, -1, 11]])),
        (lambda: fs.ParallelEmbedding(11, 6), gc.ParallelEmbedding, torch.tensor([[0, 3, 10]])),
    ],
    ids=["column-gather", "column", "row-bias", "row-parallel-input", "vocab-embedding", "embedding"],
)
def test_layer_equals_fairscale_and_moves_parameters(mp, make, new_cls, x):
    old = _filled(make())
    new = new_cls.from_fairscale(old, mp)
    assert new.weight is old.weight and getattr(new, "bias", None) is getattr(old, "bias", None)
    with torch.no_grad():
        ref = old(x)
        out = new(x)
        assert torch.equal(out, ref)
        compiled = torch.compile(new, backend="eager", fullgraph=True)(x)
    assert torch.equal(compiled, ref)


def test_in_place_helpers_at_world_size_1(mp):
    t = torch.arange(4.0)
    assert gc.all_reduce_(t, "sum") is t and torch.equal(t, torch.arange(4.0))
    out = torch.empty(4)
    gc.all_gather_into_tensor_(out, torch.arange(4.0))
    assert torch.equal(out, torch.arange(4.0))
    gc.reduce_scatter_tensor_(out, torch.full((4,), 2.0))
    assert torch.equal(out, torch.full((4,), 2.0))
