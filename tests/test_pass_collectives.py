"""Pass functional-collectives: fairscale layers and async c10d calls -> functional collectives."""

from __future__ import annotations

import fairscale.nn.model_parallel.layers as fs
import pytest
import torch
import torch.distributed as dist
from torch import nn

from graphfix.rewrite.blocks import collectives as gc
from graphfix.rewrite.blocks.source_rewrite import original_method, rewritten_source
from graphfix.rewrite.pass_manager import PassContext
from passes.collectives import FunctionalCollectivesPass
from tests.helpers_meta import (
    apply_beside_reference,
    assert_parameters_moved,
    init_model_parallel,
    max_decode_diff,
    parameters_by_name,
)

CTX = PassContext()


@pytest.fixture(scope="module", autouse=True)
def _process_group():
    init_model_parallel(1)


class FairscaleMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = fs.VocabParallelEmbedding(16, 8, init_method=nn.init.normal_)
        self.up = fs.ColumnParallelLinear(8, 12, bias=True, gather_output=False, init_method=nn.init.normal_)
        self.down = fs.RowParallelLinear(12, 8, bias=True, input_is_parallel=True, init_method=nn.init.normal_)
        self.head = fs.ColumnParallelLinear(8, 16, bias=False, gather_output=True, init_method=nn.init.normal_)

    def forward(self, ids):
        h = self.embed(ids)
        return self.head(h + self.down(torch.relu(self.up(h))))


def test_module_alone_equal_outputs_moved_parameters_idempotent():
    torch.manual_seed(0)
    model = FairscaleMLP().eval()
    ids = torch.tensor([[1, 5, 15, -1]])
    with torch.no_grad():
        ref = model(ids)
    before = parameters_by_name(model)
    result = FunctionalCollectivesPass().apply(model, CTX)
    assert result.rewritten == 4 and not result.skipped
    assert isinstance(model.embed, gc.VocabParallelEmbedding) and isinstance(model.down, gc.RowParallelLinear)
    assert_parameters_moved(before, model)
    with torch.no_grad():
        assert torch.equal(model(ids), ref)
        # fairscale's mark_dirty broke every call; now one graph
        assert torch.equal(torch.compile(model, backend="eager", fullgraph=True)(ids), ref)
    again = FunctionalCollectivesPass().apply(model, CTX)
    assert again.rewritten == 0 and again.notes


def test_whole_meta_model():
    ref_model, model, result = apply_beside_reference(FunctionalCollectivesPass(), CTX)
    assert result.rewritten == 2 * 7 + 2  # 7 parallel linears per layer, embedding, output
    assert not any(type(m).__module__.startswith("fairscale") for m in model.modules())
    assert max_decode_diff(ref_model, model, torch.randint(0, 128, (2, 6)), steps=4) == 0.0
    assert FunctionalCollectivesPass().apply(model, CTX).rewritten == 0


def test_shard_mismatch_is_skipped():
    model = nn.Sequential(fs.ColumnParallelLinear(8, 4, bias=False))
    model[0].weight = nn.Parameter(torch.zeros(3, 8))
    result = FunctionalCollectivesPass().apply(model, CTX)
    assert result.rewritten == 0 and "shard" in result.skipped[0][1]


class AsyncCollectives(nn.Module):
    def forward(self, x):
        h = x * 2
        work = dist.all_reduce(h, op=dist.ReduceOp.MAX, async_op=True)
        work.wait()
        g = x + 1
        dist.all_reduce(g, async_op=True).wait()
        return h + g


class HandleEscapes(nn.Module):
    def forward(self, x):
        work = dist.all_reduce(x, async_op=True)
        return x, work


def test_async_c10d_rewritten_in_source():
    model = AsyncCollectives()
    x = torch.randn(3)
    ref = model(x)
    result = FunctionalCollectivesPass().apply(model, CTX)
    assert result.rewritten == 2 and not result.skipped
    src = rewritten_source(model)
    assert "_graphfix_all_reduce_(h, 'max', None)" in src and "async_op" not in src and ".wait()" not in src
    assert torch.equal(model(x), ref) and torch.equal(original_method(model)(x), ref)
    assert torch.equal(torch.compile(model, backend="eager", fullgraph=True)(x), ref)
    assert FunctionalCollectivesPass().apply(model, CTX).rewritten == 0


def test_async_c10d_with_escaping_handle_is_skipped():
    model = HandleEscapes()
    result = FunctionalCollectivesPass().apply(model, CTX)
    assert result.rewritten == 0
    assert "used other than `work.wait()`" in result.skipped[0][1]
    assert "forward" not in model.__dict__
