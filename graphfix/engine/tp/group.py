"""The tensor-parallel process group: ``torchrun``'s environment, NCCL on CUDA, gloo on CPU.

One process per GPU, started by ``torchrun --nproc-per-node N`` (which sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). Started without
torchrun, ``init_tp`` makes a world of one with an in-memory store, so a plain
``python`` run (and a single GPU) takes exactly the same tensor-parallel code path:
the layers still call the functional collectives, which then reduce over one rank.

NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``,
both only set when the caller has not set them): the lent machines must not use it, and
the one-shot all-reduce this package uses is a peer-to-peer read, not a multicast one.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist

from graphfix.errors import InputError

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
"""Environment that keeps NCCL's NVLS and symmetric memory's multicast objects off."""


@dataclasses.dataclass
class TPGroup:
    """The group the sharded layers communicate in, this process's rank and the all-reduce in use.

    ``all_reduce_kind`` is what ``allreduce.choose_all_reduce`` picked ("nccl", "one_shot",
    "gloo") and ``all_reduce_reason`` why; the layers always call the functional
    ``all_reduce`` (so a step traces as one graph), and a "one_shot" choice makes Inductor
    lower it to the symmetric-memory kernel.
    """

    group: Any
    rank: int
    world_size: int
    device: torch.device
    all_reduce_kind: str = "unchosen"
    all_reduce_reason: str = ""

    @property
    def group_name(self) -> str:
        return self.group.group_name

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints progress and results."""
        return self.rank == 0

    def describe(self) -> str:
        return f"tp={self.world_size} rank={self.rank} {self.device} all-reduce={self.all_reduce_kind}"


def env_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` without it."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise InputError(f"RANK/WORLD_SIZE/LOCAL_RANK are not integers ({exc})", hint="start with torchrun") from None
    return rank, world, local


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for CPU ones."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_tp(tp: int | None = None, device: str | torch.device | None = None) -> TPGroup:
    """Join (or create) the default process group and return the ``TPGroup`` over all its ranks.

    ``tp``: the expected world size; a mismatch with torchrun's ``WORLD_SIZE`` is an
    ``InputError`` naming the command to run. ``device``: default ``cuda:LOCAL_RANK`` when
    CUDA is present, else cpu. An already initialised default group is reused (tests,
    fairscale), so calling this twice is harmless.
    """
    rank, world, local = env_world()
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    if tp is not None and tp != world:
        raise InputError(f"--tp {tp} but this process is one of {world}",
                         hint=f"start it with torchrun --nproc-per-node {tp} ...")
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    for key, value in MULTICAST_OFF.items():
        os.environ.setdefault(key, value)
    if not dist.is_initialized():
        backend = backend_for(device)
        if world == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend, rank=rank, world_size=world, **kwargs)
    return TPGroup(dist.group.WORLD, rank, world, device)


def main_print(tp: TPGroup | None, *args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (progress and results are printed once, not once per GPU)."""
    if tp is None or tp.is_main:
        print(*args, flush=True, **kwargs)
