"""Run a Meta checkpoint in Meta's own reference code (``llama_models``), to check conversions.

A converted checkpoint is only proven right when the format's own
implementation runs it and agrees with another implementation. Meta's
``llama_models.llama3.model.Transformer`` is built from fairscale
model-parallel layers, which need ``torch.distributed`` and fairscale's
model-parallel groups initialised even on one process; this module does that
(gloo, CPU) and loads a checkpoint, merging rank files when the checkpoint has
more ranks than the running world. Needs the ``meta`` extra (fairscale,
llama-models).
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from graphfix.errors import InputError


def free_port() -> int:
    """A TCP port on the loopback interface nobody is listening on (for the gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_model_parallel(world_size: int = 1, rank: int = 0, *, port: int | None = None) -> None:
    """Initialise torch.distributed (gloo) and fairscale's model parallel groups, once per process."""
    from graphfix.diagnose.meta_loader import ensure_model_parallel

    ensure_model_parallel(world_size, rank, port=port)


def load_meta_transformer(folder: str | Path, *, max_seq_len: int = 128, max_batch_size: int = 1,
                          dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Build ``llama_models``' ``Transformer`` from ``params.json`` and load the weights (no tensor missing or left over).

    The process's model-parallel world must already be initialised
    (:func:`init_model_parallel`). When the world is one process, a checkpoint
    with several rank files is merged; when the world size equals the rank
    count, each process loads its own ``consolidated.<rank>.pth``.
    """
    import fairscale.nn.model_parallel.initialize as fs_init

    from graphfix.convert.formats.meta import read_merged_state_dict, read_params, shard_files
    from graphfix.diagnose.meta_loader import build_meta_transformer

    folder = Path(folder)
    params = read_params(folder)
    world = fs_init.get_model_parallel_world_size()
    files = shard_files(folder)
    if world == 1:
        state = read_merged_state_dict(folder, dtype)
    elif world == len(files):
        rank = fs_init.get_model_parallel_rank()
        raw = torch.load(files[rank], map_location="cpu", mmap=True, weights_only=True)
        state = {k: v.to(dtype) for k, v in raw.items() if k != "rope.freqs"}
    else:
        raise InputError(f"{folder}: has {len(files)} rank files but the model-parallel world has {world} "
                         "processes; run with 1 or with as many processes as files")
    return build_meta_transformer(params, state, dtype=dtype, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
