"""Diagnosis under tensor parallelism: two gloo processes, a model whose collectives break the graph.

``tests/test_pass_collectives_generic.ShardedModel`` holds the constructs of tensor-parallel code
written by hand: an ``autograd.Function`` that all-reduces in place under ``ctx.mark_dirty``
(as fairscale's mappings do), ``async_op=True`` collectives whose Work handles are waited on,
and a reduce-scatter / all-gather in a helper. At world size 2 the report must show those
breaks with their categories, the planner must pick ``functional-collectives`` from them, and
after that pass the same diagnosis must find no break.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers_meta import free_port, run_processes

pytestmark = pytest.mark.slow


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from graphfix import diagnose
    from graphfix.rewrite.pass_manager import PassContext
    from graphfix.rewrite.planner import plan_passes
    from passes.collectives import FunctionalCollectivesPass
    from tests.test_pass_collectives_generic import TOKENS, ShardedModel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = ShardedModel()
    with torch.no_grad():
        before = diagnose(model, [(TOKENS,)], hidden=False, fullgraph_check=False)
        planned = plan_passes(model, before.findings)
        FunctionalCollectivesPass().apply(model, PassContext())
        after = diagnose(model, [(TOKENS,)], hidden=False, fullgraph_check=False)
    torch.save({"categories": sorted({f.category.value for f in before.graph_breaks}),
                "suggestions": [f.suggestion for f in before.graph_breaks],
                "fix_passes": {f.category.value: f.fix_pass for f in before.graph_breaks},
                "planned": planned, "after": len(after.graph_breaks)}, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_collective_breaks_under_tp_are_reported_with_their_pass(tmp_path):
    out = str(tmp_path / "report")
    run_processes(_worker, (free_port(), out), nprocs=2, timeout_s=240)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=False)
        assert {"collective", "autograd_function_ctx"} <= set(got["categories"]), got
        assert any("functional collectives" in (s or "") for s in got["suggestions"]), got
        assert got["fix_passes"]["collective"] == got["fix_passes"]["autograd_function_ctx"] == "functional-collectives"
        assert "functional-collectives" in got["planned"], got
        assert got["after"] == 0, got
