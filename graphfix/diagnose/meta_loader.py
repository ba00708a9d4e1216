"""Run Meta's reference Llama code (``llama_models`` on fairscale) in this process.

Meta's ``Transformer`` needs a torch.distributed group and fairscale's model
parallel state even on one process; this module sets up both (gloo, world size
1) when nothing is set up yet, and builds the model from ``params.json``
values and a state dict loaded safely (``weights_only=True``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphfix.errors import InputError, UnsupportedModelError


def ensure_model_parallel(world_size: int = 1, rank: int = 0, *, port: int | None = None) -> None:
    """Initialise a gloo process group and fairscale model parallelism if not done yet.

    One process (world size 1, no port given) gets an in-memory store: no TCP port,
    no ``MASTER_PORT`` written to the environment, so child processes that start
    their own groups never collide with this one. Several processes rendezvous
    over TCP on ``port`` (or the inherited ``MASTER_ADDR``/``MASTER_PORT``).
    """
    import torch.distributed as dist

    try:
        import fairscale.nn.model_parallel.initialize as fs_init
    except ImportError as exc:
        raise UnsupportedModelError("Meta checkpoints need fairscale and llama-models",
                                    hint="pip install fairscale; pip install --no-deps llama-models==0.3.0") from exc
    if not dist.is_initialized():
        if world_size == 1 and port is None:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            if port is not None:
                os.environ["MASTER_PORT"] = str(port)
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
    if not fs_init.model_parallel_is_initialized():
        # fairscale print()s "> initializing model parallel with size 1" and two more such lines: noise that
        # corrupted JSON on stdout and that -q could not hide. Dropped: they say nothing a graphfix user needs.
        with contextlib.redirect_stdout(io.StringIO()):
            fs_init.initialize_model_parallel(world_size)


#: the KV cache and RoPE table Meta's code allocates from params.json may be this many times the weights ...
_CACHE_TO_WEIGHTS = 4
#: ... or this large whatever the weights (a tiny test model with a normal context length)
_CACHE_FLOOR = 512 * 2**20


def validate_meta_checkpoint(path: Path, *, max_seq_len: int = 512, max_batch_size: int = 1,
                             dtype: torch.dtype = torch.float32) -> None:
    """Check a Meta checkpoint folder from its headers before Meta's ``Transformer`` is built from it.

    The converter's reader does the work (:func:`graphfix.convert.formats.meta.open_meta`): params.json
    typed and in range, rank files present, distinct and plain tensors (nothing unpickled beyond
    tensors), ``dim`` and the MLP width matching the weights, every tensor present with the shape
    params.json implies. Then the sizes ``Transformer(ModelArgs(**params))`` allocates before any
    weight is loaded (its KV cache and RoPE table, from ``max_seq_len``/``max_batch_size``, which a
    params.json may carry and which override graphfix's own) are bounded by what the weights imply
    and by the memory available: ``"max_seq_len": 8000000`` on a 400 KB model is an error here,
    not 8 GB allocated. Every failure is one line naming the file and the field.
    """
    from graphfix.convert.formats.meta import open_meta
    from graphfix.convert.progress import human_bytes
    from graphfix.convert.spec import validate

    with open_meta(Path(path)) as ckpt:
        validate(ckpt)
        spec, weights = ckpt.spec, ckpt.total_bytes
    params_path = Path(path) / "params.json"
    params = json.loads(params_path.read_text())  # open_meta checked it parses and every value's type
    seq = params.get("max_seq_len") or max_seq_len
    batch = params.get("max_batch_size") or max_batch_size
    kv_bytes = 2 * spec.num_hidden_layers * batch * seq * spec.num_key_value_heads * spec.head_dim * dtype.itemsize
    rope_bytes = 2 * seq * (spec.head_dim // 2) * 8  # complex64 table of 2 * max_seq_len positions
    need = kv_bytes + rope_bytes
    limit = max(_CACHE_TO_WEIGHTS * weights, _CACHE_FLOOR)
    from graphfix.diagnose.validate import available_memory

    available = available_memory()
    if need > limit or need > available // 2:
        keys = " and ".join(f"{k}={params[k]}" for k in ("max_seq_len", "max_batch_size") if params.get(k))
        why = (f"more than half the {human_bytes(available)} of memory available" if need <= limit and available
               else f"{need / max(weights, 1):.0f}x the {human_bytes(weights)} of weights")
        raise InputError(f"{params_path}: {keys or f'max_seq_len={seq}'} sizes a {human_bytes(need)} KV cache and "
                         f"RoPE table, {why}; lower it or remove it from params.json")


def read_meta_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The model-parallel-1 state dict of a Meta checkpoint folder (shards merged)."""
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise InputError(f"{path} has params.json but no consolidated.*.pth", hint="copy the checkpoint files too")
    if len(shards) == 1:
        from graphfix.diagnose.weight_files import safe_torch_load

        return safe_torch_load(shards[0])
    try:
        from graphfix.convert.formats.meta import read_merged_state_dict  # type: ignore[import-not-found]
    except ImportError as exc:  # pragma: no cover - the converter ships with graphfix
        raise UnsupportedModelError(f"{path} has {len(shards)} model-parallel shards",
                                    hint="merge them with graphfix convert first") from exc
    return read_merged_state_dict(path)


def build_meta_transformer(params: dict[str, Any], state: dict[str, torch.Tensor] | None = None, *,
                           dtype: torch.dtype = torch.float32, max_seq_len: int = 512,
                           max_batch_size: int = 1) -> nn.Module:
    """Meta's ``llama_models.llama3.model.Transformer`` with ``state`` loaded into it."""
    ensure_model_parallel()
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    args = ModelArgs(**{"max_seq_len": max_seq_len, "max_batch_size": max_batch_size, **params})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Transformer(args)
    finally:
        torch.set_default_dtype(previous)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or [k for k in unexpected if "rope.freqs" not in k]:
            raise InputError(f"checkpoint does not match params.json: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()
