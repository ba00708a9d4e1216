"""A 2-rank Meta checkpoint written by graphfix runs in Meta's own model-parallel code on 2 processes."""

from __future__ import annotations

import pytest
import torch

from graphfix.convert import convert
from tests.conftest_convert import tiny_hf

TOKENS = torch.tensor([[3, 17, 99, 42, 7, 64, 1, 120, 5, 33]])


def _rank_worker(rank: int, folder: str, port: int, out: str) -> None:
    from graphfix.convert.meta_reference import init_model_parallel, load_meta_transformer

    torch.set_num_threads(1)
    init_model_parallel(2, rank, port=port)
    model = load_meta_transformer(folder, max_seq_len=32)
    logits = model(TOKENS, 0)  # fairscale gathers the vocabulary-parallel output on every rank
    if rank == 0:
        torch.save(logits, out)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_rank_checkpoint_runs_model_parallel_in_llama_models(tmp_path):
    import llama_models  # noqa: F401 - the two ranks load it: fail here, in the parent, when it is missing
    import torch.multiprocessing as mp

    from graphfix.convert.meta_reference import free_port

    model = tiny_hf(tmp_path / "hf", heads=4, kv_heads=2, tied=True)
    convert(tmp_path / "hf", tmp_path / "m2", to="meta", shards=2, progress=False)
    out = tmp_path / "logits.pt"
    mp.spawn(_rank_worker, args=(str(tmp_path / "m2"), free_port(), str(out)), nprocs=2, join=True)
    with torch.no_grad():
        want = model(TOKENS).logits
    got = torch.load(out, weights_only=True)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
